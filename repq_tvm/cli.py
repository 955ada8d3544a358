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


def cmd_evaluate(args) -> dict:
    from . import data
    from .evaluate import accuracy, make_transform

    model, arch = load_for_eval(args.model, args.checkpoint)
    source = data.open_images(_default_data(args, arch, "eval"))
    result = accuracy(model, source, make_transform(arch["data"]), limit=args.limit,
                      num_classes=_num_classes(model), progress=not args.quiet)
    result.pop("predictions")
    result.update(model=arch["name"], data=source.path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{arch['name']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['images']} images)")
    return result


def cmd_demo(args) -> dict:
    """The built-in default job: calibrate the bundled ViT fixture at W4/A4 and W8/A8 and compare with FP32."""
    from . import calibrated, data, models
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
    print(f"\n{DEFAULT_MODEL} on {len(source)} held-out CIFAR-10 images (top-1 %):")
    for name, top1 in rows.items():
        print(f"  {name:<18} {top1:6.2f}")
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
    e.add_argument("--model", required=True, help="model name (FP32) or a calibrated .repq file")
    e.add_argument("--checkpoint")
    e.add_argument("--data", help="evaluation images (fixtures default to the shipped held-out pack)")
    e.add_argument("--limit", type=int, help="evaluate a fixed random subset of N images")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

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
