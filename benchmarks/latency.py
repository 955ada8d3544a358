"""Latency, side by side in one run: repq-tvm integer artifacts against what users would otherwise pick.

    python benchmarks/latency.py [--models deit_tiny_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224]
                                 [--batches 1,8] [--bits 8,4] [--rounds 20] [--engines all] [--threads 2]

Quick run: `python benchmarks/latency.py --models deit_tiny_patch16_224 --batches 1 --rounds 5`.

Engines (`--engines`, comma-separated names; `all` by default):
  repq-tvm          RepQ-ViT W{bits}/A{bits} integer artifact, `compile --target host`, one per `--bits`; with
                    `--tuning-logs DIR`, compiled with `DIR/<model>-w<b>a<b>-b<batch>-<host preset>` where that log
                    exists (a `repq-tvm tune` folder: the committed `tuning_logs/`), untuned otherwise
  pytorch-fp32      timm model, eager, torch.no_grad
  ort-fp32          ONNX Runtime on the FP32 ONNX export (torch.onnx, dynamic batch axis)
  ort-int8          ONNX Runtime on ORT's own static quantization of that file: `quant_pre_process`, then
                    `quantize_static` (QDQ, per-channel weights, U8S8 = QUInt8 activations / QInt8 weights, MinMax)
                    calibrated on the 32 calibration images through a CalibrationDataReader
  ort-int8-repq-qdq ONNX Runtime on `repq-tvm export-onnx` of the same W8/A8 calibrated model (our QDQ export)
  openvino-default  OpenVINO CPU plugin on the converted FP32 model, default precision (bf16 where the CPU has
                    AVX-512 BF16 or AMX; recorded as INFERENCE_PRECISION_HINT)
  openvino-fp32     the same with INFERENCE_PRECISION_HINT=f32
  openvino-int8     NNCF: nncf.quantize(ov_model, nncf.Dataset(32 images), model_type=TRANSFORMER, subset_size=32),
                    compiled with the default precision for the ops that stay float

Every engine runs with the same thread count (torch.set_num_threads, ORT intra_op_num_threads, OpenVINO
INFERENCE_NUM_THREADS, TVM_NUM_THREADS, and the artifact's num-cores is this machine's), on the same input,
one process. For each model and batch size every engine is warmed up, then each round runs every engine once,
in a shuffled order, with a pause between calls (`--pause-ms`, 200 ms) so one engine's spinning worker threads
have gone idle before the next starts: with 20 ms (the default until 2026-12-04) ONNX Runtime's threads, and TVM's
before `repq_tvm.deploy.threads.limit_spinning`, still spun when the next engine started. DeiT-S b1 on a 2-vCPU
Zen 4, the same hour: ONNX Runtime INT8 91.4 ms with 20 ms, 37.8 with 200; repq-tvm's p90 30.8 against 17.8 ms at
the same median. Reported: median / p90 ms per call, images/s, and the ratio engine time / repq-tvm
W8/A8 time of the same round set. Each timed call is an engine's first after the pause (a request after idling,
caches cold): with `--warm-calls K` it comes after K untimed calls of the same engine instead (steady state, as
OpenVINO's benchmark_app and most serving numbers report it). The share of the CPUs other processes used while
timing is recorded; on a shared machine `--wait-quiet SECONDS` waits for a quiet moment before timing and runs
again every round during which others used more than `--quiet-threshold` (15%) of the CPUs (fork-join thread
pools, PyTorch's OpenMP above all, slow down far more than the load itself when a core is taken away).

Weights are timm's random init, seed 0 (nothing can be downloaded here; the speed of these engines does not
depend on weight values), saved as a checkpoint so the RepQ-ViT calibration quantizes the very weights the other
engines run; calibrated on the same 32 images of the bundled CIFAR-10 pack (resized by the model's own
preprocessing) for repq-tvm, ORT and NNCF. Before timing, each engine's logits on the timed images are compared
with PyTorch FP32's (cosine similarity, in the JSON): a check that every engine computes the same model.

Writes benchmarks/results/latency.json (after every model / batch, so a partial run keeps what it measured) and
latency.png; a quick run writes over them too, unless given `--out` elsewhere. `--replot` redraws the figure
and the tables from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
ENGINES = ("repq-tvm", "pytorch-fp32", "ort-fp32", "ort-int8", "ort-int8-repq-qdq", "openvino-default",
           "openvino-fp32", "openvino-int8")
LABELS = {
    "pytorch-fp32": "PyTorch FP32 eager",
    "ort-fp32": "ONNX Runtime FP32",
    "ort-int8": "ONNX Runtime INT8 (ORT quantize_static, QDQ U8S8 per-channel)",
    "ort-int8-repq-qdq": "ONNX Runtime INT8 on repq-tvm's own QDQ export (W8/A8)",
    "openvino-default": "OpenVINO default precision",
    "openvino-fp32": "OpenVINO FP32",
    "openvino-int8": "OpenVINO INT8 (NNCF, transformer preset)",
}
CALIB_SIZE = 32


def label(engine: str, ov_default: str | None = None, tuned: bool = False) -> str:
    if engine.startswith("repq-tvm-w"):
        bits = engine.split("-w")[1].split("a")[0]
        return f"repq-tvm W{bits}/A{bits} integer artifact ({'tuned' if tuned else 'untuned'})"
    if engine == "openvino-default" and ov_default:
        return f"OpenVINO default precision ({ov_default})"
    return LABELS.get(engine, engine)


def cpu_info() -> dict:
    """Model name, family / model numbers and the instruction-set flags that matter here, from /proc/cpuinfo."""
    info = {"model_name": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(model_name=fields.get("model name", info["model_name"]), vendor=fields.get("vendor_id"),
                family=fields.get("cpu family"), model=fields.get("model"),
                hypervisor="hypervisor" in flags,
                flags={f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                                               "amx_int8", "amx_bf16")})
    if info.get("vendor") == "AuthenticAMD" and info.get("family") == "25" and info.get("model") in {"17", "160"}:
        info["microarchitecture"] = "Zen 4"  # family 19h model 11h Genoa / a0h Bergamo
    elif info.get("vendor") == "AuthenticAMD" and info.get("family") == "25" and info.get("model") in {"0", "1"}:
        info["microarchitecture"] = "Zen 3"  # family 19h model 0-1h Milan
    elif info.get("vendor") == "AuthenticAMD" and info.get("family") == "25":
        info["microarchitecture"] = "Zen 3 / Zen 4 (family 19h)"
    elif info.get("vendor") == "GenuineIntel" and "amx_int8" in flags:  # VMs may report another model number
        info["microarchitecture"] = "Sapphire Rapids or newer (AMX)"
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("apache-tvm", "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def calibration_images(arch: dict) -> np.ndarray:
    """The 32 images api.calibrate uses (same pack, same seed-0 draw, the model's preprocessing), float32 NCHW."""
    from repq_tvm import data as data_mod, models
    from repq_tvm.evaluate import load_batch, make_transform

    source = data_mod.open_images(models.fixture_file(models.FIXTURE_CALIB_DATA))
    images, _ = load_batch(source, data_mod.sample_indices(len(source), CALIB_SIZE, 0), make_transform(arch["data"]))
    return np.ascontiguousarray(images.numpy(), dtype=np.float32)


def ov_type_name(value) -> str:
    """OpenVINO element type (INFERENCE_PRECISION_HINT) as its short name: bf16, f32, f16."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def file_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


class ModelBench:
    """Everything built once per model (calibrated files, ONNX files, quantized models); engines per batch."""

    def __init__(self, name: str, bits: list[int], batches: list[int], engines: set[str], threads: int,
                 work: str, log, tuning_logs: str | None = None):
        import torch

        from repq_tvm import models

        self.name, self.bits, self.batches, self.wanted, self.threads, self.work = name, bits, batches, engines, \
            threads, work
        self.log = log
        self.errors: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.build_seconds: dict[str, float] = {}
        torch.manual_seed(0)
        self.fp32, self.arch = models.load_model(name)
        self.fp32.eval()
        # the random weights as a checkpoint: every engine, the calibrated models included, runs the same weights
        self.checkpoint = os.path.join(work, "fp32_weights.pth")
        torch.save(self.fp32.state_dict(), self.checkpoint)
        self.calib = calibration_images(self.arch)
        self.input_shape = list(self.calib.shape[1:])
        self.artifacts: dict[tuple[int, int], str] = {}  # (bits, batch) -> artifact folder
        self.tuning_logs = tuning_logs
        self.tuned: dict[tuple[int, int], str] = {}  # (bits, batch) -> the tuning log folder's name
        self.repq_qdq: dict[int, str] = {}  # batch -> our QDQ export (W8)
        self.ov_default_precision = None
        self._build_repq()
        self._build_onnx()
        self._build_openvino()

    def _timed(self, key: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            self.errors[key] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            self.log(f"  FAILED {key}: {self.errors[key]}")
            traceback.print_exc()
            return None
        finally:
            self.build_seconds[key] = round(time.perf_counter() - t0, 1)

    def _build_repq(self) -> None:
        from repq_tvm import api, models

        want_repq = "repq-tvm" in self.wanted
        want_qdq = "ort-int8-repq-qdq" in self.wanted
        for bits in self.bits:
            if not (want_repq or (want_qdq and bits == 8)):
                continue
            self.log(f"  calibrating {self.name} W{bits}/A{bits} (RepQ-ViT, {CALIB_SIZE} images)")
            cm = self._timed(f"calibrate-w{bits}a{bits}", lambda: api.calibrate(
                self.name, w_bits=bits, a_bits=bits, checkpoint=self.checkpoint,
                data=models.fixture_file(models.FIXTURE_CALIB_DATA), calib_size=CALIB_SIZE, progress=False))
            if cm is None:
                continue
            for batch in self.batches:
                if want_repq:
                    out = os.path.join(self.work, f"repq_w{bits}a{bits}_b{batch}")
                    tuning_log = self._tuning_log(bits, batch)
                    self.log(f"  compiling the W{bits}/A{bits} artifact, batch {batch} (--target host, "
                             f"{'tuning log ' + os.path.basename(tuning_log) if tuning_log else 'untuned'})")
                    stats = self._timed(f"repq-tvm-w{bits}a{bits}-b{batch}", lambda: api.compile_artifact(
                        cm, out, target="host", batch=batch, tuning_log=tuning_log))
                    if stats is not None:
                        self.artifacts[(bits, batch)] = out
                        if tuning_log:
                            self.tuned[(bits, batch)] = os.path.basename(tuning_log)
                        self.target = stats.get("target")
                        self.sizes[f"repq-tvm-w{bits}a{bits}-b{batch} model.so"] = file_size(
                            os.path.join(out, "model.so"))
                if want_qdq and bits == 8:
                    out = os.path.join(self.work, f"repq_qdq_b{batch}.onnx")
                    self.log(f"  exporting repq-tvm's QDQ ONNX, batch {batch}")
                    if self._timed(f"repq-qdq-export-b{batch}", lambda: api.export_onnx(cm, out, batch=batch)):
                        self.repq_qdq[batch] = out
                        self.sizes[f"repq-tvm QDQ ONNX W8/A8 b{batch}"] = file_size(out)

    def _tuning_log(self, bits: int, batch: int) -> str | None:
        """The log `repq-tvm tune` would have named for this model, bits, batch and host preset, if it exists."""
        from repq_tvm import targets
        from repq_tvm.tuning import log

        if not self.tuning_logs:
            return None
        key = log.workload_key(self.name, bits, bits, batch, targets.load("host"))
        path = os.path.join(self.tuning_logs, log.default_name(key))
        return path if os.path.isdir(path) else None

    def _build_onnx(self) -> None:
        import torch

        need_onnx = self.wanted & {"ort-fp32", "ort-int8", "openvino-default", "openvino-fp32", "openvino-int8"}
        self.fp_onnx = self.int8_onnx = None
        if not need_onnx:
            return
        path = os.path.join(self.work, "fp32.onnx")
        self.log("  exporting the FP32 ONNX file (torch.onnx, dynamic batch)")

        def export():
            with torch.no_grad():
                torch.onnx.export(self.fp32, (torch.from_numpy(self.calib[:1]),), path, input_names=["x"],
                                  output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                                  opset_version=17, dynamo=False)
            return path

        self.fp_onnx = self._timed("onnx-export", export)
        if self.fp_onnx is None:
            return
        self.sizes["FP32 ONNX"] = file_size(self.fp_onnx)
        if "ort-int8" in self.wanted:
            self.log("  ORT static quantization (quant_pre_process + quantize_static, QDQ U8S8 per-channel)")
            self.int8_onnx = self._timed("ort-quantize", self._ort_quantize)
            if self.int8_onnx:
                self.sizes["ORT INT8 QDQ ONNX"] = file_size(self.int8_onnx)

    def _ort_quantize(self) -> str:
        # ORT writes its scratch files (sym_shape_infer_temp.onnx, external *.data) into the working folder
        with contextlib.chdir(self.work):
            return self._ort_quantize_here()

    def _ort_quantize_here(self) -> str:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = os.path.join(self.work, "fp32_pre.onnx")
        out = os.path.join(self.work, "ort_int8.onnx")
        # ORT's documented first step: symbolic + ONNX shape inference and graph optimization. Symbolic shape
        # inference gives up on some graphs (Swin's window reshapes); then the rest of the step still runs.
        self.ort_pre_process = None
        for mode, kw in (("full", {}), ("without symbolic shape inference", {"skip_symbolic_shape": True})):
            try:
                quant_pre_process(self.fp_onnx, pre, **kw)
                self.ort_pre_process = mode
                break
            except Exception as e:  # noqa: BLE001
                self.log(f"  quant_pre_process ({mode}) failed: {type(e).__name__}: {e}")
        if self.ort_pre_process is None:
            self.log("  quantizing the plain export")
            pre = self.fp_onnx
        calib = self.calib

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= len(calib):
                    return None
                self.i += 1
                return {"x": calib[self.i - 1:self.i]}

            def rewind(self):
                self.i = 0

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # one "Axis 1 is out-of-range" warning per LayerNorm weight (kept per-tensor)
        try:
            quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        return out

    def _build_openvino(self) -> None:
        self.ov_model = self.ov_int8 = None
        if not (self.wanted & {"openvino-default", "openvino-fp32", "openvino-int8"}) or self.fp_onnx is None:
            return
        try:
            import openvino as ov
        except ImportError:
            for e in ("openvino-default", "openvino-fp32", "openvino-int8"):
                if e in self.wanted:
                    self.errors[e] = "openvino not installed (pip install -e '.[bench]')"
            self.log("  openvino not installed (pip install -e '.[bench]'): skipping it")
            return
        self.ov = ov
        self.ov_core = ov.Core()
        self.ov_model = self._timed("openvino-convert", lambda: ov.convert_model(self.fp_onnx))
        if self.ov_model is None or "openvino-int8" not in self.wanted:
            return
        self.log(f"  NNCF quantization (ModelType.TRANSFORMER, subset_size={CALIB_SIZE})")

        def quantize():
            import nncf

            dataset = nncf.Dataset([self.calib[i:i + 1] for i in range(len(self.calib))])
            q = nncf.quantize(self.ov_model.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=CALIB_SIZE)
            xml = os.path.join(self.work, "ov_int8.xml")
            ov.save_model(q, xml)  # compress_to_fp16 by default: the size a user would ship
            self.sizes["OpenVINO INT8 IR (xml+bin)"] = file_size(xml) + file_size(xml[:-4] + ".bin")
            return q

        self.ov_int8 = self._timed("nncf-quantize", quantize)

    def engines(self, batch: int) -> dict:
        """engine name -> zero-argument callable running one batch-`batch` inference of the same images."""
        import onnxruntime as ort
        import torch

        from repq_tvm.deploy.runtime import Runner

        x = np.ascontiguousarray(self.calib[:batch])
        xt = torch.from_numpy(x)
        out: dict = {}
        for bits in self.bits:
            if (bits, batch) in self.artifacts:
                runner = Runner(self.artifacts[(bits, batch)])
                out[f"repq-tvm-w{bits}a{bits}"] = (lambda r: (lambda: r(x)))(runner)
        if "pytorch-fp32" in self.wanted:
            def torch_run():
                with torch.no_grad():
                    return self.fp32(xt)

            out["pytorch-fp32"] = torch_run
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        for name, path in (("ort-fp32", self.fp_onnx), ("ort-int8", self.int8_onnx),
                           ("ort-int8-repq-qdq", self.repq_qdq.get(batch))):
            if name in self.wanted and path:
                session = self._timed(f"{name}-session-b{batch}", lambda: ort.InferenceSession(
                    path, options, providers=["CPUExecutionProvider"]))
                if session is not None:
                    feed = {session.get_inputs()[0].name: x}
                    out[name] = (lambda s, f: (lambda: s.run(None, f)))(session, feed)
        if self.ov_model is not None:
            base = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            for name, model, extra in (("openvino-default", self.ov_model, {}),
                                       ("openvino-fp32", self.ov_model, {"INFERENCE_PRECISION_HINT": "f32"}),
                                       ("openvino-int8", self.ov_int8, {})):
                if name not in self.wanted or model is None:
                    continue

                def compile_one(model=model, extra=extra):
                    m = model.clone()
                    m.reshape({m.inputs[0].get_any_name(): [batch, *self.input_shape]})  # static shapes
                    return self.ov_core.compile_model(m, "CPU", {**base, **extra})

                compiled = self._timed(f"{name}-compile-b{batch}", compile_one)
                if compiled is None:
                    continue
                if name == "openvino-default":
                    self.ov_default_precision = ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
                request = compiled.create_infer_request()
                out[name] = (lambda r: (lambda: r.infer({0: x})))(request)
        return out


class ForeignLoad:
    """CPU time other processes used while we timed, as a share of all CPUs (0 = the machine was ours)."""

    def __init__(self):
        import psutil

        self.psutil, self.proc = psutil, psutil.Process()
        self.start = self._snapshot()

    def _snapshot(self):
        t = self.psutil.cpu_times()  # guest time is already inside user time; steal is a neighbour's load
        busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
        mine = self.proc.cpu_times()
        return time.perf_counter(), busy, mine.user + mine.system

    def share(self) -> float:
        w0, b0, m0 = self.start
        w1, b1, m1 = self._snapshot()
        return max(0.0, ((b1 - b0) - (m1 - m0)) / max(1e-9, (w1 - w0) * (os.cpu_count() or 1)))


def wait_quiet(max_wait_s: float, log, threshold: float = 0.15, window_s: float = 5.0) -> float:
    """Wait (at most `max_wait_s`) until other processes use less than `threshold` of the CPUs for `window_s`."""
    t0 = time.perf_counter()
    while True:
        probe = ForeignLoad()
        time.sleep(window_s)
        share = probe.share()
        if share < threshold or time.perf_counter() - t0 >= max_wait_s:
            if time.perf_counter() - t0 > window_s + 1:
                log(f"    waited {time.perf_counter() - t0:.0f} s for a quiet machine (other load now {share:.0%})")
            return share
        log(f"    other processes use {share:.0%} of the CPUs: waiting ({time.perf_counter() - t0:.0f} s)")


def logits(raw) -> np.ndarray:
    """An engine's raw output (torch tensor, ORT list, OpenVINO result dict, NumPy array) as a NumPy array."""
    if isinstance(raw, (list, tuple)):
        raw = raw[0]
    elif not isinstance(raw, np.ndarray) and hasattr(raw, "values") and hasattr(raw, "keys"):  # OpenVINO OVDict
        raw = list(raw.values())[0]
    if hasattr(raw, "detach"):
        raw = raw.detach().numpy()
    return np.asarray(raw, dtype=np.float32)


def agreement(engines: dict, reference: str = "pytorch-fp32") -> dict:
    """Cosine similarity of each engine's logits to PyTorch FP32's on the same images (one call each): a check
    that every engine computes the same model (random weights, so accuracy means nothing here)."""
    if reference not in engines:
        return {}
    ref = logits(engines[reference]()).ravel()
    out = {}
    for name, fn in engines.items():
        y = logits(fn()).ravel()
        denom = float(np.linalg.norm(ref) * np.linalg.norm(y))
        out[name] = round(float(ref @ y) / denom, 4) if denom > 0 and y.shape == ref.shape else None
    return out


def measure(engines: dict, rounds: int, warmup: int, pause_s: float, seed: int, log,
            quiet_threshold: float | None = None, redo_budget_s: float = 0.0, warm_calls: int = 0) -> dict:
    """Warm each engine up, then `rounds` rounds that each run every engine once, in a shuffled order.
    ``warm_calls``: in every round each engine's timed call comes right after that many untimed calls of its own
    (after the pause): its steady-state latency, caches and predictors warm, instead of its first call after idling.

    With `quiet_threshold`, a round during which other processes used more than that share of the CPUs is
    discarded and run again (after `wait_quiet`), for at most `redo_budget_s` seconds in all; what was
    discarded is counted in the result.
    """
    for name, fn in engines.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        log(f"    warm-up {name}: {(time.perf_counter() - t0) / warmup * 1e3:.1f} ms per call")
    times = {name: [] for name in engines}
    order = list(engines)
    rng = random.Random(seed)
    t_start = time.perf_counter()
    foreign = ForeignLoad()
    kept_shares, discarded, redo_spent, r = [], 0, 0.0, 0
    while r < rounds:
        rng.shuffle(order)
        t_round = time.perf_counter()
        probe = ForeignLoad()
        this = {}
        for name in order:
            time.sleep(pause_s)
            for _ in range(warm_calls):
                engines[name]()
            t0 = time.perf_counter()
            engines[name]()
            this[name] = (time.perf_counter() - t0) * 1e3
        share = probe.share()
        if quiet_threshold is not None and share > quiet_threshold and redo_spent < redo_budget_s:
            discarded += 1
            log(f"    round {r + 1} discarded: other processes used {share:.0%} of the CPUs")
            wait_quiet(max(0.0, redo_budget_s - redo_spent), log, quiet_threshold)
            redo_spent += time.perf_counter() - t_round  # the discarded round and the wait after it
            continue
        for name, v in this.items():
            times[name].append(v)
        kept_shares.append(share)
        r += 1
        if r % max(1, rounds // 4) == 0 or r == rounds:
            log(f"    round {r}/{rounds} ({time.perf_counter() - t_start:.0f} s)")
    share = foreign.share()
    log(f"    other processes used {share:.0%} of the CPUs while timing (kept rounds: mean "
        f"{np.mean(kept_shares):.0%}, max {np.max(kept_shares):.0%}; {discarded} rounds discarded)")
    return {"other_load": share, "other_load_kept_rounds_mean": float(np.mean(kept_shares)),
            "other_load_kept_rounds_max": float(np.max(kept_shares)), "rounds_discarded": discarded,
            "engines": {name: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                               "min_ms": float(np.min(t)), "times_ms": [round(v, 3) for v in t]}
                        for name, t in times.items()}}


def timing_mode(record: dict) -> str:
    """How each timed call was made (`measure`), for titles: cold (first after the pause) or warm."""
    k = record.get("warm_calls", 0)
    return f"each call after {k} warm calls" if k else f"first call after a {record.get('pause_ms', 200):.0f} ms pause"


def add_ratios(results: dict, batch: int, base_engine: str | None) -> None:
    base = results[base_engine]["median_ms"] if base_engine in results else None
    for r in results.values():
        r["images_per_s"] = batch * 1e3 / r["median_ms"]
        r["ratio_to_repq_tvm_w8a8"] = r["median_ms"] / base if base else None


def fmt_ratio(r) -> str:
    return "" if r is None else f"{r:.2f}x"


def markdown_table(record: dict, p90: bool = False) -> str:
    """One row per engine; per model and batch: median ms (batch 1) or images/s (batch > 1) and the ratio, or
    with `p90` the median and p90 ms per call."""
    cols = [(m, b) for m in record["models"] for b in record["batches"]
            if f"{m}/b{b}" in record["results"]]
    engines: list[str] = []
    for m, b in cols:
        for e in record["results"][f"{m}/b{b}"]["engines"]:
            if e not in engines:
                engines.append(e)
    short = {"deit_tiny_patch16_224": "DeiT-Ti", "deit_small_patch16_224": "DeiT-S",
             "swin_tiny_patch4_window7_224": "Swin-T"}
    if p90:
        head = ["engine"] + [f"{short.get(m, m)} b{b} ms median / p90" for m, b in cols]
    else:
        head = ["engine"] + [f"{short.get(m, m)} b{b} " + ("ms" if b == 1 else "img/s") for m, b in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ov_default = record.get("openvino", {}).get("default_inference_precision")
    for e in engines:
        rows = [record["results"][f"{m}/b{b}"]["engines"].get(e) for m, b in cols]
        tuned = [bool(r.get("tuning_log")) for r in rows if r is not None]
        cells = [label(e, ov_default, tuned=bool(tuned) and all(tuned))]
        for (_, b), r in zip(cols, rows):
            if r is None:
                cells.append("–")
                continue
            if p90:
                cells.append(f"{r['median_ms']:.1f} / {r['p90_ms']:.1f}")
                continue
            value = f"{r['median_ms']:.1f}" if b == 1 else f"{r['images_per_s']:.1f}"
            ratio = r.get("ratio_to_repq_tvm_w8a8")
            mixed = any(tuned) and not all(tuned) and r.get("tuning_log")
            cells.append(value + (" tuned" if mixed else "") + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_table(record: dict) -> str:
    """Sizes on disk (MB) per model: FP32 (the ONNX export), the repq-tvm artifacts' libraries per bit width
    (batch 1; 4-bit weights are stored two per byte), and the INT8 files of the other engines."""
    cols = [("FP32 ONNX", "FP32 (ONNX)")]
    cols += [(f"repq-tvm-w{b}a{b}-b1 model.so", f"repq-tvm W{b}/A{b} model.so") for b in record["bits"]]
    cols += [("ORT INT8 QDQ ONNX", "ORT INT8 (QDQ ONNX)"), ("OpenVINO INT8 IR (xml+bin)", "OpenVINO INT8 (IR)")]
    sizes = record.get("sizes_bytes", {})
    cols = [(k, name) for k, name in cols if any(k in s for s in sizes.values())]
    lines = ["| model | " + " | ".join(name for _, name in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for model, s in sizes.items():
        lines.append(f"| {model} | " + " | ".join(f"{s[k] / 1e6:.1f}" if k in s else "–" for k, _ in cols) + " |")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in record["models"] if any(f"{m}/b{b}" in record["results"] for b in record["batches"])]
    batches = record["batches"]
    if not models:
        return
    ov_default = record.get("openvino", {}).get("default_inference_precision")
    fig, axes = plt.subplots(len(batches), len(models), figsize=(5.2 * len(models), 4.6 * len(batches)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    all_engines = []
    for key, res in record["results"].items():
        for e in res["engines"]:
            if e not in all_engines:
                all_engines.append(e)
    colours = {e: cmap(i % 10) for i, e in enumerate(all_engines)}
    for i, b in enumerate(batches):
        for j, m in enumerate(models):
            ax = axes[i][j]
            res = record["results"].get(f"{m}/b{b}")
            if res is None:
                ax.set_axis_off()
                continue
            names = list(res["engines"])
            vals = [res["engines"][e]["median_ms"] if b == 1 else res["engines"][e]["images_per_s"] for e in names]
            bars = ax.bar(range(len(names)), vals, color=[colours[e] for e in names])
            for bar, e in zip(bars, names):
                ratio = res["engines"][e].get("ratio_to_repq_tvm_w8a8")
                ax.annotate(fmt_ratio(ratio), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
            ax.set_ylabel("median ms per call (lower is better)" if b == 1 else "images/s (higher is better)",
                          fontsize=8)
            ax.set_title(f"{m}, batch {b}", fontsize=9)
            ax.margins(y=0.12)
    cpu = record["cpu"]
    fig.suptitle(f"{cpu.get('model_name')} ({cpu.get('microarchitecture', '?')}), {record['threads']} threads, "
                 f"{record['rounds']} interleaved rounds, {timing_mode(record)}\n"
                 f"labels: engine time / repq-tvm W8/A8 time (same run)"
                 + (f"; openvino-default = {ov_default}" if ov_default else ""), fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def csv_list(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", type=csv_list(str), default=list(MODELS))
    p.add_argument("--batches", type=csv_list(int), default=[1, 8])
    p.add_argument("--bits", type=csv_list(int), default=[8, 4], help="repq-tvm weight/activation bits (W=A)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds per model and batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--engines", type=csv_list(str), default=["all"], help=f"all, or some of {', '.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pause-ms", type=float, default=200.0, help="idle time before each timed call (other engines' "
                   "worker threads spin for tens of ms after a call)")
    p.add_argument("--warm-calls", type=int, default=0, metavar="K",
                   help="time each engine's call right after K untimed calls of its own (steady-state latency); "
                        "default 0: its first call after the pause (a request after idling)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine: before timing wait until other processes use less than "
                        "--quiet-threshold of the CPUs, and run again every round during which they used more; "
                        "at most SECONDS per model and batch for each")
    p.add_argument("--quiet-threshold", type=float, default=0.15)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tuning-logs", metavar="DIR", help="compile repq-tvm with the tuning log of each model, bits, "
                   "batch and host preset found here (e.g. tuning_logs); untuned where there is none")
    p.add_argument("--replot", action="store_true", help="only redraw latency.png (and the table) from latency.json")
    args = p.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "latency.json")) as f:
            record = json.load(f)
        plot(record, os.path.join(args.out, "latency.png"))
        print(markdown_table(record))
        print(markdown_table(record, p90=True))
        print(size_table(record))
        return
    wanted = set(ENGINES) if "all" in args.engines else set(args.engines)
    unknown = wanted - set(ENGINES)
    if unknown:
        p.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    # before TVM / torch start their thread pools
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    t_all = time.perf_counter()
    log = lambda msg: print(f"[latency {time.perf_counter() - t_all:6.0f}s] {msg}", flush=True)  # noqa: E731
    cpu = cpu_info()
    record = {
        "cpu": cpu, "versions": versions(), "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "pause_ms": args.pause_ms, "warm_calls": args.warm_calls, "wait_quiet_s": args.wait_quiet,
        "quiet_threshold": args.quiet_threshold,
        "models": args.models, "batches": args.batches, "bits": args.bits,
        "engines_requested": sorted(wanted), "weights": "timm random init (speed does not depend on weight values)",
        "calibration": f"{CALIB_SIZE} images of the bundled CIFAR-10 calibration pack, each model's preprocessing",
        "command": "python benchmarks/latency.py " + " ".join(
            f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in (
                ("models", args.models), ("batches", args.batches), ("bits", args.bits), ("rounds", args.rounds),
                ("engines", sorted(wanted) if "all" not in args.engines else "all"), ("threads", args.threads),
                ("wait-quiet", args.wait_quiet))) + (f" --tuning-logs {args.tuning_logs}" if args.tuning_logs else "")
        + (f" --pause-ms {args.pause_ms}" if args.pause_ms != p.get_default("pause_ms") else "")
        + (f" --warm-calls {args.warm_calls}" if args.warm_calls else ""),
        "results": {}, "sizes_bytes": {}, "errors": {}, "build_seconds": {},
    }
    log(f"CPU {cpu.get('model_name')} ({cpu.get('microarchitecture', 'family ' + str(cpu.get('family')))}), "
        f"flags {', '.join(k for k, v in cpu.get('flags', {}).items() if v)}; {args.threads} threads")
    log("versions " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    os.makedirs(args.out, exist_ok=True)
    base = "repq-tvm-w8a8" if 8 in args.bits and "repq-tvm" in wanted else None
    if base is None:
        log("no repq-tvm W8/A8 engine in this run: ratios are left out")

    def save():
        with open(os.path.join(args.out, "latency.json"), "w") as f:
            json.dump(record, f, indent=1)
        plot(record, os.path.join(args.out, "latency.png"))

    with tempfile.TemporaryDirectory() as work:
        for mi, model in enumerate(args.models):
            log(f"[{mi + 1}/{len(args.models)}] {model}: building engines")
            mwork = os.path.join(work, model)
            os.makedirs(mwork)
            bench = ModelBench(model, args.bits, args.batches, wanted, args.threads, mwork, log, args.tuning_logs)
            for batch in args.batches:
                log(f"[{mi + 1}/{len(args.models)}] {model} batch {batch}: engines")
                engines = bench.engines(batch)
                if not engines:
                    log("    nothing to time")
                    continue
                log(f"    timing {len(engines)} engines x {args.rounds} interleaved rounds: {', '.join(engines)}")
                shared = args.wait_quiet > 0
                quiet = wait_quiet(args.wait_quiet, log, args.quiet_threshold) if shared else None
                cosine = agreement(engines)
                if cosine:
                    log("    logits cosine vs pytorch-fp32: " + ", ".join(f"{k} {v}" for k, v in cosine.items()))
                timed = measure(engines, args.rounds, args.warmup, args.pause_ms / 1e3, seed=batch, log=log,
                                quiet_threshold=args.quiet_threshold if shared else None,
                                redo_budget_s=args.wait_quiet, warm_calls=args.warm_calls)
                results = timed.pop("engines")
                add_ratios(results, batch, base)
                for name, c in cosine.items():
                    results[name]["logits_cosine_vs_pytorch_fp32"] = c
                for (bits, b), log_name in bench.tuned.items():
                    if b == batch and f"repq-tvm-w{bits}a{bits}" in results:
                        results[f"repq-tvm-w{bits}a{bits}"]["tuning_log"] = log_name
                record["results"][f"{model}/b{batch}"] = {
                    "model": model, "batch": batch, "engines": results, "other_load_before": quiet,
                    **{k: round(v, 3) for k, v in timed.items()}}
                for name, r in results.items():
                    log(f"    {name:18s} median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
                        f"{r['images_per_s']:7.1f} img/s  {fmt_ratio(r['ratio_to_repq_tvm_w8a8']):>6s}")
                del engines
                record["openvino"] = {"default_inference_precision": bench.ov_default_precision}
                record["host_preset"] = getattr(bench, "target", record.get("host_preset"))
                record.setdefault("ort_quant_pre_process", {})[model] = getattr(bench, "ort_pre_process", None)
                record["sizes_bytes"][model] = bench.sizes
                record["errors"].update({f"{model}/{k}": v for k, v in bench.errors.items()})
                record["build_seconds"][model] = bench.build_seconds
                save()
            record["sizes_bytes"][model] = bench.sizes
            record["errors"].update({f"{model}/{k}": v for k, v in bench.errors.items()})
            record["build_seconds"][model] = bench.build_seconds
            del bench
    if "openvino" not in record:
        record["openvino"] = {"default_inference_precision": None}
    try:
        import openvino as ov

        core = ov.Core()
        record["openvino"].update(
            core_inference_precision_hint=ov_type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            device=core.get_property("CPU", "FULL_DEVICE_NAME"),
            capabilities=list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    except ImportError:
        pass
    record["markdown"] = markdown_table(record)
    record["markdown_p90"] = markdown_table(record, p90=True)
    record["markdown_sizes"] = size_table(record)
    record["total_seconds"] = round(time.perf_counter() - t_all)
    save()
    print()
    print(f"CPU: {cpu.get('model_name')} ({cpu.get('microarchitecture', '?')}), {args.threads} threads, "
          f"{args.rounds} rounds, {timing_mode(record)}; batch 1: median ms per image, batch > 1: images/s; "
          "(x) = engine time / repq-tvm W8/A8 time, same run")
    print(record["markdown"])
    print()
    print("median / p90 ms per call:")
    print(record["markdown_p90"])
    print()
    print("sizes on disk (MB):")
    print(record["markdown_sizes"])
    if record["errors"]:
        print("failed:")
        for k, v in record["errors"].items():
            print(f"  {k}: {v}")
    log(f"wrote {os.path.join(args.out, 'latency.json')} and latency.png")


if __name__ == "__main__":
    main()
