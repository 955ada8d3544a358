"""Atomic outputs: an interrupted write keeps the previous file or artifact; nothing temporary is left."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from repq_tvm import atomic
from repq_tvm.errors import ReqError


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith(atomic.TEMP_PREFIX)]


def test_file_is_replaced_only_on_success(tmp_path):
    out = tmp_path / "sub" / "m.repq"
    with atomic.atomic_file(str(out)) as tmp:
        open(tmp, "w").write("v1")
    assert out.read_text() == "v1"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_file(str(out)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert out.read_text() == "v1" and not _leftovers(out.parent)


def test_folder_is_swapped_whole(tmp_path):
    out = tmp_path / "art"
    for version in ("v1", "v2"):
        with atomic.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model.so"), "w").write(version)
    assert (out / "model.so").read_text() == "v2" and not _leftovers(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model.so"), "w").write("half")
            raise KeyboardInterrupt
    assert (out / "model.so").read_text() == "v2" and not _leftovers(tmp_path)


def test_unwritable_destinations_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReqError, match="cannot create the output folder"):
        with atomic.atomic_file(str(tmp_path / "file" / "m.repq")):
            pass
    with pytest.raises(ReqError, match="is a folder"):
        with atomic.atomic_file(str(tmp_path)):
            pass
    with pytest.raises(ReqError, match="exists and is not a folder"):
        with atomic.atomic_dir(str(tmp_path / "file")):
            pass


def test_full_disk_keeps_the_previous_file(tmp_path):
    """A write into a full tmpfs: ENOSPC is one clear error, the previous file stays, no temp is left."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        out = mnt / "m.repq"
        with atomic.atomic_file(str(out)) as tmp:
            open(tmp, "wb").write(b"old" * 100)
        with pytest.raises(ReqError, match="no space left"):
            with atomic.atomic_file(str(out)) as tmp:
                open(tmp, "wb").write(os.urandom(1 << 20))
        assert out.read_bytes() == b"old" * 100 and not _leftovers(mnt)
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.fixture(scope="module")
def w4_artifact_and_w8_file(vit_host_build, tmp_path_factory):
    """A W4 artifact (the shared ViT fixture build, copied per test) and a W8 calibrated file of the ViT fixture."""
    from repq_tvm.cli import main

    cal = str(tmp_path_factory.mktemp("atomic") / "w8.repq")
    assert main(["calibrate", "--model", "vit_cifar10", "--calib-size", "8", "--w-bits", "8", "--a-bits", "8",
                 "-o", cal, "--quiet"]) == 0
    return vit_host_build[1], cal


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_compile_leaves_the_previous_artifact_loadable(sig, tmp_path, w4_artifact_and_w8_file):
    """A compile of another model into ART, interrupted while it writes: ART is still the earlier artifact,
    whole and verified. Ctrl-C also removes its temporary folder (SIGKILL cannot clean up)."""
    from repq_tvm.deploy.artifact import read_manifest

    art, w8 = str(tmp_path / "art"), w4_artifact_and_w8_file[1]
    shutil.copytree(w4_artifact_and_w8_file[0], art)
    before = read_manifest(art)
    # the compile pauses right after it has written the new library into its temporary folder (a marker file
    # says so): the signal lands mid-write every time, not by a race with a fast export
    mark = tmp_path / "writing"
    hook = ("import os, sys, time\n"
            "from repq_tvm.deploy import artifact\n"
            "digest = artifact.sha256\n"
            "def paused(path):\n"
            "    open(os.environ['REPQ_TEST_MARK'], 'w').close()\n"
            "    for _ in range(3000):\n"  # short sleeps: a signal taken by another thread (TVM's pool) is
            "        time.sleep(0.1)\n"   # handled by the main thread at its next bytecode, not mid-sleep

            "    return digest(path)\n"
            "artifact.sha256 = paused\n"
            "from repq_tvm.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", hook, "compile", w8, "--target", "x86_64-avx2", "-o", art,
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "REPQ_TEST_MARK": str(mark)},
                            # as from a terminal: a shell without job control starts background jobs (a CI step
                            # run with `&`) with SIGINT ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not mark.exists():
        time.sleep(0.05)
    assert mark.exists() and _leftovers(tmp_path), f"the compile never reached its write (exit {proc.poll()})"
    proc.send_signal(sig)
    proc.wait()
    after = read_manifest(art)  # hashes verified
    assert after["w_bits"] == 4 and after["files"] == before["files"]
    assert bool(_leftovers(tmp_path)) == (sig == signal.SIGKILL)


def test_outputs_get_the_umask_mode_not_the_temporary_one(tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700; the finished file and folder are what open() / mkdir() would make."""
    mask = os.umask(0o022)
    try:
        with atomic.atomic_file(str(tmp_path / "m.repq")) as tmp:
            open(tmp, "w").write("v1")
        with atomic.atomic_dir(str(tmp_path / "art")) as tmp:
            open(os.path.join(tmp, "model.so"), "w").write("v1")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.repq").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o755
