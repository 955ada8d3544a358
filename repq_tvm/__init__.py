"""repq-tvm: RepQ-ViT post-training quantization of Vision Transformers, compiled to integer code with TVM."""

from .deploy.threads import limit_spinning as _limit_spinning
from .deploy.threads import use_all_cpus as _use_all_cpus

__version__ = "0.1.0"

# TVM's own default is half the logical CPUs on x86: one thread on a 2-vCPU VM (see deploy/threads.py)
_use_all_cpus()
# and its workers spin ~150 ms after every run unless told, taking a core from the application (deploy/threads.py)
_limit_spinning()
