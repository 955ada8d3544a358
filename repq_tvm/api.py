"""The library API: what the `repq-tvm` command does, as plain functions for scripts, notebooks and benchmarks.

Each function takes its inputs as arguments and returns its result (a `CalibratedModel` or a dict) instead of
printing, so the data flow is visible in the caller; the CLI only parses arguments, calls these and prints.
Problems with the user's input raise `ReqError` (one line; the CLI prints it and exits with code 2).

    from repq_tvm import api

    cm = api.calibrate("vit_cifar10", w_bits=4, a_bits=4)            # a CalibratedModel, in memory
    api.calibrate_to_file("vit_cifar10", "vit_w4a4.repq", w_bits=4, a_bits=4)
    api.compile_artifact("vit_w4a4.repq", "art")                     # an integer artifact for this CPU
    api.evaluate(artifact="art")["top1"]                             # accuracy on the fixture's held-out pack
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from .errors import ReqError

if TYPE_CHECKING:  # imported where used: `repq-tvm --help` should not wait for torch
    from .calibrated import CalibratedModel

CALIBRATED_SUFFIX = ".repq"


def default_data(data: str | None, arch: dict, kind: str) -> str:
    """`data` if given; fixtures bring their own calibration (`kind="calib"`) and evaluation images, other
    models have no default (a timm model's data cannot be guessed)."""
    from . import models

    if data is not None:  # an empty path is the user's (and an error), not the default
        return data
    if arch.get("name") in models.FIXTURES:
        return models.fixture_file(models.FIXTURE_CALIB_DATA if kind == "calib" else models.FIXTURE_EVAL_DATA)
    raise ReqError(f"{arch.get('name')} needs data (--data): an image folder, a tar of one, or a .npz image pack")


def calibrate(model: str, *, w_bits: int, a_bits: int, method: str = "repq-vit", checkpoint: str | None = None,
              data: str | None = None, calib_size: int = 32, seed: int = 0, progress: bool = True) -> CalibratedModel:
    """Quantize `model` (a bundled fixture or a timm name, weights from `checkpoint`) with `method` at
    W`w_bits`/A`a_bits`, calibrated on `calib_size` images drawn from `data` with `seed`.

    Returns the calibrated model in memory (save it with `calibrated.save`, or use `calibrate_to_file`);
    `info` records the method and the calibration images, so a saved file says how it was made.
    """
    import torch

    from . import data as data_mod, limits, models
    from .calibrated import CalibratedModel
    from .evaluate import load_batch, make_transform
    from .quant.calibrate import calibrate as run_calibration
    from .quant.config import method_config

    if calib_size < 1:
        raise ReqError(f"calib_size must be positive, got {calib_size}")
    cfg = method_config(method, w_bits, a_bits)
    net, arch = models.load_model(model, checkpoint)
    if calib_size > 1:  # all calibration images go through the model in one forward pass
        limits.check_batch(net, arch["data"]["input_size"], calib_size, what="calib_size", int32=False,
                           name=arch["name"])
    source = data_mod.open_images(default_data(data, arch, "calib"))
    if len(source) < calib_size:
        raise ReqError(f"need {calib_size} calibration images, {source.path} has {len(source)}")
    images, _ = load_batch(source, data_mod.sample_indices(len(source), calib_size, seed), make_transform(arch["data"]))
    torch.manual_seed(seed)
    run_calibration(net, images, cfg, progress=progress)
    info = {"method": method, "calib_data": os.path.basename(source.path), "calib_size": calib_size, "seed": seed}
    return CalibratedModel(net, arch, cfg, info)


def calibrate_to_file(model: str, output: str, *, w_bits: int, a_bits: int, **options) -> dict:
    """`calibrate` (same keyword options), then write the `.repq` file `output`; returns a summary dict
    (output, model, method, w_bits, a_bits, calib_size)."""
    from . import calibrated

    cm = calibrate(model, w_bits=w_bits, a_bits=a_bits, **options)
    calibrated.save(output, cm)
    return {"output": output, "model": cm.arch["name"], "method": cm.info["method"], "w_bits": cm.config.w_bits,
            "a_bits": cm.config.a_bits, "calib_size": cm.info["calib_size"]}


def _class_names(arch: dict) -> list[str] | None:
    from . import data, models

    if arch.get("name") in models.FIXTURES:
        return data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA)).classes
    return None


def compile_artifact(calibrated_model: str | CalibratedModel, output: str, *, target: str = "host", batch: int = 1,
                     frontend: str = "torch", dump_ir: str | None = None,
                     progress: Callable[[str], None] | None = None, tuning_log: str | None = None) -> dict:
    """Compile a calibrated model (a `.repq` path or a `CalibratedModel`) into the integer artifact folder
    `output` for `target` (`host`, a preset name or a preset file), with a fixed `batch` size.

    The target (and its cross compiler) and the output folder are checked before the model is loaded or
    anything is compiled, so a wrong target fails in a second, not after the build; so is the batch, against
    what the model's activations allow (`limits.check_batch`: int32 indexing, this machine's RAM).
    `progress` receives one line per compiler phase; `dump_ir` is a folder for the IR after each phase.
    `tuning_log` is a folder from `repq-tvm tune` for this model, bit widths, batch and target (checked
    before compiling; its accepted kernels replace the defaults, the manifest records it and its hash).
    Returns the compile stats with `output`, `target` and `library_bytes` (the size of the library, the
    artifact's weights included: stored narrow where they can be, `load_time_weights` counts them).
    """
    from . import atomic, calibrated, limits, targets
    from .deploy import artifact, cross
    from .passes.load_time_weights import FUNCTION as LOAD_TIME_FUNCTION
    from .passes.pipeline import compile_model

    if batch < 1:
        raise ReqError(f"batch must be positive, got {batch}")
    preset = targets.load(target)
    fcompile = cross.fcompile_for(preset)  # None for the host
    if os.path.exists(output) and not os.path.isdir(output):
        raise ReqError(f"output {output} exists and is not a folder")
    atomic.ensure_parent(output)
    cm = calibrated.load(calibrated_model) if isinstance(calibrated_model, str) else calibrated_model
    if batch > 1:
        limits.check_batch(cm.model, cm.preprocessing["input_size"], batch, name=cm.arch["name"])
    shape = [batch, *cm.preprocessing["input_size"]]
    log = None
    if tuning_log is not None:
        from .tuning.log import TuningLog, workload_key

        log = TuningLog.open(tuning_log, workload_key(cm.arch["name"], cm.config.w_bits, cm.config.a_bits, batch,
                                                      preset))
    executable, stats = compile_model(cm.model, shape, preset, dump_dir=dump_ir,
                                      progress=progress or (lambda msg: None), frontend=frontend, tuning_log=log)
    if log is not None:
        stats["tuning_log"] = {"name": os.path.basename(os.path.normpath(tuning_log)), "sha256": log.sha256,
                               "tuned_kernels": stats.pop("tuned_kernels")}
    fields = {"model": cm.arch["name"], "w_bits": cm.config.w_bits, "a_bits": cm.config.a_bits,
              "method": cm.info.get("method"), "target": preset, "input_shape": shape,
              "preprocessing": cm.preprocessing, "classes": _class_names(cm.arch), "compile": stats}
    if stats.get("load_time_weights"):  # `passes.load_time_weights`: the runtime calls it once, at load
        fields["load_time"] = LOAD_TIME_FUNCTION
    artifact.write(output, executable, fields, fcompile=fcompile)
    library_bytes = os.path.getsize(os.path.join(output, artifact.LIBRARY))
    return {"output": output, "target": preset["name"], **stats, "library_bytes": library_bytes}


def tune(calibrated_model: str | CalibratedModel, *, target: str = "host", trials: int = 200,
         output: str | None = None, batch: int = 1, rpc: dict | None = None,
         progress: Callable[[str], None] | None = None) -> dict:
    """MetaSchedule-tune a calibrated model's kernels for `target` into the tuning-log folder `output`
    (default ``tuning_logs/<model>-w<W>a<A>-b<batch>-<target>``); see `repq_tvm.tuning.tune`."""
    from .tuning.tune import tune as run

    return run(calibrated_model, target=target, trials=trials, output=output, batch=batch, rpc=rpc,
               progress=progress or (lambda msg: None))


def load_for_eval(model: str | CalibratedModel, checkpoint: str | None = None):
    """A `CalibratedModel`, a calibrated file, or a model name (FP32) → (torch module, arch)."""
    from . import calibrated, models

    if isinstance(model, calibrated.CalibratedModel):
        return model.model, model.arch
    is_file = model.endswith(CALIBRATED_SUFFIX) or os.path.isfile(model)
    if is_file and checkpoint is None and model not in models.FIXTURES:
        cm = calibrated.load(model)
        return cm.model, cm.arch
    return models.load_model(model, checkpoint)


def artifact_predictor(art_dir: str, threads: int | None = None):
    """A compiled artifact as (predict: float tensor batch → logits tensor, arch) for `evaluate.accuracy`."""
    import torch

    from .deploy.runtime import Runner

    runner = Runner(art_dir, threads=threads)
    arch = {"name": runner.manifest["model"], "data": runner.manifest["preprocessing"]}
    return (lambda x: torch.from_numpy(runner.predict(x.numpy()))), arch


def evaluate(model: str | CalibratedModel | None = None, *, artifact: str | None = None,
             checkpoint: str | None = None, data: str | None = None, limit: int | None = None,
             threads: int | None = None, progress: bool = True) -> dict:
    """Top-1 / top-5 (%) of an FP32 model (a name, weights from `checkpoint`), a calibrated model (a `.repq`
    path or a `CalibratedModel`), or a compiled `artifact` folder, on `data` (fixtures: their held-out pack),
    or on a fixed random subset of `limit` images. An artifact runs on `threads` TVM threads (default: every
    available CPU).

    The result also holds `correct`, per-image top-1 hits in an order that depends only on the data and
    `limit`: two models evaluated alike can be compared image by image (`evaluate.paired_margin`).
    """
    from . import data as data_mod
    from .evaluate import accuracy, make_transform

    if model is None and artifact is None:
        raise ReqError("nothing to evaluate: give a model (a name or a calibrated .repq file) or an artifact folder "
                       "(--model / --artifact)")
    if model is not None and artifact is not None:
        raise ReqError("give a model or an artifact folder to evaluate, not both")
    if limit is not None and limit < 1:
        raise ReqError(f"limit must be positive, got {limit}")
    if artifact is not None:
        predict, arch = artifact_predictor(artifact, threads)
        num_classes = None
    else:
        predict, arch = load_for_eval(model, checkpoint)
        num_classes = getattr(predict, "num_classes", None)
    source = data_mod.open_images(default_data(data, arch, "eval"))
    result = accuracy(predict, source, make_transform(arch["data"]), limit=limit, num_classes=num_classes,
                      progress=progress)
    result.update(model=arch["name"], data=source.path)
    return result


def export_onnx(calibrated_model: str | CalibratedModel, output: str, *, batch: int = 1) -> dict:
    """Write a calibrated model (a `.repq` path or a `CalibratedModel`) as a QDQ ONNX file with a fixed
    `batch` (input `x`, output `y`): the same quantized function, for ONNX Runtime or the ONNX frontend."""
    from . import calibrated, limits
    from .frontends import export_onnx as write_onnx

    if batch < 1:
        raise ReqError(f"batch must be positive, got {batch}")
    cm = calibrated.load(calibrated_model) if isinstance(calibrated_model, str) else calibrated_model
    if batch > 1:  # ONNX Runtime indexes with int64: only this machine's memory limits the batch
        limits.check_batch(cm.model, cm.preprocessing["input_size"], batch, int32=False, name=cm.arch["name"])
    shape = [batch, *cm.preprocessing["input_size"]]
    write_onnx(cm.model, shape, output)
    return {"output": output, "input": "x", "input_shape": shape, "output_name": "y"}
