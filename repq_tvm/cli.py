"""`repq-tvm` command line: calibrate, evaluate, compile, run, profile, demo.

Each command parses its arguments, calls the library API (`repq_tvm.api`) and prints the result.
Every user-facing failure is one `repq-tvm: error: ...` line on stderr and exit code 2: a ReqError from the
library, or a bad command line (`Parser.error`; numeric options and output paths are validated while parsing,
by the `type=` callables of `repq_tvm.cli_types`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import api
from .cli_types import host_port, int_choice, int_in, output_file, output_folder, plot_file, rpc_key, work_folder
from .errors import ReqError

CALIBRATED_SUFFIX = api.CALIBRATED_SUFFIX
DEFAULT_MODEL = "vit_cifar10"

# The ranges of the numeric options (`repq_tvm.cli_types`); model-dependent limits (the largest batch a model
# can be compiled for on this machine) are checked by `repq_tvm.limits` once the model is loaded.
BITS = (4, 6, 8)
CALIB_SIZE = int_in(1, 1024)  # one forward pass over all of them
SEED = int_in(0, 2**32 - 1)  # numpy's and torch's seed range
LIMIT = int_in(1, 10**9)
BATCH = int_in(1, 4096)
REPEAT = int_in(1, 100_000)
TRIALS = int_in(1, 100_000)
THREADS = int_in(1, 1024)
THREADS_HELP = "TVM threads, 1 to 1024 (default: TVM_NUM_THREADS if set, else every CPU this process may use)"
RPC_TIMEOUT = int_in(1, 3600)  # seconds to reach a tracker / server and to wait for a free board


class Parser(argparse.ArgumentParser):
    """argparse with repq-tvm's error format: a bad command line is exactly one `repq-tvm: error: ...` line on
    stderr (naming the option, then where --help is) and exit code 2; no usage block. Subparsers use it too
    (`add_subparsers` makes them of the parent's class)."""

    def error(self, message: str):
        message = " ".join(message.split())  # one line, whatever argparse put in it
        sys.stderr.write(f"repq-tvm: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def cmd_calibrate(args) -> dict:
    result = api.calibrate_to_file(args.model, args.output, w_bits=args.w_bits, a_bits=args.a_bits,
                                   method=args.method, checkpoint=args.checkpoint, data=args.data,
                                   calib_size=args.calib_size, seed=args.seed, progress=not args.quiet)
    print(json.dumps(result) if args.json else f"wrote {args.output} ({result['model']}, {args.method} "
          f"W{result['w_bits']}/A{result['a_bits']}, {args.calib_size} calibration images)")
    return result


def cmd_evaluate(args) -> dict:
    result = api.evaluate(args.model, artifact=args.artifact, checkpoint=args.checkpoint, data=args.data,
                          limit=args.limit, threads=args.threads, progress=not args.quiet)
    result.pop("correct")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['images']} images)")
    return result


def _stderr_progress(quiet: bool):
    return None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def artifact_size(result: dict) -> str:
    """'model.so 1.6 MB' (and how many weight tensors it stores narrower than its kernels read them, when it
    does: `kernels.narrow_weights`)."""
    packed = result.get("load_time_weights", 0)
    return f"model.so {result['library_bytes'] / 1e6:.1f} MB" + (
        f", {packed} weight tensors stored narrow (widened once at load)" if packed else "")


def _fused(result: dict) -> str:
    """The attentions whose three kernels became one (`passes.fused_attention`), if any, and how many of those
    store the output projection's codes (`passes.attention_out_codes`)."""
    n, codes = result.get("fused_attention", 0), result.get("fused_attention_out_codes", 0)
    return (f" ({n} attentions each fused into one kernel call: q@kᵀ, softmax, attn@V"
            + (f", {codes} storing proj's codes" if codes else "") + ")") if n else ""


def cmd_compile(args) -> dict:
    result = api.compile_artifact(args.calibrated, args.output, target=args.target, batch=args.batch,
                                  frontend=args.frontend, dump_ir=args.dump_ir, progress=_stderr_progress(args.quiet),
                                  tuning_log=args.tuning_log)
    print(json.dumps(result) if args.json else f"wrote {args.output} for {result['target']} "
          f"(integer kernels: {result['integer_linears']} linear, {result['integer_patch_embeds']} patch embedding, "
          f"{result['integer_qk']} q@kᵀ, {result['log2_attention']} log√2 attn@V{_fused(result)}; "
          f"{artifact_size(result)}; {result['compile_seconds']} s)")
    return result


def cmd_tune(args) -> dict:
    if args.rpc_key and not args.rpc_tracker:
        raise ReqError("--rpc-key goes with --rpc-tracker HOST:PORT")
    if args.rpc_tracker and not args.rpc_key:
        raise ReqError("--rpc-tracker needs --rpc-key KEY (the key the board's rpc_server registered with)")
    if args.rpc_timeout is not None and not (args.rpc or args.rpc_tracker):
        raise ReqError("--rpc-timeout applies only with --rpc or --rpc-tracker")
    rpc = ({"tracker": args.rpc_tracker, "key": args.rpc_key, "host": args.rpc, "timeout": args.rpc_timeout}
           if args.rpc or args.rpc_tracker else None)
    result = api.tune(args.calibrated, target=args.target, trials=args.trials, output=args.output, batch=args.batch,
                      rpc=rpc, progress=_stderr_progress(args.quiet))
    if args.json:
        print(json.dumps(result))
    else:
        for row in result["kernels"]:
            times = (f"{row['default_ms']:.3f} -> {row['tuned_ms']:.3f} ms" if "tuned_ms" in row else "")
            print(f"{row['kernel'][:60]:60s} {row['share']:6.1%} {row['trials']:5d} trials  {times:24s} {row['verdict']}")
        print(f"wrote {result['output']}: {result['accepted']} of {len(result['kernels'])} kernels tuned, "
              f"{result['trials_this_run']} trials in {result['minutes_this_run']:.1f} min")
    return result


def cmd_export_onnx(args) -> dict:
    result = api.export_onnx(args.calibrated, args.output, batch=args.batch)
    print(json.dumps(result) if args.json else f"wrote {args.output} (QDQ ONNX, input x {result['input_shape']})")
    return result


def _remote_runner(args, what: str):
    """A `RemoteRunner` on the board named by --rpc / --rpc-tracker + --rpc-key (None: run here), after the
    option combinations are checked (before anything loads or connects)."""
    if args.rpc_key and not args.rpc_tracker:
        raise ReqError("--rpc-key goes with --rpc-tracker HOST:PORT" +
                       (" (--rpc reaches one server directly, without a key)" if args.rpc else ""))
    if args.rpc_tracker and not args.rpc_key:
        raise ReqError("--rpc-tracker needs --rpc-key KEY (the key the board's rpc_server registered with)")
    if args.rpc_timeout is not None and not (args.rpc or args.rpc_tracker):
        raise ReqError("--rpc-timeout applies only with --rpc or --rpc-tracker")
    if not (args.rpc or args.rpc_tracker):
        return None
    if getattr(args, "plot", None):
        raise ReqError(f"--plot draws the per-kernel breakdown, which {what} measures only on this machine, not over RPC")
    from .deploy import rpc

    return rpc.RemoteRunner(args.artifact, rpc=args.rpc, tracker=args.rpc_tracker, key=args.rpc_key,
                            timeout=args.rpc_timeout or rpc.DEFAULT_TIMEOUT, threads=args.threads)


def cmd_run(args) -> dict:
    from .deploy.runtime import Runner

    remote = _remote_runner(args, "run")
    try:
        return _classify(args, remote or Runner(args.artifact, threads=args.threads))
    finally:
        if remote is not None:
            remote.close()


def _classify(args, runner) -> dict:
    import numpy as np

    from PIL import Image, UnidentifiedImageError

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
    """Whole-model latency, then every kernel call timed standalone on its real arguments, with integer
    kernels' GMAC/s against this CPU's measured peak (`repq_tvm.deploy.profile`). Over RPC: the whole-model
    latency on the board."""
    from .deploy import profile
    from .deploy.runtime import Runner

    remote = _remote_runner(args, "profile")
    if remote is not None:
        with remote:
            return _profile_remote(args, remote)
    runner = Runner(args.artifact, threads=args.threads)
    result = {"artifact": args.artifact, "target": runner.manifest["target"]["name"],
              **profile.profile(runner, repeat=args.repeat)}
    if args.plot:
        profile.plot_breakdown(result, args.plot, f"{runner.manifest['model']} on {result['target']}")
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(profile.format_report(result)))
    return result


REMOTE_BREAKDOWN = ("per-kernel breakdown: not over RPC (the VM's instrument hook calls back into the process that runs "
                    "the model); run repq-tvm profile where the artifact runs for it")


def _profile_remote(args, runner) -> dict:
    """`profile` over RPC: whole-model latency timed on the board by time_evaluator; no kernel breakdown."""
    remote = runner.remote
    result = {"artifact": args.artifact, "target": runner.manifest["target"]["name"], "remote": remote,
              **runner.latency(repeat=args.repeat), "breakdown": REMOTE_BREAKDOWN}
    if args.json:
        print(json.dumps(result))
        return result
    via = f"tracker {remote['via'].split(' ', 1)[1]}, key {remote['key']}" if remote["key"] else "direct"
    threads = f"{result['threads']} TVM thread(s)" if result["threads"] is not None else "TVM threads unknown"
    print(f"RPC server {remote['server']} ({via}): {remote['triple'] or 'architecture unknown'}, "
          f"CPU {remote['cpu'] or 'unknown'}, {threads}; library uploaded and loaded in {remote['upload_seconds']:.2f} s")
    print(f"latency on the RPC server over {result['runs']} runs (batch {result['batch']}, time_evaluator there): "
          f"median {result['median_ms']:.2f} ms, p90 {result['p90_ms']:.2f} ms, min {result['min_ms']:.2f} ms")
    if remote["cpu"] == "generic":
        print("note: LLVM cannot name the server's CPU, as under an emulator (qemu-user): emulated timings mean nothing")
    print(REMOTE_BREAKDOWN)
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
    from .deploy.profile import latency
    from .deploy.runtime import Runner

    os.makedirs(args.out_dir, exist_ok=True)
    progress = not args.quiet
    fp32 = api.evaluate(DEFAULT_MODEL, progress=progress)
    rows = {"fp32": fp32["top1"]}
    for bits in (8, 4):
        out = os.path.join(args.out_dir, f"{DEFAULT_MODEL}_w{bits}a{bits}{CALIBRATED_SUFFIX}")
        api.calibrate_to_file(DEFAULT_MODEL, out, w_bits=bits, a_bits=bits, progress=progress)
        print(f"wrote {out}")
        rows[f"repq-vit W{bits}/A{bits}"] = api.evaluate(out, progress=progress)["top1"]
    art = os.path.join(args.out_dir, f"{DEFAULT_MODEL}_w4a4")
    built = api.compile_artifact(out, art, target="host", progress=_stderr_progress(args.quiet))
    print(f"wrote {art} for {built['target']} ({built['compile_seconds']} s)")
    rows["TVM integer W4/A4"] = api.evaluate(artifact=art, progress=progress)["top1"]
    speed = latency(Runner(art), repeat=50)
    rows["TVM latency ms (median, batch 1)"] = round(speed["median_ms"], 3)
    print(f"\n{DEFAULT_MODEL} on {fp32['images']} held-out CIFAR-10 images (top-1 %):")
    for name, value in rows.items():
        print(f"  {name:<34} {value:7.2f}")
    with open(os.path.join(args.out_dir, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def add_rpc_options(p: argparse.ArgumentParser, what: str) -> None:
    """--rpc HOST:PORT or --rpc-tracker HOST:PORT with --rpc-key KEY, and --rpc-timeout: run on a board."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rpc", type=host_port, metavar="HOST:PORT",
                   help=f"{what} on this TVM RPC server (python -m tvm.exec.rpc_server --port PORT)")
    g.add_argument("--rpc-tracker", type=host_port, metavar="HOST:PORT",
                   help=f"{what} on a free board of --rpc-key at this TVM RPC tracker (python -m tvm.exec.rpc_tracker)")
    p.add_argument("--rpc-key", type=rpc_key, metavar="KEY", help="with --rpc-tracker: the device key the board's "
                   "rpc_server registered with (--key)")
    p.add_argument("--rpc-timeout", type=RPC_TIMEOUT, metavar="SECONDS",
                   help="seconds to reach the tracker or server and to wait for a free board, 1 to 3600 (default 30)")


def build_parser() -> argparse.ArgumentParser:
    from .quant.config import METHODS

    p = Parser(prog="repq-tvm", description="RepQ-ViT quantization of Vision Transformers, "
               "compiled to integer code with Apache TVM.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("calibrate", help="calibrate a model with RepQ-ViT and write a .repq file")
    c.add_argument("--model", required=True, help="timm model name or bundled fixture (vit_cifar10, swin_cifar10)")
    c.add_argument("--checkpoint", help="weights (.safetensors, or a torch state dict loaded with weights_only)")
    c.add_argument("--data", help="calibration images: folder, tar or .npz (fixtures default to their own)")
    c.add_argument("--calib-size", type=CALIB_SIZE, default=32, help="calibration images, 1 to 1024")
    c.add_argument("--w-bits", type=int_choice(BITS, "weight bits"), default=4, help="weight bits: 4, 6 or 8")
    c.add_argument("--a-bits", type=int_choice(BITS, "activation bits"), default=4, help="activation bits: 4, 6 or 8")
    c.add_argument("--method", default="repq-vit", help=f"one of {', '.join(METHODS)}")
    c.add_argument("--seed", type=SEED, default=0, help="which calibration images are drawn (0 to 2^32-1)")
    c.add_argument("-o", "--output", type=output_file, required=True, help=f"output file (*{CALIBRATED_SUFFIX})")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="top-1/top-5 of an FP32 model or a calibrated .repq file")
    e.add_argument("--model", help="model name (FP32) or a calibrated .repq file")
    e.add_argument("--artifact", help="a compiled artifact folder (from repq-tvm compile)")
    e.add_argument("--checkpoint")
    e.add_argument("--data", help="evaluation images (fixtures default to the shipped held-out pack)")
    e.add_argument("--limit", type=LIMIT, help="evaluate a fixed random subset of N images (N >= 1)")
    e.add_argument("--threads", type=THREADS, help="with --artifact: " + THREADS_HELP)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compile", help="compile a calibrated .repq file to an integer artifact folder")
    c.add_argument("calibrated", help="the .repq file from repq-tvm calibrate")
    c.add_argument("--target", default="host",
                   help="host (the preset this CPU runs best), a preset name (x86_64-avx2, x86_64-avx512-vnni, "
                        "aarch64-neon-dotprod; `repq-tvm targets` lists them) or the path of your own preset .json")
    c.add_argument("-o", "--output", type=output_folder, required=True, help="artifact folder to write")
    c.add_argument("--batch", type=BATCH, default=1,
                   help="compiled batch size, 1 to 4096 (and what the model's activations allow on this machine)")
    c.add_argument("--dump-ir", type=work_folder, help="write the IR after every compiler phase into this folder")
    c.add_argument("--frontend", choices=("torch", "onnx"), default="torch",
                   help="import through torch.export (default) or through an exported QDQ ONNX file")
    c.add_argument("--tuning-log", metavar="DIR", help="a tuning-log folder from repq-tvm tune for this model, "
                   "bit widths, batch and target: its verified kernels replace the defaults")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("tune", help="MetaSchedule-tune a calibrated model's kernels into a tuning-log folder")
    u.add_argument("calibrated", help="the .repq file from repq-tvm calibrate")
    u.add_argument("--target", default="host", help="as for compile (tuning measures on this CPU, or on a board "
                   "with --rpc-tracker)")
    u.add_argument("--trials", type=TRIALS, default=200,
                   help="trial budget, spread over the kernels by their share of the run time (1 to 100000)")
    u.add_argument("-o", "--output", type=output_folder, help="tuning-log folder (default "
                   "tuning_logs/<model>-w<W>a<A>-b<batch>-<target>); a re-run continues from its database")
    u.add_argument("--batch", type=BATCH, default=1, help="the batch size the artifact will be compiled for")
    u.add_argument("--json", action="store_true")
    u.add_argument("--quiet", action="store_true")
    add_rpc_options(u, "measure the trials")
    u.set_defaults(func=cmd_tune)

    x = sub.add_parser("export-onnx", help="write a calibrated .repq file as a QDQ ONNX model")
    x.add_argument("calibrated")
    x.add_argument("-o", "--output", type=output_file, required=True, help="the .onnx file to write")
    x.add_argument("--batch", type=BATCH, default=1, help="the model's fixed batch size, 1 to 4096")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export_onnx)

    r = sub.add_parser("run", help="classify images with a compiled artifact (top-5)")
    r.add_argument("artifact")
    r.add_argument("images", nargs="+")
    r.add_argument("--threads", type=THREADS, help=THREADS_HELP + "; with --rpc*: on the RPC server")
    r.add_argument("--json", action="store_true")
    add_rpc_options(r, "run the model")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("profile", help="latency of a compiled artifact, with a per-kernel breakdown")
    f.add_argument("artifact")
    f.add_argument("--repeat", type=REPEAT, default=50, help="whole-model runs, 1 to 100000")
    f.add_argument("--threads", type=THREADS, help=THREADS_HELP + "; with --rpc*: on the RPC server")
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", type=plot_file, help="write a PNG bar chart of the slowest kernels (.png, .pdf, .svg)")
    add_rpc_options(f, "time the whole model (no kernel breakdown)")
    f.set_defaults(func=cmd_profile)

    t = sub.add_parser("targets", help="list the target presets, whether this CPU can run each, and what host picks")
    t.add_argument("presets", nargs="*", help="preset names or preset .json files to check (default: all presets)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_targets)

    d = sub.add_parser("demo", help="the default job: quantize the bundled ViT fixture and report accuracy")
    d.add_argument("--out-dir", type=work_folder, default="out")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # Parser.error (2) or --help (0): return the code, so main() can run in-process
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        print(f"repq-tvm: error: give a command: {', '.join(commands)} (see repq-tvm --help)", file=sys.stderr)
        return 2
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
