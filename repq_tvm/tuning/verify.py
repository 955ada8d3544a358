"""Check a tuned kernel against its definition before it may be accepted.

MetaSchedule can return wrong kernels without an error (e.g. a tensorized strided view), so every
candidate is run on seeded inputs and compared with its *definition*, the unscheduled PrimFunc compiled
for this CPU with TVM's plain lowering: the same TE compute the kernel tests tie to
`repq_tvm.reference.ops`.  Integer kernels must match bit for bit (epilogue scale 1 and bias 0, so the
float output is the int32 sum itself), float kernels within float32 reordering error, their code outputs
off by at most one on a few elements, the log√2 weights (integer outputs of a float softmax) equal on all
but 0.1%.

A candidate for a target this CPU cannot run (an aarch64 board, VNNI on an AVX2 host) is checked here
too: its trace is replayed with every repq tensor intrinsic swapped for its plain-loop twin
(`spaces.replay`) and built for this CPU; float kernels are built for this CPU as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.s_tir import Schedule

from .. import targets
from ..kernels.epilogue import quantizer_args
from ..kernels.packing import code_bounds
from . import spaces

HOST = None  # resolved lazily: the `host` preset's target


def _host_target():
    global HOST
    if HOST is None:
        HOST = targets.tvm_target("host")
    return HOST


def _params(func: tvm.tirx.PrimFunc) -> list[tuple[str, tuple[int, ...], str]]:
    return [(p.name, tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params]  # params are buffers


def _int_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def _bounds(spec: dict | None, name: str, dtype: str) -> tuple[int, int]:
    """Inputs an integer kernel is exact for: codes within their bit widths (`packing.code_bounds`)."""
    lo, hi = _int_range(dtype)
    if spec is None or spec.get("kind") != "qdense":
        return max(lo, -1000), min(hi, 1000)
    a_max, w_max = code_bounds(spec["bits_a"], spec["bits_w"])
    if name == "A":
        return (0, a_max) if dtype == "uint8" else (max(lo, -a_max), min(hi, a_max))
    if name == "W":
        return max(lo, -w_max), min(hi, w_max)
    return max(lo, -1000), min(hi, 1000)


def random_args(func: tvm.tirx.PrimFunc, spec: dict | None, seed: int = 0) -> list[np.ndarray]:
    """Inputs for every parameter but the last (the output), extremes included; outputs zeroed."""
    rng = np.random.default_rng(seed)
    params = _params(func)
    args = []
    for i, (name, shape, dtype) in enumerate(params):
        if spec is not None and name == "quant":  # run-time quantizers (GELU → codes, q/k/v): valid ones, codes spread
            one = quantizer_args(64.0, 128)
            if spec.get("column_codes"):  # one per column, [3, N] (`qdense` column_codes)
                one = one[:, None]
            args.append(np.ascontiguousarray(np.broadcast_to(one, shape)))
        elif i == len(params) - 1 or (spec is not None and name in ("scale", "bias")):
            fill = {"scale": 1, "bias": 0}.get(name, 0) if i < len(params) - 1 else 0
            args.append(np.full(shape, fill, dtype))
        elif dtype.startswith("float"):
            args.append(rng.standard_normal(shape).astype(dtype))
        else:
            lo, hi = _bounds(spec, name, dtype)
            x = rng.integers(lo, hi + 1, shape)
            flat = x.reshape(-1)
            flat[: flat.size // 8] = hi  # a run of extreme codes: the sums a saturating kernel would get wrong
            flat[flat.size // 8: flat.size // 4] = lo
            args.append(x.astype(dtype))
    return args


def _run(mod: tvm.IRModule, target, args: list[np.ndarray]) -> list[np.ndarray]:
    lib = tvm.compile(mod, target=target)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors]


def runnable_here(target) -> bool:
    return targets.runnable_reason(target) is None


def expected_outputs(definition: tvm.IRModule, spec: dict | None, seed: int = 0):
    """(inputs, outputs) of the definition compiled plainly for this CPU."""
    func = definition["main"]
    args = random_args(func, spec, seed)
    return args, _run(definition, _host_target(), args)


def candidate_mod(sch: Schedule, definition: tvm.IRModule, target) -> tuple[tvm.IRModule, object]:
    """(module, target) that runs ``sch``'s kernel on this CPU: itself, or its portable twin."""
    if runnable_here(target):
        return sch.mod, target
    if spaces.spec_of(definition["main"]) is not None:
        return spaces.replay(definition["main"], sch.trace, ref=True).mod, _host_target()
    return sch.mod, _host_target()


def check(sch: Schedule, definition: tvm.IRModule, target, seed: int = 0) -> str | None:
    """None if the scheduled kernel agrees with its definition, else why not (one line)."""
    func = definition["main"]
    spec = spaces.spec_of(func)
    args, want = expected_outputs(definition, spec, seed)
    try:
        mod, where = candidate_mod(sch, definition, target)
        got = _run(mod, where, args)
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built or run is rejected
        return f"cannot build or run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    out = len(args) - 1
    if spec is not None and spaces.exact(spec):  # integer kernel: bit for bit, its output is the exact sum here
        return _integer_verdict(want[out], got[out], exact=True)
    if spec is not None:  # integer outputs of float sums (`spaces._LogWeights`): equal but on a few
        bad = float((want[out] != got[out]).mean())
        return None if bad <= 1e-3 else f"{bad:.2%} of outputs differ from the definition"
    return _float_verdict(want[out], got[out])


def _integer_verdict(want: np.ndarray, got: np.ndarray, exact: bool) -> str | None:
    diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
    if exact:
        bad = int((diff != 0).sum())
        return None if bad == 0 else f"{bad} of {want.size} outputs differ from the definition (max {diff.max():g})"
    if diff.max(initial=0) > 1 or (diff > 0).mean() > 1e-3:
        return f"codes differ from the definition on {(diff > 0).mean():.2%} of outputs (max {diff.max():g})"
    return None


def _float_verdict(want: np.ndarray, got: np.ndarray) -> str | None:
    if want.dtype.kind in "iu":
        return _integer_verdict(want, got, exact=False)
    w, g = want.astype(np.float64), got.astype(np.float64)
    if not np.isfinite(g[np.isfinite(w)]).all():
        return "non-finite outputs where the definition's are finite"
    tol = 1e-4 * (1 + np.abs(w[np.isfinite(w)]).max(initial=0))
    err = np.abs(w - g)[np.isfinite(w)].max(initial=0)
    return None if err <= tol else f"max error {err:.3g} > {tol:.3g} against the definition"
