"""Everything repq-tvm knows about targets, in one place.

- Presets: the JSON files in the top-level `targets/` folder (shipped in the package as `repq_tvm._presets`;
  `REPQ_TVM_TARGETS` points at another folder), each an LLVM target (triple / CPU / features), its int8 dot
  instruction and cross toolchain.  `load` takes a preset name, `host`, or the path of a user's own preset
  file with the same keys; every preset is validated (keys, types, and TVM / LLVM accepting the target).
- The host: its CPU flags (read once from /proc/cpuinfo) and the preset `host` picks for it (`host_name`).
- `tvm.target.Target`s: `tvm_target` builds one from a preset (num-cores from this machine unless given);
  `as_target` is the one conversion every kernel builder uses (Target, preset dict, TVM target dict, or a
  preset name / path); `target_has` asks LLVM whether a target enables a feature.
- Whether this machine can execute code built for a target (`runnable_reason`, `check_runnable`): the
  architecture of its triple and the CPU features it enables (AVX2, FMA, AVX-512F, AVX-512 VNNI, AMX, Arm
  dot product) against the host's flags.  Code for a missing feature would die of SIGILL instead of raising.

`repq_tvm/deploy/device_run.py` keeps its own copy of the architecture check: it runs on devices without
this package.
"""

from __future__ import annotations

import functools
import json
import os
import platform

from .errors import ReqError, read_json

REQUIRED_KEYS = ("name", "tvm_target", "int8_dot", "cross_compiler", "runner")
# key -> (allowed types, how a message names them); "description" is optional
_KEY_TYPES = {
    "name": ((str,), "a non-empty string"),
    "description": ((str,), "a string"),
    "tvm_target": ((dict,), "an object (a TVM target config)"),
    "int8_dot": ((str,), "a string"),
    "cross_compiler": ((str, type(None)), "a string or null"),
    "runner": ((str, type(None)), "a string or null"),
}
# CPU features the runnable check compares: (LLVM feature, /proc/cpuinfo flag, name in messages)
FEATURES = (
    ("avx2", "avx2", "AVX2"),
    ("fma", "fma", "FMA"),
    ("avx512f", "avx512f", "AVX-512F"),
    ("avx512vnni", "avx512_vnni", "AVX-512 VNNI"),
    ("amx-tile", "amx_tile", "AMX-TILE"),
    ("amx-int8", "amx_int8", "AMX-INT8"),
    ("amx-bf16", "amx_bf16", "AMX-BF16"),
    ("dotprod", "asimddp", "Arm dot product (dotprod)"),
)
# `host`: per architecture, the presets to try, best first; the first this CPU can run is picked
HOST_PRESETS = {
    "x86_64": ("x86_64-amx", "x86_64-avx512-vnni", "x86_64-avx2"),
    "aarch64": ("aarch64-neon-dotprod", "aarch64-neon"),
}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


class NotRunnable(ReqError, RuntimeError):
    """Code built for a target this machine cannot execute (a ReqError for the CLI, a RuntimeError for kernels)."""


# --- presets -------------------------------------------------------------------------------------
def _repo_targets() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "targets")


def preset_dir() -> str:
    """The folder of named presets: $REPQ_TVM_TARGETS, else the installed data package `repq_tvm._presets`
    (the repo's `targets/`, mapped by pyproject.toml), else `targets/` next to the package (a source tree)."""
    env = os.environ.get("REPQ_TVM_TARGETS")
    if env:
        return env
    try:
        from importlib.resources import files

        path = str(files("repq_tvm._presets"))
        if os.path.isdir(path):
            return path
    except (ImportError, TypeError):
        pass
    return _repo_targets()


def available() -> list[str]:
    """Names of the presets in `preset_dir()`."""
    folder = preset_dir()
    if not os.path.isdir(folder):
        raise ReqError(f"target preset folder {folder} does not exist")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))


def is_path(name: str) -> bool:
    """True if a --target value names a preset file rather than a preset."""
    return name.endswith(".json") or os.sep in name or "/" in name


def preset_path(name: str) -> str:
    """The file of preset `name` (or the file `name` itself when it is a path); unknown names are errors."""
    if is_path(name):
        if not os.path.isfile(name):
            raise ReqError(f"target preset file {name} does not exist")
        return name
    path = os.path.join(preset_dir(), f"{name}.json")
    if not os.path.isfile(path):
        raise ReqError(f"unknown target '{name}': choose host, a preset file, or one of {', '.join(available())}")
    return path


def load(name: str = "host", *, flags=None, machine=None) -> dict:
    """The validated preset: `host` (the one fitting this CPU), a preset name, or a preset file's path.

    Anything wrong with the file (not JSON, missing keys, wrong types, a target TVM rejects) is one ReqError
    line naming the file.  `flags` / `machine` stand in for the host's when resolving `host`.
    """
    if name == "host":
        name = host_name(flags, machine)
    path = preset_path(name)
    return validate(read_json(path, "target preset"), path)


def validate(preset, path: str) -> dict:
    """`preset` (read from `path`) itself if it has every key with the right type and TVM / LLVM accept its
    tvm_target; else one ReqError line naming `path` and the problem."""
    if not isinstance(preset, dict):
        raise ReqError(f"target preset {path}: expected a JSON object, got {type(preset).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in preset]
    if missing:
        raise ReqError(f"target preset {path} lacks {', '.join(missing)}")
    for key, (types, what) in _KEY_TYPES.items():
        if key in preset and (not isinstance(preset[key], types) or (key == "name" and not preset[key])):
            raise ReqError(f"target preset {path}: {key} must be {what}, got {json.dumps(preset[key])}")
    problem = _tvm_target_problem(preset["tvm_target"])
    if problem:
        raise ReqError(f"target preset {path}: tvm_target {problem}")
    return preset


def _tvm_target_problem(spec: dict) -> str | None:
    """Why TVM / LLVM refuse this target config (None: accepted)."""
    import tvm
    from tvm.target import codegen

    if spec.get("kind") != "llvm":
        return f"must have kind llvm (a CPU target), got {spec.get('kind')!r}"
    try:
        target = tvm.target.Target(dict(spec))
    except (ValueError, TypeError, RuntimeError) as exc:  # TVM's message, without the echoed config
        return "is rejected by TVM: " + str(exc).split(" Target creation from config dict failed")[0].strip()
    triple = spec.get("mtriple")
    if triple is not None and arch_of(triple) not in {arch_of(t) for t in codegen.llvm_get_targets()}:
        return f"has mtriple {triple!r}, an architecture this TVM's LLVM cannot generate code for"
    cpu = spec.get("mcpu")
    if cpu is not None and cpu not in codegen.llvm_get_cpu_archlist(target):
        return f"has mcpu {cpu!r}, which LLVM does not know for {triple or 'this machine'}"
    for attr in spec.get("mattr", ()):
        if not attr[:1] in "+-" or not attr[1:]:
            return f"has mattr entry {attr!r}: expected +feature or -feature"
        if attr[0] == "+" and not codegen.target_has_features(attr[1:], target):
            return f"has mattr {attr!r}, a feature LLVM does not know for {triple or 'this machine'}"
    return None


# --- the host ------------------------------------------------------------------------------------
def arch_of(triple_or_machine: str) -> str:
    """Normalized architecture of an LLVM triple or a `platform.machine()` name ("x86_64", "aarch64", ...)."""
    arch = triple_or_machine.split("-")[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    return arch_of(platform.machine())


@functools.lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """This CPU's feature flags: the `flags` (x86) or `Features` (Arm) line of /proc/cpuinfo, read once.

    Without /proc/cpuinfo on x86, the flags of `FEATURES` LLVM reports for the host CPU; else empty (unknown:
    the runnable check then trusts the architecture alone).
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if host_arch() == "x86_64":
        from tvm.target import codegen

        host = _make_target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
        return frozenset(flag for feature, flag, _ in FEATURES if target_has(host, feature))
    return frozenset()


def host_name(flags=None, machine=None) -> str:
    """The preset `host` stands for: the first of `HOST_PRESETS[arch]` this CPU can run.

    `flags` (CPU flags as in /proc/cpuinfo) and `machine` (`platform.machine()`) default to this machine's.
    """
    arch = arch_of(machine or platform.machine())
    tried = [n for n in HOST_PRESETS.get(arch, ()) if os.path.isfile(os.path.join(preset_dir(), f"{n}.json"))]
    for name in tried:
        if runnable_reason(load(name), flags=flags, machine=machine) is None:
            return name
    listed = ", ".join(tried[:-1]) + " or " + tried[-1] if len(tried) > 1 else "".join(tried)
    cannot = f", which cannot run {listed}" if tried else ""
    raise ReqError(f"no target preset fits this machine ({arch}{cannot}); "
                   f"choose one of {', '.join(available())} or a preset file")


# --- tvm.target.Target ---------------------------------------------------------------------------
def _make_target(spec: dict):
    import tvm

    return tvm.target.Target(spec)


def tvm_target(preset="host", num_cores: int | None = None):
    """The `tvm.target.Target` of a preset (dict, name, `host` or file path); num-cores is `num_cores`, else
    the preset's own, else this machine's CPU count."""
    if isinstance(preset, str):
        preset = load(preset)
    spec = dict(preset["tvm_target"])
    if num_cores is not None:
        spec["num-cores"] = int(num_cores)
    else:
        spec.setdefault("num-cores", os.cpu_count() or 1)
    return _make_target(spec)


def as_target(target):
    """Any target description as a `tvm.target.Target`: a Target (returned as is), a preset dict (has
    tvm_target), a TVM target config dict (has kind), or a preset name / `host` / preset file path."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) or (isinstance(target, dict) and "tvm_target" in target):
        return tvm_target(target)
    if isinstance(target, dict):
        return _make_target(dict(target))
    raise TypeError(f"expected a tvm.target.Target, a preset or a target dict, got {type(target).__name__}")


def target_has(target, feature: str) -> bool:
    """True if `target` (anything `as_target` takes) is an LLVM target enabling LLVM `feature` (e.g. "avx2")."""
    from tvm.target import codegen

    t = as_target(target)
    return t.kind.name == "llvm" and bool(codegen.target_has_features(feature, t))


def target_arch(target) -> str:
    """Architecture of the target's triple (this machine's when it names none)."""
    from tvm.target import codegen

    t = as_target(target)
    return arch_of(str(t.attrs.get("mtriple", "") or codegen.llvm_get_system_triple()))


def target_label(target) -> str:
    """A short name for messages: the preset's name, else triple / CPU."""
    if isinstance(target, dict) and "name" in target and "tvm_target" in target:
        return target["name"]
    if isinstance(target, str):
        return target
    t = as_target(target)
    parts = [str(t.attrs[k]) for k in ("mtriple", "mcpu") if t.attrs.get(k)]
    return " ".join(parts) or str(t.kind.name)


# --- can this machine run it ---------------------------------------------------------------------
def runnable_reason(target, *, flags=None, machine=None) -> str | None:
    """Why this machine cannot execute code built for `target` (None: it can).

    `target`: anything `as_target` takes.  Checks the triple's architecture against `machine`
    (`platform.machine()`), then every `FEATURES` entry the target enables against `flags` (the CPU's
    /proc/cpuinfo flags, default `host_flags()`; empty = unknown, only the architecture is checked).
    """
    t = as_target(target)
    here = arch_of(machine or platform.machine())
    arch = target_arch(t)
    if arch != here:
        triple = t.attrs.get("mtriple", "")
        return f"it is {arch} code ({triple}) and this machine is {here}"
    flags = host_flags() if flags is None else frozenset(flags)
    if not flags:
        return None
    missing = [(name, flag) for feature, flag, name in FEATURES if flag not in flags and target_has(t, feature)]
    if missing:
        return (f"it needs {', '.join(n for n, _ in missing)}, which this CPU lacks "
                f"(no {', '.join(f for _, f in missing)} among its CPU flags)")
    return None


def check_runnable(target, what: str = "code", *, flags=None, machine=None) -> None:
    """Raise `NotRunnable` ("<what> built for <target> cannot run here: <reason>") if `runnable_reason` says so."""
    reason = runnable_reason(target, flags=flags, machine=machine)
    if reason:
        raise NotRunnable(f"{what} built for {target_label(target)} cannot run here: {reason}")


def survey(names=None) -> dict:
    """What `repq-tvm targets` shows: each preset (default: all of `available()`) with its description,
    whether this machine can run it and why not, and the one `host` picks."""
    try:
        host, host_error = host_name(), None
    except ReqError as exc:
        host, host_error = None, str(exc)
    rows = []
    for name in names or available():
        name = host_name() if name == "host" else name
        path = preset_path(name)
        preset = load(name)
        reason = runnable_reason(preset)
        rows.append({"name": preset["name"], "file": path, "description": preset.get("description", ""),
                     "int8_dot": preset["int8_dot"], "runs_here": reason is None, "reason": reason,
                     "host": not is_path(name) and name == host})
    flags = host_flags()
    return {"machine": host_arch(), "cpu_features": [name for _, flag, name in FEATURES if flag in flags],
            "host": host, "host_error": host_error, "preset_dir": preset_dir(), "presets": rows}
