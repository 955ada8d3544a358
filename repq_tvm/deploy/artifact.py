"""The compiled artifact: a folder with the TVM library and a manifest that makes it self-describing.

    DIR/model.so        the Relax VM executable (exported library)
    DIR/manifest.json   model, bits, target preset, input shape, preprocessing, class names, TVM
                        version, how the library was linked (cross-compiled or not), and the SHA-256
                        of every other file; "load_time" (when present) names the library function to
                        call once at load, whose results follow the input in every ``main`` call
                        (the widened narrow weights, `passes.load_time_weights`)

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
# 2: the manifest may name a load-time function (`load_time`: 4-bit weights unpacked once at load), which a version-1
# runtime would not call (it would run the model on packed weights); version-1 artifacts have none and still load
VERSION = 2
READABLE = (1, 2)
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


def _check_fields(manifest: dict, path: str) -> None:
    """The manifest entries the runtime, `run`, `evaluate` and `profile` use, with the right types (the hashes
    cover the library, not the manifest itself: an edited manifest is refused here, not by a KeyError later)."""
    from .. import targets
    from ..evaluate import check_data_config

    for key, kind, what in (("model", str, "a string"), ("library", str, "a file name"),
                            ("files", dict, "an object of file name: SHA-256"), ("target", dict, "a target preset"),
                            ("input_shape", list, "a list"), ("preprocessing", dict, "an object")):
        if not isinstance(manifest.get(key), kind):
            raise ReqError(f"artifact manifest {path} is damaged: '{key}' is missing or not {what}")
    if manifest["library"] not in manifest["files"] or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise ReqError(f"artifact manifest {path} is damaged: 'files' must list the library with its SHA-256")
    shape = manifest["input_shape"]
    if len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ReqError(f"artifact manifest {path} is damaged: input_shape must be 4 positive integers, got {shape!r}")
    check_data_config(manifest["preprocessing"], f"artifact manifest {path}")
    if manifest["preprocessing"]["input_size"] != shape[1:]:
        raise ReqError(f"artifact manifest {path} is damaged: preprocessing input_size "
                       f"{manifest['preprocessing']['input_size']} differs from input_shape {shape}")
    if not isinstance(manifest.get("load_time", ""), str):
        raise ReqError(f"artifact manifest {path} is damaged: load_time must be a function name")
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ReqError(f"artifact manifest {path} is damaged: classes must be a list of names")
    targets.validate(manifest["target"], f"{path} (its target)")


def read_manifest(art_dir: str) -> dict:
    """The manifest, its fields checked and every listed file's hash verified."""
    path = os.path.join(art_dir, MANIFEST)
    if not os.path.isdir(art_dir) or not os.path.isfile(path):
        raise ReqError(f"{art_dir} is not a repq-tvm artifact (no {MANIFEST})")
    manifest = read_json(path, "artifact manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReqError(f"{path} is not a repq-tvm artifact manifest")
    if manifest.get("version") not in READABLE:
        raise ReqError(f"{art_dir} has artifact version {manifest.get('version')}; this repq-tvm reads versions "
                       f"{', '.join(map(str, READABLE))}")
    _check_fields(manifest, path)
    for name, digest in manifest["files"].items():
        fpath = os.path.join(art_dir, name)
        if not os.path.isfile(fpath):
            raise ReqError(f"artifact file missing: {fpath}")
        try:
            actual = sha256(fpath)
        except OSError as exc:
            raise ReqError(f"cannot read artifact file {fpath}: {exc.strerror or exc}") from None
        if actual != digest:
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
