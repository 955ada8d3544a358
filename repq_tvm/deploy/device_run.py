"""Run a repq-tvm artifact on the device: the one file to copy next to the artifact folder.

    python3 device_run.py ART_DIR INPUT.npy OUTPUT.npy

INPUT.npy holds preprocessed float32 images [N, 3, H, W] (any N: split into the compiled batch size, the last
batch zero-padded); OUTPUT.npy gets the float32 logits [N, classes]. One JSON line on stdout reports the
machine, TVM version and timings. Needs only Python 3, NumPy and the TVM runtime wheel: no repq_tvm, no
PyTorch. Before loading it checks the manifest's format, the SHA-256 of model.so and that the library was built
for this machine's architecture. Errors: one line on stderr, exit code 2.

Deliberately independent of the repq_tvm package (it is not installed on devices); the checks mirror
repq_tvm/deploy/artifact.py (FORMAT, READABLE) and the batching mirrors repq_tvm/deploy/runtime.py.
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import time

FORMAT = "repq-tvm-artifact"
READABLE = (1, 2)  # manifest versions, as repq_tvm/deploy/artifact.py reads them
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}


class DeviceError(Exception):
    pass


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(art_dir, verify=True):
    path = os.path.join(art_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{art_dir} is not a repq-tvm artifact ({path}: {exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
        raise DeviceError(f"{path} is not a repq-tvm artifact manifest of version {' or '.join(map(str, READABLE))}")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            fpath = os.path.join(art_dir, name)
            if not os.path.isfile(fpath):
                raise DeviceError(f"artifact file missing: {fpath}")
            if _sha256(fpath) != digest:
                raise DeviceError(f"artifact file {fpath} does not match its SHA-256 in the manifest")
    triple = manifest["target"]["tvm_target"].get("mtriple", "")
    machine = platform.machine().lower()
    if triple and _ARCH_ALIASES.get(machine, machine) != triple.split("-")[0]:
        raise DeviceError(f"artifact was built for {manifest['target']['name']} ({triple}); this machine is {machine}")
    return manifest


def use_all_cpus():
    """TVM's pool takes half the logical CPUs on x86 unless told, and spins long after each run (mirrors
    repq_tvm/deploy/threads.py)."""
    if not any(os.environ.get(v, "").strip() for v in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")):
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(n)
    # and its workers would spin ~150 ms after every run (mirrors repq_tvm/deploy/threads.py: limit_spinning)
    if not os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "").strip():
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "30000"


def run(art_dir, x, verify=True):
    """Logits for images x [N, 3, H, W]; returns (logits, info)."""
    import numpy as np

    t0 = time.time()
    use_all_cpus()
    manifest = read_manifest(art_dir, verify)
    import tvm
    from tvm import relax

    shape = tuple(manifest["input_shape"])
    if x.ndim != 4 or tuple(x.shape[1:]) != shape[1:]:
        raise DeviceError(f"input shape {tuple(x.shape)} does not match the artifact's [N, {', '.join(map(str, shape[1:]))}]")
    lib = tvm.runtime.load_module(os.path.join(art_dir, manifest["library"]))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    main = vm["main"]  # one lookup: each costs milliseconds
    load_time = manifest.get("load_time")  # packed weights, unpacked once (mirrors repq_tvm/deploy/runtime.py)
    try:
        weights = tuple(vm[load_time]()) if load_time else ()
    except AttributeError:
        raise DeviceError(f"artifact {art_dir} is damaged: its library has no function {load_time!r}") from None
    t1 = time.time()
    b, outs = shape[0], []
    x = np.ascontiguousarray(x, dtype=np.float32)
    held = tvm.runtime.empty(shape, "float32", tvm.cpu())  # one input tensor, filled per batch (mirrors Runner)
    view = np.from_dlpack(held)
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        pad = b - len(chunk)
        view[: len(chunk)] = chunk
        view[len(chunk):] = 0
        outs.append(main(held, *weights).numpy()[: b - pad])
    logits = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    info = {"machine": platform.machine(), "tvm_version": tvm.__version__, "images": len(x),
            "threads": int(tvm.get_global_func("runtime.NumThreads")()),
            "load_seconds": round(t1 - t0, 2), "run_seconds": round(time.time() - t1, 2)}
    return logits, info


def main(argv=None):
    p = argparse.ArgumentParser(prog="device_run.py", description="Run a repq-tvm artifact on a .npy image batch.")
    p.add_argument("artifact", help="artifact folder (model.so + manifest.json)")
    p.add_argument("input", help=".npy file: preprocessed float32 images [N, 3, H, W]")
    p.add_argument("output", help=".npy file to write the float32 logits [N, classes] to")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of model.so")
    p.add_argument("--threads", type=int, help="TVM threads (default: TVM_NUM_THREADS, else every CPU)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"device_run: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        import numpy as np

        try:
            x = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DeviceError(f"cannot read {args.input}: {exc}") from None
        logits, info = run(args.artifact, x, verify=not args.no_verify)
        np.save(args.output, logits.astype(np.float32))
    except DeviceError as exc:
        print(f"device_run: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
