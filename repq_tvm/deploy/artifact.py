"""The compiled artifact: a folder with the TVM library and a manifest that makes it self-describing.

    DIR/model.so        the Relax VM executable (exported library)
    DIR/manifest.json   model, bits, target preset, input shape, preprocessing, class names, TVM
                        version, how the library was linked (cross-compiled or not), and the SHA-256
                        of every other file

Loading checks the manifest's format, every file hash (a tampered or truncated file is refused) and
that this machine can run the target the library was built for.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..atomic import atomic_dir
from ..errors import ReqError, read_json
from . import cross

FORMAT = "repq-tvm-artifact"
VERSION = 1
LIBRARY = "model.so"
MANIFEST = "manifest.json"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(out_dir: str, executable, fields: dict, fcompile=None) -> str:
    """Export `executable` into out_dir with a manifest holding `fields` plus hashes; returns the manifest path.

    `fcompile` links the library (None: the host compiler); one from `cross.fcompile_for` is recorded in the
    manifest's "build" entry as cross-compiled, with the compiler's name and version.
    """
    import tvm

    if fcompile is None and "target" in fields:
        fcompile = cross.fcompile_for(fields["target"])  # never link a foreign-architecture library with the host gcc
    with atomic_dir(out_dir) as tmp:  # an interrupted write keeps the previous artifact whole
        lib_path = os.path.join(tmp, LIBRARY)
        executable.export_library(lib_path, fcompile=fcompile) if fcompile else executable.export_library(lib_path)
        manifest = {"format": FORMAT, "version": VERSION, **fields, "tvm_version": tvm.__version__,
                    "build": cross.build_info(fcompile), "library": LIBRARY, "files": {LIBRARY: sha256(lib_path)}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.join(out_dir, MANIFEST)


def read_manifest(art_dir: str) -> dict:
    """The manifest, with every listed file's hash verified."""
    path = os.path.join(art_dir, MANIFEST)
    if not os.path.isdir(art_dir) or not os.path.isfile(path):
        raise ReqError(f"{art_dir} is not a repq-tvm artifact (no {MANIFEST})")
    manifest = read_json(path, "artifact manifest")
    if manifest.get("format") != FORMAT:
        raise ReqError(f"{path} is not a repq-tvm artifact manifest")
    if manifest.get("version") != VERSION:
        raise ReqError(f"{art_dir} has artifact version {manifest.get('version')}; this repq-tvm reads {VERSION}")
    for name, digest in manifest.get("files", {}).items():
        fpath = os.path.join(art_dir, name)
        if not os.path.isfile(fpath):
            raise ReqError(f"artifact file missing: {fpath}")
        if sha256(fpath) != digest:
            raise ReqError(f"artifact file {fpath} does not match its SHA-256 in the manifest (modified or corrupt)")
    return manifest


def check_runnable_here(manifest: dict) -> None:
    """Refuse libraries built for another architecture or for CPU features this machine lacks
    (`targets.runnable_reason`: the preset's triple and the features its tvm_target enables)."""
    from .. import targets

    preset = manifest["target"]
    reason = targets.runnable_reason(preset)
    if reason:
        arch = targets.target_arch(preset)
        hint = (f" (run it on an {arch} device, or under {preset['runner']})"
                if preset.get("runner") and arch != targets.host_arch() else "")
        raise ReqError(f"artifact was built for {preset['name']} and cannot run here: {reason}{hint}")
