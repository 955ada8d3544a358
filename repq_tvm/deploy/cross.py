"""Cross compilation: link a library for another architecture with the preset's `cross_compiler`.

TVM's LLVM backend already emits objects for the preset's triple; only the final link into `model.so` needs a
toolchain for that architecture. `fcompile_for(preset)` returns the `fcompile` for `export_library` (None when the
host's own compiler fits) and fails early, before the slow compile, when the cross compiler is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from ..errors import ReqError
from ..targets import arch_of, host_arch


def target_arch(preset: dict) -> str | None:
    """The architecture of the preset's LLVM triple (None: no triple, i.e. the host's)."""
    triple = preset["tvm_target"].get("mtriple", "")
    return arch_of(triple) if triple else None


def needs_cross(preset: dict) -> bool:
    arch = target_arch(preset)
    return arch is not None and arch != host_arch()


def debian_package(compiler: str) -> str:
    """Debian names cross toolchains TOOL-TRIPLE: aarch64-linux-gnu-gcc comes with gcc-aarch64-linux-gnu."""
    m = re.fullmatch(r"(.+)-(gcc|g\+\+)", compiler)
    return f"{m.group(2)}-{m.group(1)}" if m else compiler


def compiler_version(compiler: str) -> str | None:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def fcompile_for(preset: dict):
    """`fcompile` for `export_library`: None on the target's own architecture, else the preset's cross compiler.

    The returned function carries `.compiler` and `.compiler_version` (recorded in the manifest by `build_info`).
    A fresh one per call: TVM's cross_compiler appends each call's options to its own option list.
    """
    if not needs_cross(preset):
        return None
    compiler = preset.get("cross_compiler")
    if not compiler:
        raise ReqError(f"target {preset['name']} ({target_arch(preset)}) cannot be built on this {host_arch()} "
                       "machine: its preset names no cross_compiler")
    if shutil.which(compiler) is None:
        raise ReqError(f"cross compiler {compiler} for target {preset['name']} is not on PATH: install the Debian "
                       f"package {debian_package(compiler)} (as root: make aarch64-tools)")
    from tvm.support import cc

    fcompile = cc.cross_compiler(compiler)
    fcompile.compiler = compiler
    fcompile.compiler_version = compiler_version(compiler)
    return fcompile


def build_info(fcompile) -> dict:
    """The manifest's record of how model.so was linked."""
    info = {"host": host_arch(), "cross_compiled": getattr(fcompile, "compiler", None) is not None}
    if info["cross_compiled"]:
        info.update(compiler=fcompile.compiler, compiler_version=fcompile.compiler_version)
    return info
