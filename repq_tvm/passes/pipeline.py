"""The whole compiler, in order. Reading this file tells what happens to a calibrated model.

    1. import        calibrated model → canonical fake-quant Relax (torch.export frontend)
    2. integer ops   quantized linears → scheduled integer dense kernels (LowerQuantizedLinear)
    3. log quant     the post-Softmax log√2 quantizer → plain Relax ops (no Python at run time)
    4. build         TVM's default Relax pipeline (legalize, fuse, lower) + LLVM for the target

`dump_dir` writes the IR after every phase (`NN-phase.py`), so a user can see where numbers changed.
"""

from __future__ import annotations

import logging
import os
import time

import tvm

from ..frontends import lower_log_quant
from .quantized_linear import LowerQuantizedLinear

log = logging.getLogger("repq_tvm.compile")


def tvm_target(preset: dict, num_cores: int | None = None) -> dict:
    target = dict(preset["tvm_target"])
    target["num-cores"] = num_cores or os.cpu_count() or 1
    return target


def _dump(dump_dir: str | None, index: int, phase: str, mod: tvm.IRModule) -> None:
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{index:02d}-{phase}.py"), "w") as f:
            f.write(mod.script())


def compile_model(model, input_shape, preset: dict, dump_dir: str | None = None, progress=print):
    """Compile a calibrated (fake-quant) PyTorch model for `preset`; returns (executable, stats)."""
    from ..frontends import export_relax

    target = tvm_target(preset)
    stats = {}
    t0 = time.time()
    progress("[1/4] importing the calibrated model into Relax")
    mod = export_relax(model, input_shape)
    _dump(dump_dir, 1, "import", mod)

    progress("[2/4] lowering quantized linears to integer kernels")
    lower = LowerQuantizedLinear(target)
    mod = lower(mod)
    stats["integer_linears"] = lower.rewritten
    _dump(dump_dir, 2, "integer-linear", mod)

    progress("[3/4] lowering the log2 attention quantizer")
    mod = lower_log_quant(mod)
    _dump(dump_dir, 3, "log-quant", mod)

    progress(f"[4/4] building for {preset['name']}")
    executable = tvm.compile(mod, target=tvm.target.Target(target))
    stats["compile_seconds"] = round(time.time() - t0, 1)
    return executable, stats
