"""repq-tvm: RepQ-ViT post-training quantization of Vision Transformers, compiled to integer code with TVM."""

__version__ = "0.1.0"
