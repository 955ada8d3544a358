"""Run a compiled artifact: load it (verified), preprocess images from the manifest, return logits.

Needs TVM's runtime, NumPy and the preprocessing transform, never the PyTorch model or its weights.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ReqError
from . import artifact, threads as thread_pool


# TVM 0.27 never frees a loaded library: each `tvm.runtime.load_module` keeps its constants (~the
# library's size) for the life of the process, even for the same file. Loading an artifact again
# therefore reuses its module, keyed by the verified library hash: repeated loads cost nothing.
_MODULES: dict[tuple[str, str], object] = {}


def _load_library(path: str, digest: str):
    import tvm

    key = (os.path.realpath(path), digest)
    if key not in _MODULES:
        _MODULES[key] = tvm.runtime.load_module(path)
    return _MODULES[key]


def load_time_values(vm, manifest: dict, art_dir: str) -> tuple:
    """What the manifest's "load_time" function returns (the unpacked 4-bit weights, `artifact`), called once:
    every ``main`` call takes them after the input.  () when the artifact has none."""
    name = manifest.get("load_time")
    if not name:
        return ()
    try:
        function = vm[name]
    except AttributeError:
        raise ReqError(f"artifact {art_dir} is damaged: its library has no function {name!r} "
                       "(the manifest's load_time)") from None
    return tuple(function())


class Runner:
    """A loaded artifact. `__call__` takes preprocessed float32 [B, 3, H, W] with the compiled batch size.

    Runs on `threads` threads, by default every CPU this process may use (`threads.configure`).
    """

    def __init__(self, art_dir: str, check_target: bool = True, threads: int | None = None):
        import tvm
        from tvm import relax

        self.threads = thread_pool.configure(threads)
        self.manifest = artifact.read_manifest(art_dir)
        if check_target:
            artifact.check_runnable_here(self.manifest)
        library = self.manifest["library"]
        lib = _load_library(os.path.join(art_dir, library), self.manifest["files"][library])
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self._main = self.vm["main"]  # one lookup: each costs milliseconds
        self.weights = load_time_values(self.vm, self.manifest, art_dir)
        self.input_shape = tuple(self.manifest["input_shape"])
        # the input's TVM tensor, made once, each call's images copied in through a NumPy view of it: a new tensor
        # per call (`tvm.runtime.tensor`) took 0.14-0.16 ms, the view's copy 0.055-0.068 (DeiT-S's 1x3x224x224 right
        # after a run, Zen 4, 2 threads, `benchmarks/runner_input.py`).  So a Runner runs one call at a time.
        self._input = tvm.runtime.empty(self.input_shape, "float32", tvm.cpu())
        self._input_view = np.from_dlpack(self._input)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if tuple(np.shape(x)) != self.input_shape:
            raise ReqError(f"input shape {tuple(np.shape(x))} does not match the artifact's {self.input_shape}")
        np.copyto(self._input_view, x, casting="unsafe")  # any dtype, as float32 (astype's casting)
        return self._main(self._input, *self.weights).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for any number of images: split into compiled-size batches, the last one padded."""
        b = self.input_shape[0]
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise ReqError(f"image shape {tuple(x.shape[1:])} does not match the artifact's {self.input_shape[1:]}")
        outs = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self(chunk)[: b - pad])
        return np.concatenate(outs)

    def transform(self):
        from ..evaluate import make_transform

        return make_transform(self.manifest["preprocessing"])
