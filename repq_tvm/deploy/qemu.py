"""Run an aarch64 artifact on this x86 machine under user-mode QEMU, through the device runner.

    logits = run_under_qemu(art_dir, x, sysroot)

executes `qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3 device_run.py ART_DIR in.npy out.npy` with the
aarch64 wheels (TVM, NumPy) from SYSROOT/opt/pywheels: exactly what would run on an ARM board, emulated. The
sysroot comes from `make aarch64-sysroot` (scripts/aarch64_sysroot.sh). Emulated timings mean nothing.

`rpc_server_command` starts TVM's own RPC server (`python3 -m tvm.exec.rpc_server`) from the same sysroot under
QEMU: an emulated board that `repq_tvm.deploy.rpc` sends artifacts to, as it would a real one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile

import numpy as np

from ..errors import ReqError
from . import artifact

DEVICE_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_run.py")
WHEELS_SUBDIR = os.path.join("opt", "pywheels")  # where scripts/aarch64_sysroot.sh installs the wheels
SYSROOT_ENV = "REPQ_TVM_AARCH64_SYSROOT"
_DEBIAN_PACKAGES = {"qemu-aarch64-static": "qemu-user-static"}


def default_sysroot() -> str:
    """$REPQ_TVM_AARCH64_SYSROOT, else the repo's runs/aarch64-sysroot (where `make aarch64-sysroot` builds it)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get(SYSROOT_ENV) or os.path.join(repo, "runs", "aarch64-sysroot")


def check_sysroot(sysroot: str) -> None:
    hint = f"build one with `make aarch64-sysroot` (scripts/aarch64_sysroot.sh {sysroot})"
    if not os.path.isdir(sysroot):
        raise ReqError(f"no aarch64 sysroot at {sysroot}: {hint}")
    if not os.path.exists(os.path.join(sysroot, "usr", "bin", "python3")):
        raise ReqError(f"aarch64 sysroot {sysroot} has no usr/bin/python3 (incomplete): {hint}")
    if not os.path.isdir(os.path.join(sysroot, WHEELS_SUBDIR, "tvm")):
        raise ReqError(f"aarch64 sysroot {sysroot} lacks the TVM wheels in {WHEELS_SUBDIR}: {hint}")


def check_rpc_sysroot(sysroot: str) -> None:
    """`check_sysroot`, and the wheels TVM's RPC server imports (cloudpickle; sysroots built before it lack it)."""
    check_sysroot(sysroot)
    if not os.path.isdir(os.path.join(sysroot, WHEELS_SUBDIR, "cloudpickle")):
        raise ReqError(f"aarch64 sysroot {sysroot} lacks cloudpickle, which TVM's RPC server needs: "
                       f"run `make aarch64-sysroot` again (scripts/aarch64_sysroot.sh {sysroot})")


def require_emulator(runner: str) -> str:
    """`runner` (e.g. qemu-aarch64-static), which must be on PATH; its Debian package is named if not."""
    if shutil.which(runner) is None:
        package = _DEBIAN_PACKAGES.get(runner, "qemu-user-static" if runner.startswith("qemu-") else runner)
        raise ReqError(f"{runner} is not on PATH: install the Debian package {package} (as root: make aarch64-tools)")
    return runner


def runner_for(manifest: dict) -> str:
    """The emulator named by the artifact's target preset, which must be on PATH."""
    preset = manifest["target"]
    runner = preset.get("runner")
    if not runner:
        raise ReqError(f"target {preset['name']} names no emulator runner; run the artifact natively")
    return require_emulator(runner)


def guest_env(sysroot: str) -> dict:
    """This process's environment for the emulated python3: the sysroot's wheels, none of this venv's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "LD_", "QEMU_")) and k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(PYTHONPATH=os.path.join(sysroot, WHEELS_SUBDIR), PYTHONNOUSERSITE="1")
    return env


# Run tvm.exec.rpc_server as `python -m` would, with sys.executable replaced by the wrapper script (argv[1]).
_RPC_BOOT = ("import runpy, sys; sys.executable = sys.argv[1]; sys.argv = ['rpc_server'] + sys.argv[2:]; "
             "runpy.run_module('tvm.exec.rpc_server', run_name='__main__', alter_sys=True)")


def rpc_server_command(workdir: str, port: int, host: str = "127.0.0.1", tracker: str | None = None,
                       key: str | None = None, sysroot: str | None = None,
                       runner: str = "qemu-aarch64-static") -> tuple[list[str], dict]:
    """(argv, env) that start the sysroot's `python3 -m tvm.exec.rpc_server --host HOST --port PORT` under QEMU
    (registered with `tracker` under `key` if given); `workdir` receives a small launcher script.

    TVM's server runs its listener in a worker it starts with ``sys.executable`` (tvm.support.popen_pool). Without
    binfmt_misc this machine's kernel cannot execute the sysroot's aarch64 python3, so ``sys.executable`` becomes
    a shell script that runs that python3 under QEMU again (the emulated execve reaches the host kernel, which
    runs the script). Emulated timings mean nothing: use such a server for results, never for latency.
    """
    sysroot = os.path.abspath(sysroot or default_sysroot())
    check_rpc_sysroot(sysroot)
    emulator = shutil.which(require_emulator(runner))
    python = os.path.join(sysroot, "usr", "bin", "python3")
    wrapper = os.path.join(os.path.abspath(workdir), "python3-under-qemu")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(emulator)} -L {shlex.quote(sysroot)} {shlex.quote(python)} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    args = ["--host", host, "--port", str(port), "--port-end", str(port + 1)]  # that port or none
    if tracker:
        args += ["--tracker", tracker, "--key", key or ""]
    return [emulator, "-L", sysroot, python, "-c", _RPC_BOOT, wrapper, *args], guest_env(sysroot)


def run_under_qemu(art_dir: str, x: np.ndarray, sysroot: str | None = None, timeout: float = 1800,
                   info: dict | None = None) -> np.ndarray:
    """Logits of the (foreign-architecture) artifact for preprocessed images x [N, 3, H, W], computed in QEMU.

    `info`, if given, receives the device runner's report (machine, TVM version, load and run seconds).
    """
    sysroot = os.path.abspath(sysroot or default_sysroot())
    manifest = artifact.read_manifest(art_dir)
    runner = runner_for(manifest)
    check_sysroot(sysroot)
    env = guest_env(sysroot)
    with tempfile.TemporaryDirectory(prefix="repq-qemu-") as tmp:
        inp, out = os.path.join(tmp, "input.npy"), os.path.join(tmp, "logits.npy")
        np.save(inp, np.ascontiguousarray(x, dtype=np.float32))
        cmd = [runner, "-L", sysroot, os.path.join(sysroot, "usr", "bin", "python3"), DEVICE_RUNNER,
               os.path.abspath(art_dir), inp, out]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ReqError(f"{runner} did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
            raise ReqError(f"device runner failed under {runner}: {tail}")
        if info is not None:
            lines = proc.stdout.strip().splitlines()
            info.update(json.loads(lines[-1]) if lines else {})
        return np.load(out)
