"""How tuning candidates are built and timed: in this process, on this machine or on a board over RPC.

MetaSchedule's `LocalBuilder` starts a fresh pool of worker processes for every batch of candidates and
each worker imports TVM's tensor-intrinsic registry (`tvm.s_tir.tensor_intrin`, ~30 s here, longer than
the builder's default time-out), so with it every batch paid half a minute before the first build.  Our
candidates are single kernels whose intrinsics are already inlined by tensorize: `InProcessBuilder`
compiles them with the same TVM in this process (tens of milliseconds each) and exports them as the
runner needs: a tar of objects locally, a shared library linked by the target's cross compiler for a
board.  Timing stays in MetaSchedule's runners (a persistent local worker, or `RPCRunner`).
"""

from __future__ import annotations

import functools
import os
import tempfile

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

from ..deploy import cross



@derived_object
class InProcessBuilder(PyBuilder):
    """Builds every candidate in this process: a tar of objects for the local runner, or (``preset`` given,
    for a board) a shared library linked by the preset's compiler (`deploy.cross`), as the board loads it."""

    def __init__(self, preset: dict | None = None):
        super().__init__()
        self.preset = preset
        if preset is not None:
            cross.fcompile_for(preset)  # a missing cross compiler fails now, not at every trial

    def _export(self, rt_mod) -> str:
        folder = tempfile.mkdtemp(prefix="repq-cand-")  # MetaSchedule removes each artifact's folder
        if self.preset is not None:
            path = os.path.join(folder, "cand.so")
            rt_mod.export_library(path, fcompile=cross.fcompile_for(self.preset))  # fresh: TVM's cc keeps options
        else:
            from tvm.support.tar import tar

            path = os.path.join(folder, "cand.tar")
            rt_mod.export_library(path, fcompile=tar)
        return path

    def build(self, build_inputs):
        results = []
        for item in build_inputs:
            try:
                results.append(BuilderResult(self._export(tvm.tirx.build(item.mod, target=item.target)), None))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to build is a failed trial
                results.append(BuilderResult(None, f"build failed: {exc}"))
        return results


def light_intrinsic_registry(arch: str) -> None:
    """Register only TVM's tensor intrinsics for ``arch`` ("x86_64" or "aarch64"), not the whole registry.

    `ms.TuneContext` imports `tvm.s_tir.tensor_intrin`, whose package import parses every intrinsic of
    every backend (CUDA, ROCm, Hexagon, ...) from TVMScript: ~30 s in a process that has torch loaded
    (TVMScript's parser walks `inspect.stack()`, which scans all loaded modules), once per `tune` run and,
    with MetaSchedule's `LocalBuilder`, in every worker of every batch.  The CPU rules of a target look up
    only their own architecture's intrinsics: the package is entered without running its ``__init__``.
    """
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        sys.modules[name] = stub
    if arch == "aarch64":
        import tvm.s_tir.tensor_intrin.arm_cpu  # noqa: F401
    else:
        import tvm.s_tir.tensor_intrin.x86  # noqa: F401


EVALUATOR = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)


def _direct_session(host: str, port: int, session_timeout: int, _config):
    """`RPCRunner`'s session factory for one server reached directly (no tracker)."""
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=session_timeout)


def make_runner(preset: dict, rpc: dict | None = None, timeout_sec: float = 60.0):
    """A local runner (one persistent worker process), or MetaSchedule's `RPCRunner` on a board: a free one of
    ``rpc["key"]`` at the tracker ``rpc["tracker"]`` ("HOST:PORT"), or the server ``rpc["host"]`` directly.
    One bounded session checks first that it is reachable and can run ``preset`` (`deploy.rpc`: a clear error,
    never a hang)."""
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=EVALUATOR)
    from ..deploy import rpc as rpc_mod
    from ..errors import ReqError

    timeout = rpc.get("timeout") or rpc_mod.DEFAULT_TIMEOUT
    session, info = rpc_mod.open_session(rpc=rpc.get("host"), tracker=rpc.get("tracker"), key=rpc.get("key"),
                                         timeout=timeout)
    with rpc_mod.remote_errors("checking the board", info["server"]):
        problem = rpc_mod.remote_problem(preset, rpc_mod.remote_machine(session))
    del session  # the server takes its next client (the runner's workers)
    if problem:
        raise ReqError(f"the board at {info['server']} cannot run {preset['name']}: {problem}")
    seconds = int(max(timeout_sec, timeout))
    if rpc.get("tracker"):
        host, port = rpc_mod.parse_address(rpc["tracker"])
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc["key"],
                                     session_timeout_sec=seconds)
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=EVALUATOR, max_workers=1)
    host, port = rpc_mod.parse_address(rpc["host"])
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key="direct",  # required, unused:
                                 session_timeout_sec=seconds)  # the session factory connects to the server
    return ms.runner.RPCRunner(rpc_config=config,
                               evaluator_config=EVALUATOR, max_workers=1,
                               f_create_session=functools.partial(_direct_session, host, port, seconds))


def builder_for(preset: dict, remote: bool) -> InProcessBuilder:
    return InProcessBuilder(preset if remote else None)
