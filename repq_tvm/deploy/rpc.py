"""Run an artifact on a board reached over TVM's RPC: through a tracker and a key, or one server directly.

    runner = RemoteRunner(art, tracker="10.0.0.2:9190", key="rpi4")    # or RemoteRunner(art, rpc="10.0.0.5:9090")
    logits = runner.predict(x)          # computed on the board, returned as NumPy
    runner.latency(repeat=50)           # time_evaluator on the board: median / p90 / min ms
    runner.close()                      # frees the board for the next client (a server runs one session at a time)

The artifact is verified first (manifest fields and SHA-256, `artifact.read_manifest`), then refused when the
remote cannot run it: its architecture (LLVM's triple there) differs from the target's, or LLVM names the
remote CPU and that CPU lacks a feature the target enables (a dot-product build on a Cortex-A72).

Every network step is bounded by `timeout`. TVM's own client retries a refused tracker for 60 s and then waits
forever for a free server (`TrackerSession.request`), so the tracker is asked here over a socket with a
time-out (TVM's wire format, `tvm.rpc.base`), and the session handshake (`tvm.rpc.connect`, C++ that blocks in
`connect()`) runs in a thread given the time that is left. `session_timeout` is the server's limit on a whole
session: the server ends a session that hangs.

Only the whole-model latency is measured remotely: `profile`'s per-kernel breakdown needs the VM's instrument
hook, which calls back into the Python process running the VM, so it stays local.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import numpy as np

from ..errors import ReqError
from . import artifact
from .runtime import Runner

DEFAULT_TIMEOUT = 30.0  # seconds to reach the tracker / server and to wait for a free board
SESSION_SECONDS = 1800  # the server ends a session after this long (0: never)
_UNKNOWN_CPUS = ("", "generic")  # LLVM's answer when it cannot name the CPU (e.g. under qemu-user)


# --- addresses -----------------------------------------------------------------------------------
def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT ("[::1]:9090" for IPv6) as (host, port); anything else is one clear ReqError."""
    text = (text or "").strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        raise ReqError(f"expected HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ReqError(f"the port of {text!r} must be an integer in [1, 65535]")
    return host, int(port)


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    """One line for an OS or TVM error: the last line of TVM's message (remote errors carry a header line)."""
    if isinstance(exc, socket.timeout):  # TimeoutError: the OS's "timed out", or `_bounded`'s own words
        return str(exc) or "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- the tracker, asked with a time-out ----------------------------------------------------------
def _tracker_socket(addr: tuple[str, int], timeout: float) -> socket.socket:
    """A connected tracker socket after TVM's magic handshake; refused / silent / not a tracker is a ReqError."""
    from tvm.rpc import base

    where = _label(*addr)
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as exc:
        raise ReqError(f"cannot reach the RPC tracker at {where}: {_reason(exc)} "
                       f"(is `python -m tvm.exec.rpc_tracker` running there?)") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as exc:
        sock.close()
        raise ReqError(f"{where} did not answer as an RPC tracker within {timeout:g} s: {_reason(exc)}") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise ReqError(f"{where} is not a TVM RPC tracker")
    return sock


def tracker_summary(tracker: str | tuple[str, int], timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The tracker's own summary: {"queue_info": {key: {"free", "pending"}}, "server_info": [{"key", "addr"}]}."""
    from tvm.rpc import base

    addr = parse_address(tracker) if isinstance(tracker, str) else tracker
    with _tracker_socket(addr, timeout) as sock:
        try:
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
        except (OSError, ValueError, TypeError) as exc:  # TypeError: not a [code, summary] pair
            raise ReqError(f"the RPC tracker at {_label(*addr)} gave no summary: {_reason(exc)}") from None
    if code != base.TrackerCode.SUCCESS:
        raise ReqError(f"the RPC tracker at {_label(*addr)} refused a summary")
    return summary


def servers_by_key(summary: dict) -> dict[str, dict]:
    """{key: {"servers": n, "free": n}} for every key with a registered server (the tracker's summary)."""
    keys: dict[str, dict] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":", 1)[-1]  # "server:rpi4" -> "rpi4"
        keys.setdefault(key, {"servers": 0, "free": 0})["servers"] += 1
    for key, entry in keys.items():
        entry["free"] = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    return keys


def _no_server_message(addr: tuple[str, int], key: str, timeout: float) -> str:
    head = f"no free RPC server with key '{key}' at the tracker {_label(*addr)} within {timeout:g} s"
    try:
        keys = servers_by_key(tracker_summary(addr, timeout=min(timeout, 5.0)))
    except ReqError:
        return head
    if key in keys:
        return f"{head}: its {keys[key]['servers']} server(s) with that key stayed busy"
    known = ", ".join(f"{k} ({v['servers']} server(s), {v['free']} free)" for k, v in sorted(keys.items()))
    return f"{head}: {'the keys there are ' + known if known else 'no server is registered there'}"


def request_server(tracker: tuple[str, int], key: str, timeout: float, priority: int = 1) -> tuple[str, int, str]:
    """(host, port, match key) of a free server with `key`, as the tracker hands it out; waits at most `timeout`."""
    from tvm.rpc import base

    deadline = time.monotonic() + timeout
    with _tracker_socket(tracker, timeout) as sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))  # connecting counts against the same time
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
            answer = base.recvjson(sock)  # the tracker answers when a server with the key is free
        except socket.timeout:
            raise ReqError(_no_server_message(tracker, key, timeout)) from None
        except (OSError, ValueError) as exc:
            raise ReqError(f"the RPC tracker at {_label(*tracker)} dropped the request: {_reason(exc)}") from None
    if not isinstance(answer, list) or answer[0] != base.TrackerCode.SUCCESS:
        raise ReqError(f"the RPC tracker at {_label(*tracker)} refused the request for key '{key}': {answer!r}")
    host, port, match_key = answer[1]
    return host, int(port), match_key


# --- the session ---------------------------------------------------------------------------------
def _bounded(fn, timeout: float):
    """fn() in a daemon thread, given `timeout` seconds (TVM's C++ connect releases the GIL and may block);
    TimeoutError if it is still running then, else fn's own result or exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            box["error"] = exc

    worker = threading.Thread(target=run, name="repq-rpc-connect", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _check_server_port(addr: tuple[str, int], timeout: float) -> None:
    """Refused or silent ports fail here, with the OS's reason, before TVM's connect (a TCP probe, which a
    standalone server drops and goes on listening)."""
    try:
        socket.create_connection(addr, timeout=timeout).close()
    except OSError as exc:
        raise ReqError(f"cannot reach the RPC server at {_label(*addr)}: {_reason(exc)} "
                       f"(is `python -m tvm.exec.rpc_server` running there?)") from None


def _session_error(server: str, exc: BaseException) -> ReqError:
    reason = _reason(exc)
    if "cannot find server that matches key" in reason:
        hint = ("it serves a tracker's clients only: reach it with --rpc-tracker HOST:PORT --rpc-key KEY")
    else:
        hint = f"{reason} (is it a TVM RPC server, `python -m tvm.exec.rpc_server`?)"
    return ReqError(f"cannot open an RPC session with the server at {server}: {hint}")


def open_session(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, session_timeout: float = SESSION_SECONDS):
    """A `tvm.rpc.RPCSession` to one server (`rpc` "HOST:PORT") or to a free server of `key` at `tracker`,
    and a description {"via", "server", "key"}; at most `timeout` seconds in all."""
    from tvm import rpc as tvm_rpc

    if (rpc is None) == (tracker is None):
        raise ReqError("give either an RPC server (--rpc HOST:PORT) or a tracker (--rpc-tracker HOST:PORT)")
    if not timeout > 0:
        raise ReqError(f"the RPC time-out must be positive, got {timeout}")
    deadline = time.monotonic() + timeout
    if tracker is not None:
        if not key or any(c.isspace() for c in key):
            raise ReqError(f"a tracker needs a device key without spaces (--rpc-key KEY), got {key!r}")
        addr = parse_address(tracker)
        host, port, match_key = request_server(addr, key, timeout)
        info = {"via": f"tracker {_label(*addr)}", "key": key}
    else:
        (host, port), match_key = parse_address(rpc), ""
        _check_server_port((host, port), timeout)
        info = {"via": "direct", "key": None}
    info["server"] = _label(host, port)
    left = max(deadline - time.monotonic(), 1.0)
    try:
        session = _bounded(lambda: tvm_rpc.connect(host, port, match_key, session_timeout=session_timeout), left)
    except Exception as exc:  # noqa: BLE001  (TVM's InternalError, a time-out)
        raise _session_error(info["server"], exc) from None
    return session, info


@contextlib.contextmanager
def remote_errors(what: str, where: str):
    """A failure of a call on the remote (TVM's RPCError, a dropped or expired session) as one ReqError line."""
    try:
        yield
    except ReqError:
        raise
    except Exception as exc:  # noqa: BLE001  (TVM raises RuntimeError subclasses, sockets OSError)
        raise ReqError(f"{what} on the RPC server {where} failed: {_reason(exc)}") from None


def _remote_function(session, name: str):
    """A global function of the remote, None if its TVM lacks it (a runtime-only build has no LLVM)."""
    try:
        return session.get_function(name)
    except (AttributeError, RuntimeError):
        return None


def remote_machine(session) -> dict:
    """What the remote's TVM says about its machine: LLVM's triple, CPU name and its TVM thread count."""
    out = {}
    for field, name in (("triple", "target.llvm_get_system_triple"), ("cpu", "target.llvm_get_system_cpu"),
                        ("threads", "runtime.NumThreads")):
        fn = _remote_function(session, name)
        out[field] = fn() if fn is not None else None
    out["threads"] = int(out["threads"]) if out["threads"] is not None else None
    return out


def remote_problem(preset: dict, machine: dict) -> str | None:
    """Why the remote cannot run code built for `preset` (None: it can, or the remote cannot tell).

    The architecture comes from the remote's LLVM triple; CPU features from the CPU LLVM names there, looked up
    in this machine's LLVM (an unnamed "generic" CPU, as under qemu-user, is not checked), or, when it is the
    CPU LLVM names on this machine, from this machine's /proc/cpuinfo flags.
    """
    from .. import targets

    if not machine.get("triple"):
        return None
    arch, remote_arch = targets.target_arch(preset), targets.arch_of(machine["triple"])
    if arch != remote_arch:
        return f"it is {arch} code and the remote is {remote_arch} ({machine['triple']})"
    cpu = machine.get("cpu") or ""
    if cpu in _UNKNOWN_CPUS:
        return None
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(cpu, machine["triple"]):
        return None
    if cpu == codegen.llvm_get_system_cpu() and remote_arch == targets.host_arch():
        # the CPU LLVM names here too: this machine's own flags say more than the name (a VM can report a
        # model number whose CPU lacks features the hypervisor passes through, e.g. AMX as "rocketlake")
        reason = targets.runnable_reason(preset)
        return None if reason is None else f"{reason} (the remote's CPU is the one LLVM names here, {cpu})"
    remote = {"kind": "llvm", "mtriple": machine["triple"], "mcpu": cpu}
    missing = [name for feature, _, name in targets.FEATURES
               if targets.target_has(preset, feature) and not targets.target_has(remote, feature)]
    if missing:
        return f"it needs {', '.join(missing)}, which the remote CPU ({cpu}, as LLVM names it) lacks"
    return None


def configure_threads(session, threads: int | None, where: str) -> int | None:
    """Use `threads` of the remote's TVM pool (None: as it is); the remote's thread count after it.

    Like `threads.configure`: a pool that has started can use fewer of its workers, not more.
    """
    count = _remote_function(session, "runtime.NumThreads")
    if threads is None or count is None:
        return int(count()) if count is not None else None
    with remote_errors("setting the TVM thread count", where):
        session.get_function("runtime.config_threadpool")(1, threads)  # 1: kBig, the mode TVM's pool starts in
        n = int(count())
    if n != threads:
        raise ReqError(f"the TVM thread pool of the RPC server {where} has {n} thread(s) and cannot grow to "
                       f"{threads}: start its rpc_server with TVM_NUM_THREADS={threads}")
    return n


# --- an artifact on the remote -------------------------------------------------------------------
class RemoteRunner:
    """A verified artifact loaded on a remote RPC server; called like `Runner` (preprocessed float32
    [B, 3, H, W] in, logits as NumPy out), and timed there (`latency`). Close it to free the server."""

    predict = Runner.predict  # batching and padding only call self(...) and read input_shape
    transform = Runner.transform

    def __init__(self, art_dir: str, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, session_timeout: float = SESSION_SECONDS,
                 threads: int | None = None, check_target: bool = True):
        from tvm import relax

        self.manifest = artifact.read_manifest(art_dir)  # hashes verified before anything is sent
        self.input_shape = tuple(self.manifest["input_shape"])
        self.session, self.remote = open_session(rpc, tracker, key, timeout, session_timeout)
        where = self.where = self.remote["server"]
        try:
            self.remote.update(remote_machine(self.session))
            problem = remote_problem(self.manifest["target"], self.remote) if check_target else None
            if problem:
                raise ReqError(f"artifact was built for {self.manifest['target']['name']} and cannot run on the RPC "
                               f"server {where}: {problem}")
            self.remote["threads"] = configure_threads(self.session, threads, where)
            self.remote["upload_seconds"] = self._upload(art_dir)
            with remote_errors("creating the Relax VM", where):
                self.device = self.session.cpu()
                self.vm = relax.VirtualMachine(self._lib, self.device)
                self._main = self.vm["main"]
            load_time, self.weights = self.manifest.get("load_time"), ()  # packed weights: unpacked once, there
            if load_time:
                with remote_errors(f"calling {load_time} (load time)", where):
                    self.weights = self._remote_items(self.vm[load_time]())
        except BaseException:
            self.close()
            raise

    def _remote_items(self, ref) -> tuple:
        """The tensors of a tuple the remote VM returned: it stays there, an opaque handle here (not iterable)."""
        size, item = self.session.get_function("ffi.ArraySize"), self.session.get_function("ffi.ArrayGetItem")
        return tuple(item(ref, i) for i in range(int(size(ref))))

    def _upload(self, art_dir: str) -> float:
        """Send model.so (named by its hash) and load it there; the seconds it took."""
        library = self.manifest["library"]
        remote_name = f"repq-{self.manifest['files'][library][:16]}.so"
        t0 = time.perf_counter()
        with remote_errors(f"uploading {library}", self.where):
            self.session.upload(os.path.join(art_dir, library), remote_name)
        built = f"TVM {self.manifest.get('tvm_version', '?')}, {self.manifest['target']['name']}"
        with remote_errors(f"loading {library} (built with {built})", self.where):
            self._lib = self.session.load_module(remote_name)
        return time.perf_counter() - t0

    def _input(self, x: np.ndarray):
        import tvm

        if tuple(x.shape) != self.input_shape:
            raise ReqError(f"input shape {tuple(x.shape)} does not match the artifact's {self.input_shape}")
        return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        arg = self._input(x)
        with remote_errors("running the model", self.where):
            return self._main(arg, *self.weights).numpy()

    def latency(self, repeat: int = 50, warmup: int = 5, x: np.ndarray | None = None) -> dict:
        """Median / p90 / min ms of `repeat` single runs of the model timed on the remote by TVM's
        time_evaluator (the input stays there: no network time), after `warmup` runs."""
        if x is None:
            x = np.random.default_rng(0).standard_normal(self.input_shape).astype(np.float32)
        arg = self._input(x)
        with remote_errors("timing the model", self.where):
            for _ in range(warmup):
                self._main(arg, *self.weights)
            timer = self.vm.time_evaluator("main", self.device, number=1, repeat=int(repeat))
            t = np.array(timer(arg, *self.weights).results) * 1e3
        return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
                "runs": len(t), "batch": self.input_shape[0], "threads": self.remote.get("threads"),
                "method": "time_evaluator on the RPC server: one model run per sample, input already there"}

    def close(self) -> None:
        """Drop every handle into the session: the server ends it and takes the next client."""
        for name in ("weights", "_main", "vm", "_lib", "device", "session"):
            self.__dict__.pop(name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
