"""`repq-tvm` command line: calibrate, evaluate, demo.

Every user-facing failure is a ReqError: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ReqError

CALIBRATED_SUFFIX = ".repq"
DEFAULT_MODEL = "vit_cifar10"


def _is_calibrated_file(model: str) -> bool:
    return model.endswith(CALIBRATED_SUFFIX) or os.path.isfile(model)


def _default_data(args, arch: dict, kind: str) -> str:
    """Fixtures bring their own calibration and evaluation images; other models need --data."""
    from . import models

    if args.data:
        return args.data
    if arch.get("name") in models.FIXTURES:
        return models.fixture_file(models.FIXTURE_CALIB_DATA if kind == "calib" else models.FIXTURE_EVAL_DATA)
    raise ReqError("--data is required for this model (an image folder, a tar of one, or a .npz image pack)")


def _num_classes(model) -> int | None:
    return getattr(model, "num_classes", None)


def cmd_calibrate(args) -> dict:
    import torch

    from . import calibrated, data, models
    from .evaluate import load_batch, make_transform
    from .quant.calibrate import calibrate
    from .quant.config import method_config

    cfg = method_config(args.method, args.w_bits, args.a_bits)
    model, arch = models.load_model(args.model, args.checkpoint)
    source = data.open_images(_default_data(args, arch, "calib"))
    if len(source) < args.calib_size:
        raise ReqError(f"need {args.calib_size} calibration images, {source.path} has {len(source)}")
    images, _ = load_batch(source, data.sample_indices(len(source), args.calib_size, args.seed),
                           make_transform(arch["data"]))
    torch.manual_seed(args.seed)
    calibrate(model, images, cfg, progress=not args.quiet)
    info = {"method": args.method, "calib_data": os.path.basename(source.path), "calib_size": args.calib_size,
            "seed": args.seed}
    calibrated.save(args.output, calibrated.CalibratedModel(model, arch, cfg, info))
    result = {"output": args.output, "model": arch["name"], "method": args.method, "w_bits": cfg.w_bits,
              "a_bits": cfg.a_bits, "calib_size": args.calib_size}
    print(json.dumps(result) if args.json else f"wrote {args.output} ({arch['name']}, {args.method} "
          f"W{cfg.w_bits}/A{cfg.a_bits}, {args.calib_size} calibration images)")
    return result


def load_for_eval(model_arg: str, checkpoint: str | None):
    """A calibrated file or a model name (FP32) → (model, arch)."""
    from . import calibrated, models

    if _is_calibrated_file(model_arg) and checkpoint is None and model_arg not in models.FIXTURES:
        cm = calibrated.load(model_arg)
        return cm.model, cm.arch
    return models.load_model(model_arg, checkpoint)


def _artifact_predictor(art_dir: str):
    import torch

    from .deploy.runtime import Runner

    runner = Runner(art_dir)
    arch = {"name": runner.manifest["model"], "data": runner.manifest["preprocessing"]}
    return (lambda x: torch.from_numpy(runner.predict(x.numpy()))), arch, None


def cmd_evaluate(args) -> dict:
    from . import data
    from .evaluate import accuracy, make_transform

    if args.artifact:
        predict, arch, num_classes = _artifact_predictor(args.artifact)
    elif args.model:
        predict, arch = load_for_eval(args.model, args.checkpoint)
        num_classes = _num_classes(predict)
    else:
        raise ReqError("give --model MODEL|CALIBRATED_FILE or --artifact DIR")
    source = data.open_images(_default_data(args, arch, "eval"))
    result = accuracy(predict, source, make_transform(arch["data"]), limit=args.limit,
                      num_classes=num_classes, progress=not args.quiet)
    result.pop("correct")
    result.update(model=arch["name"], data=source.path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{arch['name']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['images']} images)")
    return result


def cmd_compile(args) -> dict:
    from . import calibrated, targets
    from .deploy import artifact, cross
    from .passes.pipeline import compile_model

    preset = targets.load(args.target)
    fcompile = cross.fcompile_for(preset)  # None for the host; checked before the slow compile
    cm = calibrated.load(args.calibrated)
    shape = [args.batch, *cm.preprocessing["input_size"]]
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    executable, stats = compile_model(cm.model, shape, preset, dump_dir=args.dump_ir, progress=say,
                                      frontend=args.frontend)
    fields = {"model": cm.arch["name"], "w_bits": cm.config.w_bits, "a_bits": cm.config.a_bits,
              "method": cm.info.get("method"), "target": preset, "input_shape": shape,
              "preprocessing": cm.preprocessing, "classes": _class_names(cm.arch), "compile": stats}
    artifact.write(args.output, executable, fields, fcompile=fcompile)
    result = {"output": args.output, "target": preset["name"], **stats}
    print(json.dumps(result) if args.json else f"wrote {args.output} for {preset['name']} "
          f"(integer kernels: {stats['integer_linears']} linear, {stats['integer_patch_embeds']} patch embedding, "
          f"{stats['integer_qk']} q@kᵀ, {stats['shift_attention']} shift attn@V; {stats['compile_seconds']} s)")
    return result


def cmd_export_onnx(args) -> dict:
    from . import calibrated
    from .frontends import export_onnx

    cm = calibrated.load(args.calibrated)
    shape = [args.batch, *cm.preprocessing["input_size"]]
    export_onnx(cm.model, shape, args.output)
    result = {"output": args.output, "input": "x", "input_shape": shape, "output_name": "y"}
    print(json.dumps(result) if args.json else f"wrote {args.output} (QDQ ONNX, input x {shape})")
    return result


def _class_names(arch: dict) -> list[str] | None:
    from . import data, models

    if arch.get("name") in models.FIXTURES:
        return data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA)).classes
    return None


def cmd_run(args) -> dict:
    import numpy as np

    from PIL import Image, UnidentifiedImageError

    from .deploy.runtime import Runner

    runner = Runner(args.artifact)
    transform = runner.transform()
    names = runner.manifest.get("classes")
    results = {}
    for path in args.images:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ReqError(f"cannot read image {path}: {exc}") from None
        logits = runner.predict(transform(img).numpy()[None])[0]
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        top = np.argsort(-logits)[:5]
        results[path] = [{"class": int(c), "name": names[c] if names else None, "prob": float(prob[c])} for c in top]
        if not args.json:
            print(path + ": " + ", ".join(f"{r['name'] or r['class']} {r['prob']:.3f}" for r in results[path]))
    if args.json:
        print(json.dumps(results))
    return results


def cmd_profile(args) -> dict:
    from .deploy import profile
    from .deploy.runtime import Runner

    runner = Runner(args.artifact)
    result = {"artifact": args.artifact, "target": runner.manifest["target"]["name"],
              **profile.latency(runner, repeat=args.repeat),
              "kernels": profile.kernel_breakdown(runner, repeat=max(1, args.repeat // 5))}
    if args.plot:
        profile.plot_breakdown(result["kernels"], args.plot, f"{runner.manifest['model']} on {result['target']}")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"latency over {result['runs']} warm runs (batch {result['batch']}): median {result['median_ms']:.2f} ms, "
              f"p90 {result['p90_ms']:.2f} ms, min {result['min_ms']:.2f} ms")
        for row in result["kernels"][:15]:
            print(f"  {row['ms_per_run']:8.3f} ms  x{row['calls_per_run']:<3d} {row['kernel']}")
    return result


def cmd_targets(args) -> dict:
    """The target presets: description, whether this machine can run each (why not), and what `host` picks."""
    from . import targets

    result = targets.survey(args.presets)
    if args.json:
        print(json.dumps(result))
        return result
    rows = result["presets"]
    width = max([len("PRESET"), *(len(r["name"]) for r in rows)])
    print(f"{'PRESET':<{width}}  {'RUNS HERE':<9}  DESCRIPTION")
    for r in rows:
        runs = ("yes, host" if r["host"] else "yes") if r["runs_here"] else "no"
        print(f"{r['name']:<{width}}  {runs:<9}  {r['description']}")
        if r["reason"]:
            print(f"{'':<{width}}  {'':<9}  why not: {r['reason']}")
    host = f"--target host = {result['host']}" if result["host"] else f"--target host: {result['host_error']}"
    features = ", ".join(result["cpu_features"]) or "none of the checked features"
    print(f"\n{host} (this machine: {result['machine']}, {features}); presets from {result['preset_dir']}")
    return result


def cmd_demo(args) -> dict:
    """The built-in default job: calibrate the bundled ViT fixture at W4/A4 and W8/A8, compare with FP32,
    then compile the W4/A4 model to an integer artifact for this CPU, evaluate it and time it."""
    from . import calibrated, data, models
    from .deploy.profile import latency
    from .deploy.runtime import Runner
    from .evaluate import accuracy, make_transform

    os.makedirs(args.out_dir, exist_ok=True)
    model, arch = models.load_model(DEFAULT_MODEL)
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    transform = make_transform(arch["data"])
    rows = {"fp32": accuracy(model, source, transform, progress=not args.quiet)["top1"]}
    for bits in (8, 4):
        out = os.path.join(args.out_dir, f"{DEFAULT_MODEL}_w{bits}a{bits}{CALIBRATED_SUFFIX}")
        ns = argparse.Namespace(model=DEFAULT_MODEL, checkpoint=None, data=None, calib_size=32, seed=0,
                                method="repq-vit", w_bits=bits, a_bits=bits, output=out, quiet=args.quiet, json=False)
        cmd_calibrate(ns)
        qmodel = calibrated.load(out).model
        rows[f"repq-vit W{bits}/A{bits}"] = accuracy(qmodel, source, transform, progress=not args.quiet)["top1"]
    art = os.path.join(args.out_dir, f"{DEFAULT_MODEL}_w4a4")
    cmd_compile(argparse.Namespace(calibrated=out, target="host", output=art, batch=1, dump_ir=None,
                                   frontend="torch", json=False, quiet=args.quiet))
    predict, _, _ = _artifact_predictor(art)
    rows["TVM integer W4/A4"] = accuracy(predict, source, transform, progress=not args.quiet)["top1"]
    speed = latency(Runner(art), repeat=50)
    rows["TVM latency ms (median, batch 1)"] = round(speed["median_ms"], 3)
    print(f"\n{DEFAULT_MODEL} on {len(source)} held-out CIFAR-10 images (top-1 %):")
    for name, value in rows.items():
        print(f"  {name:<34} {value:7.2f}")
    with open(os.path.join(args.out_dir, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def build_parser() -> argparse.ArgumentParser:
    from .quant.config import METHODS

    p = argparse.ArgumentParser(prog="repq-tvm", description="RepQ-ViT quantization of Vision Transformers, "
                                "compiled to integer code with Apache TVM.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("calibrate", help="calibrate a model with RepQ-ViT and write a .repq file")
    c.add_argument("--model", required=True, help="timm model name or bundled fixture (vit_cifar10, swin_cifar10)")
    c.add_argument("--checkpoint", help="weights (.safetensors, or a torch state dict loaded with weights_only)")
    c.add_argument("--data", help="calibration images: folder, tar or .npz (fixtures default to their own)")
    c.add_argument("--calib-size", type=int, default=32)
    c.add_argument("--w-bits", type=int, default=4, help="weight bits: 4, 6 or 8")
    c.add_argument("--a-bits", type=int, default=4, help="activation bits: 4, 6 or 8")
    c.add_argument("--method", default="repq-vit", help=f"one of {', '.join(METHODS)}")
    c.add_argument("--seed", type=int, default=0, help="which calibration images are drawn")
    c.add_argument("-o", "--output", required=True, help=f"output file (*{CALIBRATED_SUFFIX})")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="top-1/top-5 of an FP32 model or a calibrated .repq file")
    e.add_argument("--model", help="model name (FP32) or a calibrated .repq file")
    e.add_argument("--artifact", help="a compiled artifact folder (from repq-tvm compile)")
    e.add_argument("--checkpoint")
    e.add_argument("--data", help="evaluation images (fixtures default to the shipped held-out pack)")
    e.add_argument("--limit", type=int, help="evaluate a fixed random subset of N images")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compile", help="compile a calibrated .repq file to an integer artifact folder")
    c.add_argument("calibrated", help="the .repq file from repq-tvm calibrate")
    c.add_argument("--target", default="host",
                   help="host (the preset this CPU runs best), a preset name (x86_64-avx2, x86_64-avx512-vnni, "
                        "aarch64-neon-dotprod; `repq-tvm targets` lists them) or the path of your own preset .json")
    c.add_argument("-o", "--output", required=True, help="artifact folder to write")
    c.add_argument("--batch", type=int, default=1, help="compiled batch size")
    c.add_argument("--dump-ir", help="write the IR after every compiler phase into this folder")
    c.add_argument("--frontend", choices=("torch", "onnx"), default="torch",
                   help="import through torch.export (default) or through an exported QDQ ONNX file")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    x = sub.add_parser("export-onnx", help="write a calibrated .repq file as a QDQ ONNX model")
    x.add_argument("calibrated")
    x.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    x.add_argument("--batch", type=int, default=1)
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export_onnx)

    r = sub.add_parser("run", help="classify images with a compiled artifact (top-5)")
    r.add_argument("artifact")
    r.add_argument("images", nargs="+")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("profile", help="latency of a compiled artifact, with a per-kernel breakdown")
    f.add_argument("artifact")
    f.add_argument("--repeat", type=int, default=50)
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", help="write a PNG bar chart of the slowest kernels")
    f.set_defaults(func=cmd_profile)

    t = sub.add_parser("targets", help="list the target presets, whether this CPU can run each, and what host picks")
    t.add_argument("presets", nargs="*", help="preset names or preset .json files to check (default: all presets)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_targets)

    d = sub.add_parser("demo", help="the default job: quantize the bundled ViT fixture and report accuracy")
    d.add_argument("--out-dir", default="out")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "calib_size", 1) < 1 or (getattr(args, "limit", None) or 1) < 1:
        parser.error("--calib-size and --limit must be positive")
    try:
        args.func(args)
    except ReqError as exc:
        print(f"repq-tvm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repq-tvm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
