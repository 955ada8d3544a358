"""Latency, side by side in one run: the repq-tvm integer artifact against what users would otherwise run.

    python benchmarks/latency.py [--model deit_small_patch16_224] [--bits 8] [--threads 2] [--repeat 30]

Engines (each on the same input, same thread count, batch 1; rounds interleave the engines so machine
load hits all of them alike):
  - repq-tvm      the W{bits}/A{bits} RepQ-ViT artifact from `repq-tvm compile --target host` (untuned)
  - pytorch-fp32  timm model, eager, torch.no_grad
  - ort-fp32      ONNX Runtime on the FP32 model exported by torch.onnx
  - ort-int8-qdq  ONNX Runtime on `repq-tvm export-onnx` of the same calibrated model
  - openvino-fp32 OpenVINO's CPU plugin on the FP32 ONNX file (when `openvino` is installed: `.[bench]`)

Weights are timm's random init (nothing can be downloaded here; latency does not depend on values),
calibrated on 32 images of the bundled CIFAR-10 pack resized by the model's own preprocessing.
Prints medians and the ratio of each engine to repq-tvm; writes benchmarks/results/latency.json / .png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def build_engines(model_name: str, bits: int, threads: int, work: str, log) -> dict:
    """name → zero-argument callable running one inference of the same input."""
    import onnxruntime as ort
    import torch

    from repq_tvm import models
    from repq_tvm.cli import main as cli
    from repq_tvm.deploy.runtime import Runner

    torch.set_num_threads(threads)
    fp32, arch = models.load_model(model_name)
    shape = (1, 3, *arch["data"]["input_size"][1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)
    engines = {}

    cal, art, qdq, fp_onnx = (os.path.join(work, n) for n in ("m.repq", "art", "int8.onnx", "fp32.onnx"))
    log(f"calibrating {model_name} W{bits}/A{bits}")
    assert cli(["calibrate", "--model", model_name, "--data", models.fixture_file(models.FIXTURE_CALIB_DATA),
                "--w-bits", str(bits), "--a-bits", str(bits), "-o", cal, "--quiet"]) == 0
    log("compiling the integer artifact (untuned)")
    assert cli(["compile", cal, "--target", "host", "-o", art, "--quiet"]) == 0
    runner = Runner(art)
    engines["repq-tvm"] = lambda: runner(x)

    def torch_run():
        with torch.no_grad():
            fp32(xt)

    engines["pytorch-fp32"] = torch_run

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    log("exporting ONNX files")
    with torch.no_grad():
        torch.onnx.export(fp32.eval(), (xt,), fp_onnx, input_names=["x"], output_names=["y"], dynamo=False)
    assert cli(["export-onnx", cal, "-o", qdq]) == 0
    for name, path in (("ort-fp32", fp_onnx), ("ort-int8-qdq", qdq)):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        engines[name] = (lambda s, f: (lambda: s.run(None, f)))(session, feed)
    try:
        import openvino as ov
    except ImportError:
        log("openvino not installed (pip install -e '.[bench]'): skipping it")
    else:
        core = ov.Core()
        compiled = core.compile_model(fp_onnx, "CPU", {"INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        engines["openvino-fp32"] = lambda: request.infer({0: x})
    return engines


def measure(engines: dict, repeat: int, warmup: int = 3) -> dict:
    """Median / min ms per engine; rounds run every engine once, in turn."""
    for fn in engines.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in engines}
    for r in range(repeat):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)),
                   "p90_ms": float(np.percentile(t, 90))} for name, t in times.items()}


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    ax.barh(names[::-1], [results[n]["median_ms"] for n in names[::-1]])
    ax.set_xlabel("median ms per image (batch 1)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    log = lambda msg: print(f"[latency] {msg}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as work:
        engines = build_engines(args.model, args.bits, args.threads, work, log)
        log(f"timing {len(engines)} engines, {args.repeat} interleaved rounds, {args.threads} threads")
        results = measure(engines, args.repeat)
    base = results["repq-tvm"]["median_ms"]
    for name, r in results.items():
        r["ratio_to_repq_tvm"] = r["median_ms"] / base
        print(f"{name:14s} median {r['median_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  "
              f"{r['ratio_to_repq_tvm']:5.2f}x repq-tvm's time")
    os.makedirs(args.out, exist_ok=True)
    record = {"model": args.model, "bits": args.bits, "threads": args.threads, "repeat": args.repeat,
              "engines": results}
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(results, os.path.join(args.out, "latency.png"), f"{args.model} W{args.bits}/A{args.bits}, {args.threads} threads")
    log(f"wrote {args.out}/latency.json and latency.png")


if __name__ == "__main__":
    main()
