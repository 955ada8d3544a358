"""Target presets: the JSON files in `targets/` (LLVM triple/CPU/features, int8 dot instruction, cross
toolchain), looked up by name; `host` picks the preset that fits this machine's CPU flags."""

from __future__ import annotations

import os
import platform

from .errors import ReqError, read_json

REQUIRED_KEYS = ("name", "tvm_target", "int8_dot", "cross_compiler", "runner")


def preset_dir() -> str:
    """The repo's targets/ folder (the package is installed editable, next to it)."""
    return os.environ.get("REPQ_TVM_TARGETS", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          "targets"))


def available() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(preset_dir()) if f.endswith(".json"))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_name() -> str:
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        flags = _cpu_flags()
        if "avx512_vnni" in flags:
            return "x86_64-avx512-vnni"
        if "avx2" in flags:
            return "x86_64-avx2"
    if machine in ("aarch64", "arm64"):
        return "aarch64-neon-dotprod"
    raise ReqError(f"no target preset fits this machine ({machine}); choose one of {', '.join(available())}")


def load(name: str) -> dict:
    """The preset called `name` (or the host's); unknown names and malformed files are errors."""
    if name == "host":
        name = host_name()
    path = os.path.join(preset_dir(), f"{name}.json")
    if not os.path.isfile(path):
        raise ReqError(f"unknown target '{name}': choose host or one of {', '.join(available())}")
    preset = read_json(path, "target preset")
    missing = [k for k in REQUIRED_KEYS if k not in preset]
    if missing:
        raise ReqError(f"target preset {path} lacks {', '.join(missing)}")
    return preset
