"""The whole compiler, in order. Reading this file tells what happens to a calibrated model.

    1. import          calibrated model → canonical fake-quant Relax (torch.export or ONNX frontend)
    2. integer passes  each rewrites one quantized pattern into a scheduled integer kernel:
                         quantized_linear  linear + bias           → qdense (u8·s8 / int16, packed weights)
                         gelu_codes_epilogue qdense → GELU → quantize → qdense storing the codes (as fc2 reads them)
                         residual_epilogue  x + qdense               → qdense adding x in its epilogue
                         patch_embed       stride = kernel conv     → qdense on patch rows
                         quantized_qk      q @ kᵀ (softmax scale)   → batched matmul (vpdpbusd on VNNI, else int16 vpmaddwd)
                         log2_attention    log√2 codes, attn @ V    → int16 power-of-two weights, one dot product per plane
                         qkv_codes_epilogue qkv → split → quantize ×3 → AMX qdense storing the q/k/v codes
                         fused_attention   q@kᵀ → log√2 weights → attn @ V kernels → one attention kernel (AMX, VNNI, AVX2)
                         attention_out_codes attention → heads to tokens → quantize → the attention kernel storing proj's codes
                         qkv_column_codes  qkv (float) → vector attention → qkv storing the q/k/v codes → the attention
                         qkv_head_split    qkv → heads → q, k, v       → q, k, v → heads (one fused kernel each)
                         row_moves         window partition / shift, and reverse + add → the linear's row table
    3. log quant       any post-Softmax log√2 quantizer left → plain Relax ops (no Python at run time);
       load time       weight unpacking moved out of `main` into a function run once at load
                       (`load_time_weights`: weights stay narrow in the library)
    4. fuse, schedule  legalize (fast GELU / softmax, `fast_math`), fuse, default schedules for the
                       float kernels (`float_schedules`)
    5. build           TVM's CPU lowering + LLVM for the target

`dump_dir` writes the IR after every phase (`NN-phase.py`), so a user can see where numbers changed.
"""

from __future__ import annotations

import os
import time

import tvm

from .. import targets
from ..errors import ReqError
from ..frontends import lower_log_quant
from .fast_math import legalize_passes
from .float_schedules import schedule_float_ops, unscheduled
from .attention_out_codes import FuseAttentionOutputCodes
from .fused_attention import FuseAttention
from .gelu_codes_epilogue import FuseGeluCodesEpilogue
from .load_time_weights import HoistLoadTimeWeights
from .log2_attention import LowerLog2Attention
from .patch_embed import LowerPatchEmbed
from .quantized_linear import LowerQuantizedLinear
from .qkv_codes_epilogue import FuseQKVCodesEpilogue
from .qkv_column_codes import FuseQKVColumnCodes
from .qkv_head_split import SplitQKVHeads
from .quantized_qk import LowerQuantizedQK
from .residual_epilogue import FuseResidualEpilogue
from .row_moves import FoldRowMoves

# (IR dump name, pass class taking the target, compile-stats key counting its rewrites), in order
INTEGER_PASSES = (
    ("integer-linear", LowerQuantizedLinear, "integer_linears"),
    ("gelu-codes-epilogue", FuseGeluCodesEpilogue, "fused_gelu_codes"),
    ("residual-epilogue", FuseResidualEpilogue, "fused_residual_adds"),
    ("integer-patch-embed", LowerPatchEmbed, "integer_patch_embeds"),
    ("integer-qk", LowerQuantizedQK, "integer_qk"),
    ("log2-attention", LowerLog2Attention, "log2_attention"),
    ("qkv-codes-epilogue", FuseQKVCodesEpilogue, "fused_qkv_codes"),  # after q@kᵀ took k without its transpose
    ("fused-attention", FuseAttention, "fused_attention"),  # the three attention kernels of the passes above
    ("attention-out-codes", FuseAttentionOutputCodes, "fused_attention_out_codes"),
    ("qkv-column-codes", FuseQKVColumnCodes, "fused_qkv_column_codes"),  # vector attentions reading qkv's float output
    ("qkv-head-split", SplitQKVHeads, "split_qkv_thirds"),  # where qkv-codes-epilogue did not apply
    ("row-moves", FoldRowMoves, "folded_row_moves"),  # last: no pass after it rebuilds a kernel from its spec
)


def _dump(dump_dir: str | None, index: int, phase: str, mod: tvm.IRModule) -> None:
    if dump_dir:
        path = os.path.join(dump_dir, f"{index:02d}-{phase}.py")
        try:
            os.makedirs(dump_dir, exist_ok=True)
            with open(path, "w") as f:
                f.write(mod.script())
        except OSError as exc:
            raise ReqError(f"cannot write the IR dump {path}: {exc.strerror or exc}") from None


def fuse_and_schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize (fast GELU / softmax) and fuse, then default schedules for every kernel not yet scheduled."""
    with target:
        return tvm.transform.Sequential([*legalize_passes(), schedule_float_ops()])(mod)


def lower_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The rest of TVM's CPU pipeline (dataflow lowering, memory planning, VM lowering)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="RepqLower")
    def _lower(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _lower


def import_model(model, input_shape, frontend: str = "torch") -> tvm.IRModule:
    """The calibrated model in canonical Relax, through torch.export or through an exported QDQ ONNX file."""
    from .. import frontends

    if frontend == "torch":
        return frontends.export_relax(model, input_shape)
    if frontend == "onnx":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            frontends.export_onnx(model, input_shape, path)
            return frontends.import_onnx(path)
    raise ValueError(f"frontend must be 'torch' or 'onnx', got {frontend!r}")


def lower_to_kernels(model, input_shape, preset: dict, dump_dir: str | None = None, progress=print,
                     frontend: str = "torch"):
    """Phases 1-4 up to fusion: returns (module, target, stats).  Integer kernels are hand-scheduled (each
    with its spec, `tuning.spaces`), float kernels fused but unscheduled: what `repq-tvm tune` extracts its
    tasks from, and where `compile --tuning-log` swaps tuned kernels in."""
    target = targets.tvm_target(preset)
    stats = {"frontend": frontend}
    progress(f"[1/5] importing the calibrated model into Relax ({frontend} frontend)")
    mod = import_model(model, input_shape, frontend)
    _dump(dump_dir, 1, "import", mod)

    progress("[2/5] lowering quantized ops to integer kernels")
    index = 2
    for phase, pass_cls, key in INTEGER_PASSES:
        lower = pass_cls(target)
        mod = lower(mod)
        stats[key] = lower.rewritten
        _dump(dump_dir, index, phase, mod)
        index += 1

    progress("[3/5] lowering the remaining log quantizers to plain ops")
    mod = lower_log_quant(mod)
    hoist = HoistLoadTimeWeights()
    mod = hoist(mod)
    stats["load_time_weights"] = hoist.hoisted
    _dump(dump_dir, index, "log-quant", mod)

    progress("[4/5] fusing and scheduling the float ops")
    with target:
        mod = tvm.transform.Sequential(legalize_passes())(mod)
    return mod, target, stats


def compile_model(model, input_shape, preset: dict, dump_dir: str | None = None, progress=print,
                  frontend: str = "torch", tuning_log=None):
    """Compile a calibrated (fake-quant) PyTorch model for `preset`; returns (executable, stats).

    One `tvm.target.Target` (`targets.tvm_target`) is built here and handed to every integer pass, the float
    schedules and the final build.  `tuning_log` (a checked `tuning.log.TuningLog`) swaps in its tuned
    kernels before the defaults schedule the rest.
    """
    t0 = time.time()
    mod, target, stats = lower_to_kernels(model, input_shape, preset, dump_dir, progress, frontend)
    if tuning_log is not None:
        mod, swapped = tuning_log.apply(mod, target)
        stats["tuned_kernels"] = len(swapped)
    with target:
        mod = schedule_float_ops()(mod)
    stats["unscheduled_kernels"] = unscheduled(mod)
    _dump(dump_dir, len(INTEGER_PASSES) + 3, "fused-scheduled", mod)  # after import, passes, log quant

    progress(f"[5/5] building for {preset['name']}")
    executable = tvm.compile(mod, target=target, relax_pipeline=lower_pipeline(target))
    stats["compile_seconds"] = round(time.time() - t0, 1)
    return executable, stats
