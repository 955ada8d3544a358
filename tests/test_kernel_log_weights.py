"""`kernels.log_weights` reads nothing past its input: run on logits that end right before a PROT_NONE page.

Its rows are padded to whole vectors; a padded lane must not load (a `Select` evaluates both sides: the fused
softmax's reductions had read up to 15 floats past the last row, which crashed here). Run in a subprocess, so
a fault fails the test instead of killing the worker.
"""

import subprocess
import sys

import pytest

_SCRIPT = r"""
import ctypes, mmap
import numpy as np, tvm
from repq_tvm.kernels import log_weights as L
from repq_tvm.kernels.attn_v import padded_tokens
from repq_tvm.kernels.qdense import host_target
from repq_tvm.reference import ops

bt, m, n, bits, softmax = 1, 16, 13, 8, {softmax}  # 208 floats: 832 bytes, a multiple of 64 (DLPack's alignment)
target = host_target(1)
f = ops.attn_frac_bits(n, bits)
g = ops.attn_groups(bits, f, True)
func, _ = L.log_weights_primfunc((bt, m, n), bits, True, f, g, target, softmax=softmax,
                                 scale=None if softmax else 0.0073)
log2s = [tvm.runtime.tensor(L.log2_scale_operand(0.0073))] if softmax else []  # the fused softmax's operand
fn = tvm.compile(tvm.IRModule({{"main": func.with_attr("global_symbol", "main")}}), target=target).jit()["main"]
nbytes, page = bt * m * n * 4, mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + page), page, 0) == 0  # the second page: no access
x = np.frombuffer(buf, np.float32, count=bt * m * n, offset=page - nbytes).reshape(bt, m, n)  # ends at the page
rng = np.random.default_rng(0)
x[...] = rng.standard_normal((bt, m, n)) * 3 if softmax else rng.dirichlet(np.ones(n), (bt, m))
w = tvm.runtime.tensor(np.zeros((bt, g, m, padded_tokens(n)), np.int16))
fn(tvm.runtime.from_dlpack(x), *log2s, w)
copy = tvm.runtime.tensor(np.zeros_like(w.numpy()))
fn(tvm.runtime.tensor(np.ascontiguousarray(x)), *log2s, copy)
assert np.array_equal(w.numpy(), copy.numpy()) and w.numpy().any()
print("read inside")
"""


@pytest.mark.parametrize("softmax", [True, False], ids=["logits", "probabilities"])
def test_log_weights_read_nothing_past_the_input(softmax):
    run = subprocess.run([sys.executable, "-c", _SCRIPT.format(softmax=softmax)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "read inside" in run.stdout, (run.returncode, run.stderr[-2000:])
