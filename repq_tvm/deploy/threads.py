"""TVM's CPU thread pool: by default every CPU this process may use.

TVM sizes its pool once per process, on first use, from ``TVM_NUM_THREADS`` (else ``OMP_NUM_THREADS``, else
*half* the logical CPUs on x86, on the assumption that they are hyper-threads). On a 2-vCPU cloud VM that is
one thread, and an artifact ran at half speed (DeiT-Small W8/A8: 57 ms instead of 28 ms on a Zen 4). So
importing `repq_tvm` sets ``TVM_NUM_THREADS`` to the CPUs of this process's affinity mask when the user set
neither variable (`use_all_cpus`), and `configure` picks an explicit count for a `Runner`.

Its workers also spin after every parallel kernel, 300,000 ``sched_yield`` calls by default, before they sleep:
after each run of an artifact one core stayed busy for ~150 ms, taken from whatever the application does between
inferences (`benchmarks/spin.py`, DeiT-Small W8/A8 on a 2-vCPU Zen 4: 150 ms of CPU in the 200 ms after a 15 ms
inference).  Importing `repq_tvm` sets ``TVM_THREAD_POOL_SPIN_COUNT`` to `SPIN_COUNT` unless the user set it
(`limit_spinning`): 15 ms of CPU after a run and the same latency (the gaps between one run's kernels are
microseconds); without spinning (0) runs were 7-17% slower.
"""

from __future__ import annotations

import os

from ..errors import ReqError

ENV_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
MAX_THREADS = 1024
_BIG_CORES = 1  # TVM's AffinityMode kBig, the mode its pool starts in
_written: str | None = None  # the TVM_NUM_THREADS value this module set, to tell it from the user's
SPIN_COUNT = 30000  # TVM_THREAD_POOL_SPIN_COUNT unless the user set it (see above)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset / cgroup cpusets), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _set(threads: int) -> None:
    global _written
    _written = os.environ["TVM_NUM_THREADS"] = str(threads)


def use_all_cpus() -> None:
    """Every available CPU, unless the user chose with an environment variable (call before the pool starts)."""
    global _written
    if _written is not None and os.environ.get("TVM_NUM_THREADS") == _written:
        del os.environ["TVM_NUM_THREADS"]  # ours, from an earlier explicit count: back to the default
        _written = None
    if not any(os.environ.get(v, "").strip() for v in ENV_VARS):
        _set(available_cpus())


def limit_spinning() -> None:
    """Workers that stop spinning ~15 ms after a run instead of ~150 ms, unless the user set
    ``TVM_THREAD_POOL_SPIN_COUNT`` (read when the pool starts: call before the first run)."""
    if not os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "").strip():
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(SPIN_COUNT)


def pool_threads() -> int:
    """Threads of TVM's pool in this process (starts the pool if it has not started)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def configure(threads: int | None = None) -> int:
    """Run this process's TVM kernels on `threads` threads and return the count; None: every available CPU,
    or what ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` say.

    TVM reads the variable when its pool starts (the pool's size for good) and at every parallel launch, and
    `runtime.config_threadpool` sets how many of the pool's workers run. So a started pool can use fewer of
    its workers, or again all of them, but not more: asking for more is an error, not a silent slowdown.

    A pool configured to fewer threads than the CPUs binds its threads, the caller's own included, to the
    first CPUs: ``configure(1)`` left the whole process (PyTorch, everything after it, even a pool grown back
    to all CPUs) on CPU 0.  So below the CPU count this sets ``TVM_BIND_THREADS=0`` (no binding) unless the
    user set that variable.
    """
    import tvm

    if threads is None:
        use_all_cpus()
    elif not 1 <= threads <= MAX_THREADS:
        raise ReqError(f"threads must be in [1, {MAX_THREADS}], got {threads}")
    else:
        _set(threads)
        if threads < available_cpus():
            os.environ.setdefault("TVM_BIND_THREADS", "0")
    pool_threads()  # starts the pool if needed, sized by the variable
    tvm.get_global_func("runtime.config_threadpool")(_BIG_CORES, threads or 0)  # 0: as many as the variable says
    n = pool_threads()
    if threads is not None and n != threads:
        raise ReqError(f"TVM's thread pool started with {n} thread(s) in this process and cannot grow to "
                       f"{threads}: set TVM_NUM_THREADS={threads} before the first run")
    return n
