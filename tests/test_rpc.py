"""Artifacts on boards over TVM's RPC, on loopback: a tracker and two servers (one registered with the tracker under
a key, one reached directly) run on 127.0.0.1 in subprocesses, started before the fixture model compiles and killed
when the module ends.

Logits over RPC are bit-identical to the local `Runner`, `profile` reports the latency measured on the server,
and every way of not getting a board (closed port, silent tracker or server, wrong key) is one clear line within
the time-out. The opt-in (`-m slow`) test sends an aarch64 artifact to TVM's RPC server running under
qemu-aarch64-static from the aarch64 sysroot and compares its logits with the x86 build's.
"""

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from repq_tvm import data, models
from repq_tvm.cli import main
from repq_tvm.deploy import qemu, rpc
from repq_tvm.deploy.runtime import Runner
from repq_tvm.errors import ReqError
from repq_tvm.evaluate import load_batch, make_transform

KEY = "repq-test"
QEMU_KEY = "repq-test-aarch64"
SERVER_THREADS = 2  # TVM_NUM_THREADS of the loopback servers
START_SECONDS = 90  # bound on a service's start-up (loaded machine); qemu gets more
QEMU_START_SECONDS = 240


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick, released again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """Subprocesses started by this module, each in its own process group (TVM's servers start workers and one
    process per session): `stop` kills those groups, by the ids recorded here."""

    def __init__(self, root):
        self.root, self.procs = str(root), []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log")) as f:
            return f.read()[-2000:]

    def wait(self, ready, what: str, timeout: float) -> None:
        """Poll `ready()` (bounded); fail with the services' logs if it never holds or a service died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [name for name, p in self.procs if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited while waiting for {what}:\n" +
                            "\n".join(f"--- {n}\n{self.log(n)}" for n in dead))
            time.sleep(0.25)
        pytest.fail(f"{what}: not ready within {timeout:g} s\n" +
                    "\n".join(f"--- {n}\n{self.log(n)}" for n, _ in self.procs))

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)


def tvm_exec(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"tvm.exec.{module}", *args]


def key_is_free(tracker: str, key: str):
    def ready() -> bool:
        try:
            return rpc.servers_by_key(rpc.tracker_summary(tracker, timeout=2)).get(key, {}).get("free", 0) > 0
        except ReqError:
            return False
    return ready


def port_open(port: int):
    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()  # a standalone server drops it
            return True
        except OSError:
            return False
    return ready


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("rpc")
    services = Services(root)
    try:
        t_port, s_port, d_port = free_port(), free_port(), free_port()
        tracker = f"127.0.0.1:{t_port}"
        env = {**os.environ, "TVM_NUM_THREADS": str(SERVER_THREADS)}
        # started first: they import TVM while the model compiles
        services.start("tracker", tvm_exec("rpc_tracker", "--host", "127.0.0.1", "--port", str(t_port),
                                           "--port-end", str(t_port + 1)))
        services.start("server", tvm_exec("rpc_server", "--tracker", tracker, "--key", KEY, "--host", "127.0.0.1",
                                          "--port", str(s_port), "--port-end", str(s_port + 1)), env)
        services.start("direct", tvm_exec("rpc_server", "--host", "127.0.0.1", "--port", str(d_port),
                                          "--port-end", str(d_port + 1)), env)
        cal, art = request.getfixturevalue("vit_host_build")  # built (if not yet) while the servers start
        services.wait(key_is_free(tracker, KEY), f"a server with key {KEY} at the tracker", START_SECONDS)
        services.wait(port_open(d_port), "the direct server", START_SECONDS)
        yield SimpleNamespace(root=root, cal=cal, art=art, tracker=tracker, server=f"127.0.0.1:{d_port}",
                              tracked_server=f"127.0.0.1:{s_port}", services=services)
    finally:
        services.stop()


def heldout(n: int, preprocessing: dict) -> np.ndarray:
    """`n` preprocessed held-out images spread over the whole pack (all classes)."""
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    idx = np.linspace(0, len(source) - 1, n).astype(int)
    x, _ = load_batch(source, idx, make_transform(preprocessing))
    return x.numpy()


def run_cli(capsys, argv):
    t0 = time.monotonic()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.strip(), time.monotonic() - t0


def assert_one_error(code, err, *fragments):
    assert code == 2 and "\n" not in err and err.startswith("repq-tvm: error: "), err
    for fragment in fragments:
        assert fragment in err, err


# --- logits and latency over RPC -----------------------------------------------------------------
def test_logits_over_tracker_and_direct_are_bit_identical_to_local(loopback):
    local = Runner(loopback.art)
    x = heldout(8, local.manifest["preprocessing"])
    expected = local.predict(x)
    for kw in ({"tracker": loopback.tracker, "key": KEY}, {"rpc": loopback.server}):
        with rpc.RemoteRunner(loopback.art, **kw) as remote:
            assert np.array_equal(remote.predict(x), expected), kw
            assert remote.remote["triple"].startswith("x86_64") and remote.remote["threads"] == SERVER_THREADS
            assert remote.remote["via"] == ("direct" if "rpc" in kw else f"tracker {loopback.tracker}")


def test_profile_over_the_tracker_reports_the_remote_latency(loopback, capsys):
    code, out, err, _ = run_cli(capsys, ["profile", loopback.art, "--rpc-tracker", loopback.tracker, "--rpc-key", KEY,
                                         "--repeat", "20", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["runs"] == 20 and result["batch"] == 1 and result["threads"] == SERVER_THREADS
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["remote"]["key"] == KEY and result["remote"]["via"] == f"tracker {loopback.tracker}"
    assert "time_evaluator on the RPC server" in result["method"] and "not over RPC" in result["breakdown"]
    assert "kernels" not in result  # the breakdown stays local
    code, out, err, _ = run_cli(capsys, ["profile", loopback.art, "--rpc", loopback.server, "--repeat", "5"])
    assert code == 0, err
    assert f"RPC server {loopback.server} (direct)" in out and "latency on the RPC server over 5 runs" in out, out


def test_run_over_rpc_prints_what_runs_locally(loopback, capsys, tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    with np.load(models.fixture_file(models.FIXTURE_EVAL_DATA)) as z:
        Image.fromarray(z["images"][3]).save(img)
    code, local, err, _ = run_cli(capsys, ["run", loopback.art, str(img), "--json"])
    assert code == 0, err
    code, remote, err, _ = run_cli(capsys, ["run", loopback.art, str(img), "--json", "--rpc", loopback.server])
    assert code == 0, err
    assert json.loads(remote) == json.loads(local)


def test_remote_threads_shrink_and_refuse_to_grow(loopback):
    with rpc.RemoteRunner(loopback.art, rpc=loopback.server, threads=1) as remote:
        assert remote.remote["threads"] == 1
        assert remote.latency(repeat=3)["threads"] == 1
    with pytest.raises(ReqError, match=rf"has {SERVER_THREADS} thread\(s\) and cannot grow to 3: .*TVM_NUM_THREADS=3"):
        rpc.RemoteRunner(loopback.art, rpc=loopback.server, threads=3)


# --- no board: one line, within the time-out -----------------------------------------------------
def test_tune_over_the_tracker_times_the_trials_on_the_board(loopback, capsys, tmp_path):
    """MetaSchedule's RPC runner measures every trial on a board of the key (here the loopback server)."""
    code, out, err, _ = run_cli(capsys, ["tune", loopback.cal, "--trials", "8", "-o", str(tmp_path / "log"),
                                         "--rpc-tracker", loopback.tracker, "--rpc-key", KEY, "--json", "--quiet"])
    assert code == 0, err
    result = json.loads(out)
    assert result["where"] == "rpc" and result["trials_this_run"] >= 1
    assert sum(r["trials"] for r in result["kernels"]) == result["trials_this_run"]
    loopback.services.wait(key_is_free(loopback.tracker, KEY), "the server back at the tracker", START_SECONDS)


@pytest.mark.slow
def test_tune_on_one_server_reached_directly(loopback, capsys, tmp_path):
    """--rpc HOST:PORT: MetaSchedule's RPC runner with our session factory (no tracker); one trial."""
    code, out, err, _ = run_cli(capsys, ["tune", loopback.cal, "--trials", "1", "-o", str(tmp_path / "direct"),
                                         "--rpc", loopback.server, "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["trials_this_run"] == 1


def test_unreachable_tracker_or_server_fails_at_once(loopback, capsys, tmp_path):
    closed = free_port()
    code, _, err, took = run_cli(capsys, ["tune", loopback.cal, "-o", str(tmp_path / "log"), "--rpc-tracker",
                                          f"127.0.0.1:{closed}", "--rpc-key", KEY, "--rpc-timeout", "5"])
    assert_one_error(code, err, f"cannot reach the RPC tracker at 127.0.0.1:{closed}: Connection refused")
    assert took < 10
    code, _, err, took = run_cli(capsys, ["profile", loopback.art, "--rpc-tracker", f"127.0.0.1:{closed}",
                                          "--rpc-key", KEY, "--rpc-timeout", "5"])
    assert_one_error(code, err, f"cannot reach the RPC tracker at 127.0.0.1:{closed}: Connection refused",
                     "tvm.exec.rpc_tracker")
    assert took < 5
    code, _, err, took = run_cli(capsys, ["run", loopback.art, "x.png", "--rpc", f"127.0.0.1:{closed}"])
    assert_one_error(code, err, f"cannot reach the RPC server at 127.0.0.1:{closed}: Connection refused")
    assert took < 5


def test_silent_tracker_and_server_time_out(loopback, capsys):
    """A port that accepts and never answers (here a listening socket nobody serves): no hang, the time-out."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        code, _, err, took = run_cli(capsys, ["profile", loopback.art, "--rpc-tracker", f"127.0.0.1:{port}",
                                              "--rpc-key", KEY, "--rpc-timeout", "1"])
        assert_one_error(code, err, f"127.0.0.1:{port} did not answer as an RPC tracker within 1 s")
        assert 1 <= took < 10
        code, _, err, took = run_cli(capsys, ["profile", loopback.art, "--rpc", f"127.0.0.1:{port}",
                                              "--rpc-timeout", "1"])
        assert_one_error(code, err, f"cannot open an RPC session with the server at 127.0.0.1:{port}: "
                                    "no answer within 1 s")
        assert 1 <= took < 10


def test_wrong_key_times_out_naming_the_keys_there(loopback, capsys):
    code, _, err, took = run_cli(capsys, ["profile", loopback.art, "--rpc-tracker", loopback.tracker,
                                          "--rpc-key", "no-such-board", "--rpc-timeout", "2"])
    assert_one_error(code, err, f"no free RPC server with key 'no-such-board' at the tracker {loopback.tracker} "
                                f"within 2 s: the keys there are {KEY} (1 server(s)")
    assert 2 <= took < 15


def test_a_tracker_server_reached_directly_says_how_to_reach_it(loopback, capsys):
    code, _, err, _ = run_cli(capsys, ["profile", loopback.art, "--rpc", loopback.tracked_server, "--rpc-timeout", "5"])
    assert_one_error(code, err, "serves a tracker's clients only", "--rpc-tracker HOST:PORT --rpc-key KEY")
    loopback.services.wait(key_is_free(loopback.tracker, KEY), "the server back at the tracker", START_SECONDS)


def test_tampered_artifact_is_refused_before_anything_is_sent(loopback, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(loopback.art, art)
    lib = bytearray((art / "model.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (art / "model.so").write_bytes(bytes(lib))
    with pytest.raises(ReqError, match="does not match its SHA-256"):  # not a connection error: checked first
        rpc.RemoteRunner(str(art), rpc=f"127.0.0.1:{free_port()}")


# --- units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["profile", "{art}", "--rpc-tracker", "127.0.0.1:9190"], "--rpc-tracker needs --rpc-key KEY"),
    (["profile", "{art}", "--rpc-key", "rpi4"], "--rpc-key goes with --rpc-tracker HOST:PORT"),
    (["run", "{art}", "x.png", "--rpc", "127.0.0.1:9090", "--rpc-key", "rpi4"], "directly, without a key"),
    (["profile", "{art}", "--rpc-timeout", "5"], "--rpc-timeout applies only with --rpc or --rpc-tracker"),
    (["profile", "{art}", "--rpc", "127.0.0.1:9090", "--plot", "{tmp}/p.png"], "--plot draws the per-kernel"),
    (["profile", "{art}", "--rpc", "127.0.0.1:9090", "--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "k"],
     "argument --rpc-tracker: not allowed with argument --rpc"),
], ids=["tracker-without-key", "key-without-tracker", "key-with-rpc", "timeout-alone", "plot", "both"])
def test_rpc_option_combinations_are_checked_first(capsys, tmp_path, argv, message):
    """Before the artifact is read (here it does not exist) or anything connects."""
    code, _, err, _ = run_cli(capsys, [a.format(art=tmp_path / "absent", tmp=tmp_path) for a in argv])
    assert_one_error(code, err, message)


@pytest.mark.parametrize("text,expected", [("127.0.0.1:9190", ("127.0.0.1", 9190)), (" board:1 ", ("board", 1)),
                                           ("[::1]:9090", ("::1", 9090)), ("h:65535", ("h", 65535))])
def test_parse_address(text, expected):
    assert rpc.parse_address(text) == expected


@pytest.mark.parametrize("text,message", [("", "expected HOST:PORT"), ("board", "expected HOST:PORT"),
                                          (":9190", "expected HOST:PORT"), ("a b:1", "expected HOST:PORT"),
                                          ("h:0", r"must be an integer in \[1, 65535\]"),
                                          ("h:65536", "must be an integer"), ("h:x", "must be an integer")])
def test_parse_address_refuses(text, message):
    with pytest.raises(ReqError, match=message):
        rpc.parse_address(text)


def test_remote_problem_checks_architecture_and_features():
    from repq_tvm import targets

    dotprod, neon, x86 = targets.load("aarch64-neon-dotprod"), targets.load("aarch64-neon"), targets.load("x86_64-avx2")
    a72 = {"triple": "aarch64-unknown-linux-gnu", "cpu": "cortex-a72"}
    n1 = {"triple": "aarch64-unknown-linux-gnu", "cpu": "neoverse-n1"}
    assert "it is aarch64 code and the remote is x86_64" in rpc.remote_problem(
        dotprod, {"triple": "x86_64-pc-linux-gnu", "cpu": "znver4"})
    assert "Arm dot product" in rpc.remote_problem(dotprod, a72) and "cortex-a72" in rpc.remote_problem(dotprod, a72)
    assert rpc.remote_problem(neon, a72) is None and rpc.remote_problem(dotprod, n1) is None
    assert rpc.remote_problem(dotprod, {**a72, "cpu": "generic"}) is None  # qemu-user: LLVM cannot name the CPU
    assert rpc.remote_problem(x86, {"triple": None, "cpu": None}) is None  # a runtime-only TVM cannot tell
    assert "AVX2" in rpc.remote_problem(x86, {"triple": "x86_64-pc-linux-gnu", "cpu": "nehalem"})


# --- an aarch64 board, emulated ------------------------------------------------------------------
QEMU_IMAGES = 32  # as tests/test_aarch64.py


@pytest.fixture(scope="module")
def sysroot():
    """The aarch64 sysroot with TVM's RPC server and qemu-aarch64-static; skipped, with what is missing, before
    anything compiles."""
    if platform.machine() != "x86_64":
        pytest.skip("cross-compiles from an x86_64 host")
    path = os.path.abspath(qemu.default_sysroot())
    try:
        qemu.require_emulator("qemu-aarch64-static")
        qemu.check_rpc_sysroot(path)
    except ReqError as exc:
        pytest.skip(str(exc))
    return path


@pytest.mark.slow
def test_aarch64_artifact_over_rpc_under_qemu_matches_x86(sysroot, loopback, tmp_path):
    """TVM's RPC server from the aarch64 sysroot under qemu-aarch64-static, registered with the tracker like a
    board: the aarch64 build's logits agree with the x86 build's as in test_aarch64.py (there through the device
    runner). Emulated: nothing here is a latency."""
    cmd, env = qemu.rpc_server_command(str(tmp_path), free_port(), tracker=loopback.tracker, key=QEMU_KEY,
                                       sysroot=sysroot)
    loopback.services.start("qemu-server", cmd, env)  # imports TVM under emulation while the aarch64 build compiles
    art = str(tmp_path / "art-aarch64")
    assert main(["compile", loopback.cal, "--target", "aarch64-neon-dotprod", "-o", art, "--quiet"]) == 0
    loopback.services.wait(key_is_free(loopback.tracker, QEMU_KEY), "the qemu RPC server at the tracker",
                           QEMU_START_SECONDS)
    local = Runner(loopback.art)
    x = heldout(QEMU_IMAGES, local.manifest["preprocessing"])
    ref = local.predict(x)
    t0 = time.time()
    with rpc.RemoteRunner(art, tracker=loopback.tracker, key=QEMU_KEY, timeout=60) as remote:
        arm = remote.predict(x)
        machine = remote.remote
    wall = time.time() - t0
    assert machine["triple"].startswith("aarch64"), machine  # the emulated server, not this machine
    per_image = np.abs(arm - ref).max(1)
    exact_share = (per_image < 1e-4).mean()
    print(f"\naarch64 over RPC (qemu) vs x86 on {len(x)} images: bit-identical {np.array_equal(arm, ref)}, argmax "
          f"agree {(arm.argmax(1) == ref.argmax(1)).mean():.3f}, max |diff| {per_image.max():.2e}, share < 1e-4 "
          f"{exact_share:.3f}; emulated wall {wall:.1f} s (not a latency)")
    assert arm.shape == ref.shape
    assert (arm.argmax(1) == ref.argmax(1)).all()
    assert exact_share >= 0.9, exact_share
    assert per_image.max() < 0.5, per_image.max()
