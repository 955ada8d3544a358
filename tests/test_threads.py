"""TVM's thread pool: every available CPU by default (TVM alone takes half of them on x86), the user's
TVM_NUM_THREADS respected, explicit counts honoured or refused by message; outputs do not depend on it."""

import os
import subprocess
import sys

import pytest

from repq_tvm.deploy import threads

CPUS = sorted(os.sched_getaffinity(0))


def _pool_size(env_extra: dict, cpus=None, code: str = "") -> str:
    """Start a fresh interpreter (its own TVM pool) pinned to `cpus` (default: this process's CPUs when the module
    was imported: a TVM pool shrunk to fewer threads in this process pins the main thread, and children inherit
    that mask) and print its pool size."""
    cpus = cpus or CPUS
    # without the thread-count variables, and without the TVM_BIND_THREADS=0 of the test workers (conftest)
    env = {k: v for k, v in os.environ.items() if k not in (*threads.ENV_VARS, "TVM_BIND_THREADS")}
    env.update(env_extra)
    script = code or "import repq_tvm\nfrom repq_tvm.deploy import threads\nprint(threads.pool_threads())"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_default_is_every_cpu_of_the_affinity_mask():
    assert _pool_size({}) == str(len(CPUS))
    assert _pool_size({}, cpus=CPUS[:1]) == "1"
    if len(CPUS) >= 2:  # TVM's own default would give 1 here on x86 (half the logical CPUs)
        assert _pool_size({}, cpus=CPUS[:2]) == "2"


def test_users_environment_wins():
    assert _pool_size({"TVM_NUM_THREADS": "1"}) == "1"
    assert _pool_size({"OMP_NUM_THREADS": "1"}) == "1"


def test_workers_spin_briefly_unless_the_user_says():
    """`threads.limit_spinning`: importing repq_tvm (and device_run on a board) caps how long TVM's idle workers spin,
    unless the user set TVM_THREAD_POOL_SPIN_COUNT; the pool still runs."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    code = ("import os, repq_tvm\nfrom repq_tvm.deploy import threads\nthreads.pool_threads()\n"
            "print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])")
    for user, expected in ((None, str(threads.SPIN_COUNT)), ("0", "0"), ("300000", "300000")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**env, **({"TVM_THREAD_POOL_SPIN_COUNT": user} if user else {})})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[-1] == expected
    device = os.path.join(os.path.dirname(threads.__file__), "device_run.py")
    code = (f"import os, runpy\nrunpy.run_path({device!r})['use_all_cpus']()\n"
            "print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == str(threads.SPIN_COUNT)


def test_explicit_counts_shrink_regrow_and_refuse_growth_past_the_pool():
    n = len(CPUS)
    code = f"""
from repq_tvm.deploy import threads
from repq_tvm.errors import ReqError
print(threads.configure(None), threads.configure(1), threads.configure(None), threads.configure(1),
      threads.configure({n}))
try:
    threads.configure({n + 1})
except ReqError as exc:
    print(exc)
try:
    threads.configure(0)
except ReqError as exc:
    print(exc)
"""
    lines = _pool_size({}, code=code).splitlines()
    assert lines[0] == f"{n} 1 {n} 1 {n}"
    assert lines[1] == (f"TVM's thread pool started with {n} thread(s) in this process and cannot grow to {n + 1}: "
                        f"set TVM_NUM_THREADS={n + 1} before the first run")
    assert lines[2] == "threads must be in [1, 1024], got 0"


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to see a shrunk pool pin its process")
def test_a_shrunk_pool_leaves_the_process_on_all_its_cpus():
    """configure(1) used to bind the caller to CPU 0 (TVM binds a shrunk pool), for the rest of the process."""
    code = """
import os
from repq_tvm.deploy import threads
for n in (None, 1, None):
    threads.configure(n)
    print(sorted(os.sched_getaffinity(0)))
"""
    assert _pool_size({}, code=code).splitlines() == [str(CPUS)] * 3


@pytest.fixture(scope="module")
def artifact(vit_host_build):
    return vit_host_build[1]


def test_logits_do_not_depend_on_the_thread_count(artifact):
    """One thread and every CPU of the mask give equal logits (in a fresh interpreter: this one's pool may have
    been started smaller, e.g. one thread per pytest-xdist worker)."""
    n = len(CPUS)
    code = f"""
import numpy as np
from repq_tvm.deploy import threads
from repq_tvm.deploy.runtime import Runner
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
every = Runner({artifact!r})
assert every.threads == {n} and threads.pool_threads() == {n}, every.threads
y = every(x)
one = Runner({artifact!r}, threads=1)
assert one.threads == 1
print(np.array_equal(one(x), y), np.array_equal(Runner({artifact!r}, threads={n})(x), y))
"""
    assert _pool_size({}, code=code) == "True True"


def test_cli_threads_option(artifact, capsys):
    import json

    from repq_tvm.cli import main

    assert main(["profile", artifact, "--repeat", "2", "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 1
    assert main(["profile", artifact, "--repeat", "2", "--json"]) == 0  # back to the default
    assert json.loads(capsys.readouterr().out)["threads"] == threads.configure(None)
