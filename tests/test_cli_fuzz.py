"""CLI fuzz: every option and positional of every subcommand, with hostile values, ends in one clear line.

The options come from the parser itself (`cli.build_parser()`); `TABLE` says, per option, which hostile values
it is tried with and which values are valid. Each value is substituted into an otherwise valid command line
and run in-process through `cli.main(argv)`:

- a value the table calls an error: exit code 2, stderr is exactly one `repq-tvm: error: ...` line;
- a valid value: exit code 0, or the command reached its expensive step (calibration, the compiler, the ONNX
  export, profiling, the demo), which is replaced by a stop so the test stays fast: the value passed every
  check before it. No `Traceback` either way.

An option without a table entry fails `test_every_option_has_a_value_table` (add the new option's values).
A handful of commands also run through the console script for the real exit code, and the `slow` variant
tries every hostile value on every option (weaker check: 0 or 2, and 2 is one clean line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from repq_tvm import api, cli

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
HAS_PROC = os.path.isdir("/proc/self")
EXE = os.path.join(os.path.dirname(sys.executable), "repq-tvm")

NUMBERS = ("0", "-1", "huge", "nan", "empty")
INPUT_FILE = ("dir", "missing", "unreadable", "random", "trunc_repq", "not_image", "npz_keys", "empty")
CALIBRATED = INPUT_FILE + ("repq_bad_arch", "repq_bad_config", "repq_bad_quantizers")
ARTIFACTS = ("dir", "missing", "unreadable", "random", "trunc_repq", "trunc_art", "tampered_art",
             "garbled_manifest", "manifest_fields", "manifest_shape", "manifest_preprocessing", "empty")
OUTPUT_FILE = ("dir", "empty", "proc", "under_file")  # an existing file is fine: it is replaced
OUTPUT_FOLDER = ("random", "empty", "proc", "under_file")  # an existing folder is fine: it is replaced
WORK_FOLDER = ("random", "empty", "proc", "under_file")
DATA = ("dir", "missing", "unreadable", "random", "not_image", "npz_keys", "npz_dtype", "bad_image_dir", "empty")
FLAG = ()  # store_true: tried as given, and with a value (`--json=0`), which is an error
ADDRESS = ("empty", "0", "huge", "nan", "dir", "no_port", "port_0", "port_huge", "spaced_host")  # HOST:PORT
RPC_KEY = ("empty", "spaced_key")
RPC_TIMEOUT = NUMBERS + ("3601",)

# (command, option) -> (hostile values, expected to fail; valid values). Option: the longest option string, or
# the positional's name. Values are kinds resolved by `Values` (or literal strings). Each command's otherwise
# valid command line is `BASE` (an option's own entry replaces it there).
TABLE = {
    ("", "--help"): (FLAG, ()),
    ("calibrate", "--help"): (FLAG, ()),
    ("calibrate", "--model"): (("empty", "0", "dir", "missing", "random", "resnet18", "trunc_repq"), ("vit_cifar10",)),
    ("calibrate", "--checkpoint"): (INPUT_FILE + ("npz_dtype", "cal"), ("checkpoint",)),
    ("calibrate", "--data"): (DATA, ("npz",)),
    ("calibrate", "--calib-size"): (NUMBERS + ("1025",), ("8",)),
    ("calibrate", "--w-bits"): (NUMBERS + ("5",), ("8",)),
    ("calibrate", "--a-bits"): (NUMBERS + ("5",), ("6",)),
    ("calibrate", "--method"): (("empty", "0", "magic"), ("ptq-baseline",)),
    ("calibrate", "--seed"): (("-1", "huge", "nan", "empty", "4294967296"), ("0", "4294967295")),
    ("calibrate", "--output"): (OUTPUT_FILE, ("new_file", "random")),
    ("calibrate", "--json"): (FLAG, ()),
    ("calibrate", "--quiet"): (FLAG, ()),
    ("evaluate", "--help"): (FLAG, ()),
    ("evaluate", "--model"): (("0", "missing", "not_image") + CALIBRATED, ("vit_cifar10", "cal")),
    ("evaluate", "--artifact"): (ARTIFACTS, ("art",)),
    ("evaluate", "--checkpoint"): (INPUT_FILE + ("npz_dtype", "cal"), ("checkpoint",)),
    ("evaluate", "--data"): (DATA, ("npz",)),
    ("evaluate", "--limit"): (NUMBERS + ("1000000001",), ("8", "1000000000")),
    ("evaluate", "--threads"): (NUMBERS + ("1025",), ("1",)),
    ("evaluate", "--json"): (FLAG, ()),
    ("evaluate", "--quiet"): (FLAG, ()),
    ("compile", "--help"): (FLAG, ()),
    ("compile", "calibrated"): (CALIBRATED + ("art", "npz_dtype"), ("cal",)),
    ("compile", "--target"): (("empty", "0", "dir", "missing", "random", "not_a_preset", "garbled_manifest"),
                              ("host",)),
    ("compile", "--output"): (OUTPUT_FOLDER, ("new_folder", "dir")),
    ("compile", "--batch"): (NUMBERS + ("4097", "100000"), ("1", "2")),
    ("compile", "--dump-ir"): (WORK_FOLDER, ("new_folder", "dir")),
    ("compile", "--frontend"): (("empty", "tvm"), ("onnx",)),
    ("compile", "--json"): (FLAG, ()),
    ("compile", "--quiet"): (FLAG, ()),
    ("compile", "--tuning-log"): (("empty", "dir", "missing", "random"), ("tuning_log",)),
    ("tune", "--help"): (FLAG, ()),
    ("tune", "calibrated"): (CALIBRATED + ("art",), ("cal",)),
    ("tune", "--target"): (("empty", "0", "dir", "missing", "random", "not_a_preset", "garbled_manifest"),
                           ("x86_64-avx2",)),
    ("tune", "--trials"): (NUMBERS + ("100001",), ("1",)),
    ("tune", "--output"): (OUTPUT_FOLDER, ("new_folder",)),
    ("tune", "--batch"): (NUMBERS + ("4097",), ("1",)),
    ("tune", "--json"): (FLAG, ()),
    ("tune", "--quiet"): (FLAG, ()),
    ("tune", "--rpc"): (ADDRESS, ("hostport",)),
    ("tune", "--rpc-tracker"): (ADDRESS, ("hostport",)),
    ("tune", "--rpc-key"): (RPC_KEY, ("rpc_key",)),
    ("tune", "--rpc-timeout"): (RPC_TIMEOUT, ("1", "3600")),
    ("export-onnx", "--help"): (FLAG, ()),
    ("export-onnx", "calibrated"): (CALIBRATED + ("art",), ("cal",)),
    ("export-onnx", "--output"): (OUTPUT_FILE, ("new_file",)),
    ("export-onnx", "--batch"): (NUMBERS + ("4097",), ("1", "2")),
    ("export-onnx", "--json"): (FLAG, ()),
    ("run", "--help"): (FLAG, ()),
    ("run", "artifact"): (ARTIFACTS, ("art",)),
    ("run", "images"): (("dir", "missing", "unreadable", "random", "not_image", "npz_keys", "empty"), ("png",)),
    ("run", "--threads"): (NUMBERS + ("1025",), ("1",)),
    ("run", "--json"): (FLAG, ()),
    ("run", "--rpc"): (ADDRESS, ("hostport",)),
    ("run", "--rpc-tracker"): (ADDRESS, ("hostport",)),
    ("run", "--rpc-key"): (RPC_KEY, ("rpc_key",)),
    ("run", "--rpc-timeout"): (RPC_TIMEOUT, ("1", "3600")),
    ("profile", "--help"): (FLAG, ()),
    ("profile", "artifact"): (ARTIFACTS, ("art",)),
    ("profile", "--repeat"): (NUMBERS + ("100001",), ("1",)),
    ("profile", "--plot"): (OUTPUT_FILE + ("plot.txt",), ("new_plot",)),
    ("profile", "--threads"): (NUMBERS + ("1025",), ("1",)),
    ("profile", "--json"): (FLAG, ()),
    ("profile", "--rpc"): (ADDRESS, ("hostport", "ipv6_hostport")),
    ("profile", "--rpc-tracker"): (ADDRESS, ("hostport",)),
    ("profile", "--rpc-key"): (RPC_KEY, ("rpc_key",)),
    ("profile", "--rpc-timeout"): (RPC_TIMEOUT, ("1", "3600")),
    ("targets", "--help"): (FLAG, ()),
    ("targets", "presets"): (("empty", "0", "dir", "missing", "random", "garbled_manifest"), ("x86_64-avx2",)),
    ("targets", "--json"): (FLAG, ()),
    ("demo", "--help"): (FLAG, ()),
    ("demo", "--out-dir"): (WORK_FOLDER, ("new_folder",)),
    ("demo", "--quiet"): (FLAG, ()),
}

# An otherwise valid command line per command: option -> value kind (None: a flag); positionals by name.
BASE = {
    "": {},
    "calibrate": {"--model": "vit_cifar10", "--data": "small_npz", "--calib-size": "8", "--output": "new_file",
                  "--quiet": None},
    "evaluate": {"--model": "vit_cifar10", "--data": "small_npz", "--limit": "8", "--quiet": None},
    "compile": {"calibrated": "cal", "--output": "new_folder", "--quiet": None},
    "tune": {"calibrated": "cal", "--output": "new_folder", "--quiet": None},
    "export-onnx": {"calibrated": "cal", "--output": "new_file"},
    "run": {"artifact": "art", "images": "png"},
    "profile": {"artifact": "art", "--repeat": "1"},
    "targets": {},
    "demo": {"--out-dir": "new_folder", "--quiet": None},
}
# options that exclude others of the base line
EXCLUDES = {("evaluate", "--artifact"): ("--model",)}
# options that need others: added to the base line (option -> value kind)
WITH = {(command, option): other for command in ("run", "profile", "tune") for option, other in (
    ("--rpc-tracker", {"--rpc-key": "rpc_key"}), ("--rpc-key", {"--rpc-tracker": "hostport"}),
    ("--rpc-timeout", {"--rpc-tracker": "hostport", "--rpc-key": "rpc_key"} if command == "tune"
     else {"--rpc": "hostport"}))}


def option_name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def parser_options() -> dict[tuple[str, str], argparse.Action]:
    """(command, option) -> action for every option and positional of the parser and each subcommand."""
    parser = cli.build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for a in sub._actions:
                    found[(command, option_name(a))] = a
        else:
            found[("", option_name(action))] = action
    return found


def is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


class Reached(BaseException):
    """The command passed every check and got to its expensive step (replaced by this stop)."""


class Values:
    """Hostile and valid values by kind: files made once per module in `root`."""

    def __init__(self, root, cal: str, art: str):
        from repq_tvm import models

        self.root, self.cal, self.art = str(root), cal, art
        self.n = 0
        j = lambda *p: os.path.join(self.root, *p)  # noqa: E731
        os.makedirs(j("empty_dir"))
        with open(j("random.bin"), "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))
        with open(cal, "rb") as f:
            head = f.read()
        with open(j("trunc.repq"), "wb") as f:
            f.write(head[: len(head) // 2])
        with open(j("fake.png"), "wb") as f:
            f.write(b"this is not a png, only text with the suffix of one\n")
        np.savez(j("keys.npz"), a=np.zeros(3), b=np.ones(2))
        np.savez(j("dtype.npz"), images=np.zeros((4, 32, 32, 3), np.float32), labels=np.zeros(4, np.int64),
                 classes=np.array(["a"]))
        os.makedirs(j("bad_images", "cat"))
        shutil.copy(j("fake.png"), j("bad_images", "cat", "x.png"))
        self.npz = models.fixture_file(models.FIXTURE_EVAL_DATA)
        self.checkpoint = models.fixture_file("vit_cifar10.safetensors")
        from PIL import Image

        with np.load(self.npz) as z:  # one image, and a pack of 16 (evaluate / calibrate all of it quickly)
            Image.fromarray(z["images"][0]).save(j("cat.png"))
            np.savez(j("small.npz"), images=z["images"][:16], labels=z["labels"][:16], classes=z["classes"])
        for kind in ("trunc_art", "tampered_art", "garbled_manifest", "manifest_fields", "manifest_shape",
                     "manifest_preprocessing"):
            dst = j(kind)
            shutil.copytree(art, dst)
            lib, manifest_path = os.path.join(dst, "model.so"), os.path.join(dst, "manifest.json")
            with open(manifest_path) as f:
                manifest = json.load(f)
            if kind == "trunc_art":
                os.truncate(lib, os.path.getsize(lib) // 2)
            elif kind == "tampered_art":  # one byte of the library flipped
                with open(lib, "r+b") as f:
                    f.seek(os.path.getsize(lib) // 2)
                    byte = f.read(1)
                    f.seek(-1, 1)
                    f.write(bytes([byte[0] ^ 0xFF]))
            elif kind == "garbled_manifest":
                manifest = "{not json"
            elif kind == "manifest_fields":  # valid JSON, hashes intact, fields the runner needs gone
                del manifest["target"], manifest["library"]
            elif kind == "manifest_shape":
                manifest["input_shape"] = ["one", 3]
            else:
                manifest["preprocessing"] = {"input_size": "big", "mean": None}
            with open(manifest_path, "w") as f:
                f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))
        # valid safetensors files with edited metadata: an arch, a quant config, a quantizer table that are wrong
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(cal, framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for kind, key, value in (("repq_bad_arch", "arch", {"family": "vit", "kwargs": {"no_such_arg": 1}}),
                                 ("repq_bad_config", "quant_config", {"w_bits": "four"}),
                                 ("repq_bad_quantizers", "quantizers", ["not", "a", "table"])):
            save_file(tensors, j(f"{kind}.repq"), metadata={**meta, key: json.dumps(value)})
        # a valid, empty tuning log for `cal` on the host preset (what `tune` writes when it accepts nothing)
        from repq_tvm import targets
        from repq_tvm.tuning import log as tuning_log

        os.makedirs(j("tuning_log"))
        tuning_log.open_accepted(j("tuning_log"))
        with open(j("tuning_log", tuning_log.MANIFEST), "w") as f:
            json.dump({"format": tuning_log.FORMAT, "kernels": [], "sha256": tuning_log.accepted_hashes(j("tuning_log")),
                       "key": tuning_log.workload_key("vit_cifar10", 4, 4, 1, targets.load("host"))}, f)
        self.fixed = {
            "tuning_log": j("tuning_log"),
            "0": "0", "-1": "-1", "huge": "99999999999999999999", "nan": "nan", "empty": "",
            "dir": j("empty_dir"), "missing": j("absent", "nothing"), "random": j("random.bin"),
            "trunc_repq": j("trunc.repq"), "not_image": j("fake.png"), "npz_keys": j("keys.npz"),
            "npz_dtype": j("dtype.npz"), "bad_image_dir": j("bad_images"), "trunc_art": j("trunc_art"),
            "tampered_art": j("tampered_art"), "garbled_manifest": j("garbled_manifest", "manifest.json"),
            "proc": "/proc/x", "under_file": j("random.bin", "x"), "cal": cal, "art": art, "npz": self.npz,
            **{k: j(k) for k in ("manifest_fields", "manifest_shape", "manifest_preprocessing")},
            **{k: j(f"{k}.repq") for k in ("repq_bad_arch", "repq_bad_config", "repq_bad_quantizers")},
            "checkpoint": self.checkpoint, "png": j("cat.png"), "not_a_preset": "no-such-cpu",
            "small_npz": j("small.npz"),
            "no_port": "127.0.0.1", "port_0": "127.0.0.1:0", "port_huge": "127.0.0.1:65536",
            "spaced_host": "my board:9190", "hostport": "127.0.0.1:9190", "ipv6_hostport": "[::1]:9090",
            "rpc_key": "rpi4", "spaced_key": "my board",
        }

    def fresh(self, suffix: str = "") -> str:
        self.n += 1
        return os.path.join(self.root, "new", f"out{self.n}{suffix}")

    def unreadable(self, valid: str) -> str:
        """A copy of `valid` (a file or an artifact folder) that nobody may read (chmod 000)."""
        self.n += 1
        dst = os.path.join(self.root, f"unreadable{self.n}{os.path.splitext(valid)[1]}")
        if os.path.isdir(valid):
            shutil.copytree(valid, dst)
            os.chmod(os.path.join(dst, "model.so"), 0)
            os.chmod(os.path.join(dst, "manifest.json"), 0)
        else:
            shutil.copy(valid, dst)
            os.chmod(dst, 0)
        return dst

    def resolve(self, kind: str, command: str, option: str) -> str:
        if kind == "new_file":
            return self.fresh(".onnx" if command == "export-onnx" else ".repq")
        if kind == "new_folder":
            return self.fresh()
        if kind == "new_plot":
            return self.fresh(".png")
        if kind == "unreadable":  # a chmod 000 copy of the option's first valid value that is a path
            valid = [self.resolve(k, command, option) for k in TABLE[(command, option)][1]]
            return self.unreadable(next(v for v in valid if os.path.exists(v)))
        return self.fixed.get(kind, kind)


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path, monkeypatch):
    """Hostile values that are also relative paths ("0", "nan", "plot.txt") land here, not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def values(tmp_path_factory, vit_host_build):
    return Values(tmp_path_factory.mktemp("fuzz"), *vit_host_build)


def _stop(*_a, **_k):
    raise Reached


@pytest.fixture
def stops(monkeypatch):
    """Replace each command's expensive step by `Reached`: a valid value is known valid once it gets there.
    evaluate (8 images), run (1 image) and targets run for real; run and profile over RPC stop where they would
    connect (after the artifact is verified). Call with the command under test."""
    import repq_tvm.frontends
    import repq_tvm.passes.pipeline
    import repq_tvm.quant.calibrate
    from repq_tvm.deploy import profile, rpc

    monkeypatch.setattr(repq_tvm.quant.calibrate, "calibrate", _stop)  # calibrate: after model and images load
    monkeypatch.setattr(repq_tvm.passes.pipeline, "compile_model", _stop)  # compile: after model, target, batch
    monkeypatch.setattr(repq_tvm.passes.pipeline, "lower_to_kernels", _stop)  # tune: after target, runner, model
    monkeypatch.setattr(repq_tvm.frontends, "export_onnx", _stop)  # export-onnx: after the model loads
    monkeypatch.setattr(profile, "profile", _stop)  # profile: after the artifact loads and is verified
    monkeypatch.setattr(rpc, "open_session", _stop)  # --rpc / --rpc-tracker: after the artifact is verified

    def arm(command: str) -> None:
        if command == "demo":  # its first step evaluates FP32 on 1,000 images
            monkeypatch.setattr(cli.api, "evaluate", _stop)

    return arm


def argv_for(values: Values, command: str, option: str, value: str | None, flag_value: str | None = None):
    """The base command line of `command` with `option` set to `value` (None: a flag, given as is)."""
    actions = {k[1]: a for k, a in parser_options().items() if k[0] == command}
    line = dict(BASE[command])
    for other in EXCLUDES.get((command, option), ()):
        line.pop(other, None)
    line.update(WITH.get((command, option), {}))
    line[option] = value
    argv = [command] if command else []
    for name, v in line.items():  # positionals in parser order first
        action = actions[name]
        if not action.option_strings:
            argv.append(v if name == option else values.resolve(v, command, name))
    for name, v in line.items():
        action = actions[name]
        if action.option_strings:
            if v is None:
                argv.append(name if name != option or flag_value is None else f"{name}={flag_value}")
            else:
                argv += [name, v if name == option else values.resolve(v, command, name)]
    return argv


def run_main(capsys, argv):
    """(outcome, exit code, stderr): outcome is "reached" when the command got to its stubbed expensive step."""
    try:
        code = cli.main(argv)
        outcome = "exit"
    except Reached:
        code, outcome = 0, "reached"
    _, err = capsys.readouterr()
    return outcome, code, err


def assert_one_error_line(code, err, argv):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, f"{argv}: traceback\n{err}"
    assert code == 2, f"{argv}: exit code {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("repq-tvm: error: "), f"{argv}: stderr is not one error line:\n{err}"


def assert_accepted(code, err, argv):
    assert "Traceback" not in err, f"{argv}: traceback\n{err}"
    assert code == 0, f"{argv}: a valid value was refused (exit {code}):\n{err}"
    assert "repq-tvm: error:" not in err, f"{argv}: {err}"


# --- the table covers the parser ------------------------------------------------------------------
def test_every_option_has_a_value_table():
    options = set(parser_options())
    missing, stale = sorted(options - set(TABLE)), sorted(set(TABLE) - options)
    assert not missing, f"options without hostile values in tests/test_cli_fuzz.py TABLE: {missing}"
    assert not stale, f"TABLE entries for options the parser no longer has: {stale}"
    for key, action in parser_options().items():
        if is_flag(action):
            assert TABLE[key] == (FLAG, ()), f"{key} is a flag: give it (FLAG, ())"
        else:
            assert TABLE[key][0] and TABLE[key][1], f"{key} needs hostile and valid values"


def test_every_numeric_option_states_its_range():
    """Every option parsed into a number is one of `cli_types`' callables, which state their range."""
    for key, action in parser_options().items():
        if action.type is int or action.type is float:
            pytest.fail(f"{key} uses a bare {action.type.__name__}: use cli_types.int_in(lo, hi) with its range")
        if action.type is not None and getattr(action.type, "range", None):
            lo, hi = action.type.range
            assert lo <= hi


def test_bits_choices_match_the_quantizers():
    from repq_tvm.quant.quantizers import SUPPORTED_BITS

    assert tuple(cli.BITS) == tuple(SUPPORTED_BITS)


# --- every option, each hostile value and each valid value ------------------------------------------
def _cases():
    for (command, option), (bad, good) in TABLE.items():
        if bad == FLAG:
            continue
        for kind in bad:
            yield pytest.param(command, option, kind, "error", id=f"{command or '-'} {option} {kind}")
        for kind in good:
            yield pytest.param(command, option, kind, "ok", id=f"{command or '-'} {option} ok:{kind}")


@pytest.mark.parametrize("command,option,kind,expect", list(_cases()))
def test_option_value(capsys, values, stops, command, option, kind, expect):
    if kind == "unreadable" and ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading "
                    "(test_unreadable_as_another_user covers it when setpriv and a non-root user exist)")
    if kind == "proc" and not HAS_PROC:
        pytest.skip("no /proc")
    stops(command)
    argv = argv_for(values, command, option, values.resolve(kind, command, option))
    outcome, code, err = run_main(capsys, argv)
    if expect == "error":
        assert_one_error_line(code, err, argv)
    else:
        assert_accepted(code, err, argv)


def _flag_cases():
    for (command, option), (bad, _) in TABLE.items():
        if bad == FLAG:
            yield pytest.param(command, option, id=f"{command or '-'} {option}")


@pytest.mark.parametrize("command,option", list(_flag_cases()))
def test_flag(capsys, values, stops, command, option):
    """A flag as given is accepted (--help prints and exits 0); with a value (`--json=0`) it is one error line."""
    stops(command)
    argv = argv_for(values, command, option, None)
    outcome, code, err = run_main(capsys, argv)
    assert_accepted(code, err, argv)
    argv = argv_for(values, command, option, None, flag_value="0")
    outcome, code, err = run_main(capsys, argv)
    assert_one_error_line(code, err, argv)


# --- the five commands, and more, through the console script: the real exit code and stderr --------------
def _console(*argv, **kw):
    return subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--model", "vit_cifar10", "--limit", "0"],
     "argument --limit: must be an integer in [1, 1000000000], got 0"),
    (["compile", "{cal}", "--batch", "0", "-o", "{out}"], "argument --batch: must be an integer in [1, 4096], got 0"),
    (["compile", "{cal}", "--batch", "100000", "-o", "{out}"],
     "argument --batch: must be an integer in [1, 4096], got 100000"),
    (["profile", "{art}", "--repeat", "0"], "argument --repeat: must be an integer in [1, 100000], got 0"),
    (["compile", "{cal}", "-o", "/proc/x"], "argument -o/--output: cannot write into the output folder /proc"),
    (["calibrate", "--model", "vit_cifar10", "--w-bits", "5", "-o", "{out}"],
     "weight bits must be one of 4, 6, 8, got 5"),
    (["run", "{art}", "{not_image}"], "cannot read image"),
    (["evaluate", "--artifact", "{tampered_art}"], "does not match its SHA-256"),
], ids=["limit-0", "batch-0", "batch-100000", "repeat-0", "output-in-proc", "bits-5", "not-an-image", "tampered"])
def test_console_script(values, argv, message):
    if "/proc/x" in argv and not HAS_PROC:
        pytest.skip("no /proc")
    fields = {**values.fixed, "out": values.fresh()}
    proc = _console(*[a.format(**fields) for a in argv])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("repq-tvm: error: "), proc.stderr
    assert message in lines[0], lines[0]


def test_console_script_help_and_no_command():
    proc = _console()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "repq-tvm: error: give a command: calibrate, evaluate, compile, tune, export-onnx, run, profile, targets, "
        "demo (see repq-tvm --help)"], proc.stderr
    proc = _console("compile", "--help")
    assert proc.returncode == 0 and "--batch" in proc.stdout and not proc.stderr
    proc = _console("targets", "--bogus", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "repq-tvm: error: unrecognized arguments: --bogus (see repq-tvm --help)"], proc.stderr


# --- a batch too large for the model: the limit comes from the model's own activation sizes ------------------------
def test_batch_beyond_int32_indexing_names_the_limit(values, monkeypatch):
    """The ViT fixture's largest activation is its MLP hidden layer, 65 tokens x 512 = 33,280 elements per image:
    TVM refuses batch 65,000 ("Literal value 2163200000 exceeds range of int32"); the compile stops first."""
    from repq_tvm import limits
    from repq_tvm.errors import ReqError

    monkeypatch.setattr(limits, "total_ram", lambda: 2**50)  # so the int32 limit is the one that binds
    t0 = time.time()
    limit = int((2**31 - 1) // (65 * 512 * limits.PAD_MARGIN))
    assert 63_000 < limit < 64_000  # batch 64,000 compiled in the measurement: the margin costs < 2%
    with pytest.raises(ReqError, match=rf"batch 65000 is too large for vit_cifar10: at most {limit} \(the largest "
                                       r"activation, 33,280 elements per image .* below 2\^31"):
        api.compile_artifact(values.cal, values.fresh(), batch=65000)
    assert time.time() - t0 < 60  # refused before the compiler ran
    assert limits.largest_activation(*_model_and_size(values.cal)) == 65 * 512


def _model_and_size(cal):
    from repq_tvm import calibrated

    cm = calibrated.load(cal)
    return cm.model, cm.preprocessing["input_size"]


def test_batch_beyond_memory_is_one_line(capsys, values, stops, monkeypatch):
    from repq_tvm import limits

    monkeypatch.setattr(limits, "total_ram", lambda: 2**30)  # a 1 GiB machine: 4 x 33,280 x 4 B per image
    stops("compile")
    argv = ["compile", values.cal, "--batch", "4096", "-o", values.fresh(), "--quiet"]
    _, code, err = run_main(capsys, argv)
    assert_one_error_line(code, err, argv)
    assert "batch 4096 is too large for vit_cifar10: at most 2016" in err and "1.0 GiB of RAM" in err
    _, code, err = run_main(capsys, argv[:3] + ["2016"] + argv[4:])
    assert_accepted(code, err, argv)


# --- chmod 000 as a user it applies to --------------------------------------------------------------------------
_AS_USER = """
import contextlib, io, json, sys
from repq_tvm import cli
out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_unreadable_as_another_user(values, tmp_path_factory):
    """Root reads chmod 000 files, so as root these run as `nobody` (setpriv): unreadable inputs and an output
    folder without write permission are one error line each."""
    if not ROOT:
        pytest.skip("not root: the in-process cases already run with chmod 000 in effect")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is missing: cannot drop to another user")
    import tempfile

    root = tempfile.mkdtemp(prefix="repq-fuzz-nobody-")
    try:
        os.chmod(root, 0o755)
        j = lambda *p: os.path.join(root, *p)  # noqa: E731
        shutil.copy(values.cal, j("cal.repq"))
        shutil.copy(values.fixed["png"], j("cat.png"))
        shutil.copy(values.npz, j("data.npz"))
        shutil.copy(values.checkpoint, j("weights.safetensors"))
        shutil.copytree(values.art, j("art_lib"))
        shutil.copytree(values.art, j("art_manifest"))
        os.makedirs(j("readonly"))
        os.makedirs(j("home"))
        os.chmod(j("home"), 0o777)
        for f in ("cal.repq", "data.npz", "weights.safetensors", "art_lib/model.so", "art_manifest/manifest.json"):
            os.chmod(j(f), 0)
        os.chmod(j("readonly"), 0o555)
        cases = [
            (["evaluate", "--model", j("cal.repq"), "--quiet"], "Permission denied"),
            (["evaluate", "--model", "vit_cifar10", "--data", j("data.npz"), "--quiet"], "Permission denied"),
            (["evaluate", "--model", "vit_cifar10", "--checkpoint", j("weights.safetensors"), "--quiet"],
             "cannot read checkpoint"),
            (["run", j("art_lib"), j("cat.png")], "Permission denied"),
            (["profile", j("art_manifest")], "Permission denied"),
            (["compile", j("cal.repq"), "-o", j("readonly", "art")], "Permission denied"),
            (["calibrate", "--model", "vit_cifar10", "-o", j("readonly", "x.repq")], "Permission denied"),
        ]
        env = {**os.environ, "HOME": j("home"), "MPLCONFIGDIR": j("home")}
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               _AS_USER], input=json.dumps([argv for argv, _ in cases]), capture_output=True,
                              text=True, env=env, timeout=600)
        if proc.returncode != 0 and "Permission denied" in proc.stderr and "repq_tvm" not in proc.stderr:
            pytest.skip(f"nobody cannot run this Python: {proc.stderr.strip().splitlines()[-1]}")
        if proc.returncode != 0 and "No module named 'repq_tvm'" in proc.stderr:  # e.g. cloned under a 0700 folder
            pytest.skip("nobody cannot read this checkout (a folder above it is private): cannot run repq-tvm as "
                        "another user")
        assert proc.returncode == 0, proc.stderr
        for (argv, message), (code, err) in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
            assert_one_error_line(code, err, argv)
            assert message in err, (argv, err)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- wider, opt-in: every hostile value on every option that takes one ------------------------------------------
ALL_KINDS = sorted({k for bad, _ in TABLE.values() for k in bad} - {"unreadable"} |
                   {"0", "-1", "huge", "nan", "empty", "dir", "missing", "random", "trunc_repq", "trunc_art",
                    "tampered_art", "not_image", "npz_keys", "npz_dtype"})


@pytest.mark.slow
@pytest.mark.parametrize("command,option", [k for k, (bad, _) in TABLE.items() if bad != FLAG])
def test_every_value_on_every_option(capsys, values, stops, command, option):
    """Any hostile value in any option: exit 0 (the value happened to be acceptable there) or 2 with one line."""
    for kind in ALL_KINDS:
        if kind == "proc" and not HAS_PROC:
            continue
        stops(command)
        argv = argv_for(values, command, option, values.resolve(kind, command, option))
        _, code, err = run_main(capsys, argv)
        assert "Traceback" not in err, f"{argv}\n{err}"
        if code == 0:
            assert "repq-tvm: error:" not in err, f"{argv}\n{err}"
        else:
            assert_one_error_line(code, err, argv)
