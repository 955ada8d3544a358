"""llvm-mca estimate of the aarch64 qdense k loop, q @ kT and attn @ V hot loops: MACs per cycle against the sdot
peak (no ARM hardware here).

Why an estimate: this project has no ARM machine, and timings under qemu mean nothing.  Each kernel is built
for an aarch64 preset exactly as `repq-tvm compile` builds it (`testing.qdense.build_qdense`, default tiles),
cross-linked, disassembled; the innermost loop with the most vector MACs (the k loop) goes through llvm-mca, and

    MACs/cycle = vector MACs in the loop body / llvm-mca cycles per iteration (200 iterations)

with sdot/udot .4s = 16, smmla = 32, smlal/smull(2) .4s = 4 (.8h = 8), mla/mul .4s = 4 MACs per
instruction; scalar multiplies (address arithmetic) count 0.  The sdot peak of a core with two 128-bit
SIMD pipes (Cortex-A76, Neoverse N1) is 2 x 16 = 32 MACs/cycle.  It is a steady-state estimate of the
loop alone: no cache misses, no epilogue, no threads.

q @ kT (`kernels.qbmm`, `testing.qbmm.QBmm` as the graph pass builds it, k in rows): the same, on the innermost loop
with the most MACs.  With a head dim of 64 that is the d loop (sdot and loads only; each tile's start value and
epilogue, 3 SIMD instructions per 4 outputs, run outside it); with 32 LLVM unrolls the d loop and the hot loop is a
whole register tile, epilogue included ("converts" > 0 in the row).

attn @ V of the log√2 attention (`kernels.attn_v`, `testing.attn_v.AttnV` as the graph pass builds it, attention and
V codes of 4 and 8 bits: 2 weight planes): the token loop.  Its "useful" MACs/cycle count the
int16-equivalent multiply-accumulates W·v: with the udot variant's two weight bands each is done twice, so they are
the loop's udot MACs halved (peak 16); the smlal fallback does each once.  With ``--whole`` (needs the arm64 sysroot
of `make aarch64-sysroot`) it also estimates the whole kernel, preparation and epilogue included: the kernel runs
once under qemu-aarch64-static (one thread, zero inputs: its control flow does not depend on the data), which counts
the executions of every translation block (`qemu -d exec,nochain`) of the library; each block's llvm-mca cycles
times its count, summed, divide the useful MACs planes·Bt·M·N·D of the unpadded shape.

LLVM's scheduling models matter: `cortex-a76` uses the Cortex-A57 model in LLVM 14-19 (one load pipe);
`neoverse-n1` has its own model from LLVM 18 (two load pipes).  The figures name the model llvm-mca used.

    python benchmarks/kernel_dense_arm_mca.py           # fixture fc1 + DeiT-S fc1 (W4/A4, W8/A8), q @ kT, attn @ V
    python benchmarks/kernel_dense_arm_mca.py --llvm-mca llvm-mca-19 --shapes 197x384x1536 --bits 6,6 --qk-shapes
    python benchmarks/kernel_dense_arm_mca.py --shapes --qk-shapes --whole   # attn @ V only, whole-kernel too
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import tempfile

SHAPES = [(65, 512, 128), (197, 1536, 384)]  # ViT fixture fc1, DeiT-Small fc1 (tokens, out, in)
QK_SHAPES = [(4, 65, 65, 32), (6, 197, 197, 64)]  # q @ kT, ViT fixture and DeiT-Small (heads, tokens, tokens, head dim)
ATTN_V_SHAPES = QK_SHAPES  # attn @ V, the same heads
ATTN_BITS = (4, 8)  # attention / V code bits: the fixture's W4/A4 and W8/A8
CPUS = ("cortex-a76", "neoverse-n1")
SDOT_PEAK = 32
OBJDUMP = "aarch64-linux-gnu-objdump"
_BRANCHES = ("cbz", "cbnz", "tbz", "tbnz")


def vector_macs(op: str, args: str) -> int:
    """Multiply-accumulates of one instruction (0 for scalar ones)."""
    if op in ("sdot", "udot", "usdot", "sudot"):
        return 16 if ".4s" in args else 8
    if op in ("smmla", "ummla", "usmmla"):
        return 32
    arrangement = re.match(r"v\d+\.(\d+)([bhsd])", args)
    if not arrangement:
        return 0
    lanes = int(arrangement.group(1))
    if op in ("smlal", "smlal2", "smull", "smull2", "umlal", "umlal2", "umull", "umull2", "mla", "mul"):
        return lanes
    return 0


def instructions(disassembly: str) -> list[tuple[int, str, str]]:
    """(address, op, operands) of objdump lines (operands on the same line: ``ret`` has none)."""
    return [(int(m.group(1), 16), m.group(2), m.group(3).split("//")[0].strip())
            for m in re.finditer(r"^\s*([0-9a-f]+):\s+(\S+)[ \t]*(.*)$", disassembly, re.M)]


def innermost_loops(disassembly: str) -> list[list[tuple[str, str]]]:
    """Innermost loops of one function's objdump: the (op, args) from a backward branch's target up to the
    branch, holding no other backward branch (forward exits allowed; branches themselves left out)."""
    ins = instructions(disassembly)
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    is_branch = lambda op: op == "b" or op.startswith("b.") or op in _BRANCHES  # noqa: E731

    def back_target(i):
        _, op, args = ins[i]
        target = re.search(r"\b([0-9a-f]+) <", args)
        start = index.get(int(target.group(1), 16)) if is_branch(op) and target else None
        return start if start is not None and start < i else None

    loops = []
    for i in range(len(ins)):
        start = back_target(i)
        if start is not None and all(back_target(j) is None for j in range(start, i)):
            loops.append([(o, a) for _, o, a in ins[start:i] if not is_branch(o)])
    return loops


def function_disassembly(so: str, name: str) -> str:
    asm = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    for part in re.split(r"\n(?=[0-9a-f]+ <)", asm):
        if re.match(r"[0-9a-f]+ <[^>]*" + re.escape(name) + r"[^>]*_compute_>:", part):
            return part
    raise SystemExit(f"no compute function matching {name} in {so}")


def _mc_operands(args: str) -> str:
    """objdump operands as llvm-mc reads them: no "<symbol+offset>" notes, a bare hex address (adrp) as 0x..."""
    return re.sub(r"\b([0-9a-f]+) <[^>]*>$", r"0x\1", args)


def mca(loop: list[tuple[str, str]], cpu: str, llvm_mca: str) -> tuple[float, str]:
    """(cycles per iteration, scheduling model) of the loop body on `cpu`."""
    src = "\n".join(f"{op} {_mc_operands(args)}" for op, args in loop)
    out = subprocess.run([llvm_mca, "-mtriple=aarch64", f"-mcpu={cpu}", "-iterations=200"], input=src,
                         capture_output=True, text=True, check=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / 200
    unit = re.search(r"\[\d+(?:\.\d+)?\]\s+-\s+(\w+?)Unit", out)
    return cycles, (unit.group(1) if unit else "?")


def estimate(so: str, name: str, cpus, llvm_mca: str) -> dict:
    loops = innermost_loops(function_disassembly(so, name))
    loop = max(loops, key=lambda lp: sum(vector_macs(o, a) for o, a in lp), default=None)
    macs = sum(vector_macs(o, a) for o, a in loop or [])
    if not macs:
        raise SystemExit(f"{name}: no loop with vector multiply-accumulates")
    ops: dict[str, int] = {}
    for o, _ in loop:
        ops[o] = ops.get(o, 0) + 1
    row = {"instructions": len(loop), "macs": macs, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:6]),
           "spills": sum("[sp" in a for _, a in loop), "converts": ops.get("scvtf", 0), "cpus": {}}
    for cpu in cpus:
        cycles, model = mca(loop, cpu, llvm_mca)
        row["cpus"][cpu] = {"cycles_per_iter": cycles, "macs_per_cycle": round(macs / cycles, 2),
                            "of_sdot_peak": round(macs / cycles / SDOT_PEAK, 3), "model": model}
    return row


_GUEST = """
import sys, numpy as np, tvm
so, npz = sys.argv[1:]
data = np.load(npz)
fn = tvm.runtime.load_module(so)["main"]
print(next(line for line in open("/proc/self/maps") if so in line and " r-xp " in line))
fn(*[tvm.runtime.tensor(data[f"arg{i}"]) for i in range(len(data.files))])
"""


def block_counts(so: str, args: list, sysroot: str) -> collections.Counter:
    """Executions of each translation block of the library (by offset) when its main runs once on ``args`` under
    qemu-aarch64-static, one thread.  A first run finds where the library is mapped, the second logs only there."""
    import numpy as np

    from repq_tvm.deploy import qemu

    npz = so + ".npz"
    np.savez(npz, **{f"arg{i}": a for i, a in enumerate(args)})
    env = {**qemu.guest_env(sysroot), "TVM_NUM_THREADS": "1"}
    guest = ["-L", sysroot, os.path.join(sysroot, "usr", "bin", "python3"), "-c", _GUEST, so, npz]
    maps = subprocess.run(["qemu-aarch64-static", *guest], env=env, capture_output=True, text=True, check=True).stdout
    start, end = (int(x, 16) for x in re.match(r"([0-9a-f]+)-([0-9a-f]+)", maps).groups())
    log = so + ".tb"
    subprocess.run(["qemu-aarch64-static", "-d", "exec,nochain", "-dfilter", f"0x{start:x}..0x{end:x}", "-D", log,
                    *guest], env=env, capture_output=True, text=True, check=True)
    with open(log) as f:  # lines "Trace 0: 0x... [tb flags/guest pc/...]"
        pcs = re.finditer(r"\[[0-9a-f]+/([0-9a-f]+)/", f.read())
    return collections.Counter(int(m.group(1), 16) - start for m in pcs)


def whole_kernel_cycles(so: str, counts: collections.Counter, cpus, llvm_mca: str) -> dict:
    """cpu -> Σ over executed blocks of (llvm-mca cycles per execution of the block) x (executions); a block runs
    from its start to the first branch (counted as one cycle), a 4 KiB page end or 512 instructions, as qemu's."""
    dis = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    ins = instructions(dis)
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    is_branch = lambda op: op in ("b", "bl", "br", "blr", "ret") or op.startswith("b.") or op in _BRANCHES  # noqa: E731
    totals = dict.fromkeys(cpus, 0.0)
    for offset, n in counts.items():
        i = index[offset]
        body = []
        while not is_branch(ins[i][1]) and len(body) < 512:
            body.append(ins[i][1:])
            i += 1
            if ins[i][0] % 4096 == 0:
                break
        for cpu in cpus:
            totals[cpu] += n * ((mca(body, cpu, llvm_mca)[0] if body else 0) + 1)
    return totals


def attn_v_rows(preset_name: str, shapes, cpus, llvm_mca: str, tmp: str, sysroot: str | None) -> list[dict]:
    """One row per attn @ V shape and attention code width: the token loop, and with ``sysroot`` the whole kernel."""
    import numpy as np
    import tvm

    from repq_tvm import targets
    from repq_tvm.kernels import attn_v as AV
    from repq_tvm.reference import ops
    from repq_tvm.testing.attn_v import AttnV

    preset = targets.load(preset_name)
    fcompile = tvm.support.cc.cross_compiler(preset["cross_compiler"])
    rows = []
    for Bt, M, N, D in shapes:
        for bits in ATTN_BITS:
            f = ops.attn_frac_bits(N, bits)
            groups = ops.attn_groups(bits, f)
            planes = groups
            kernel = AttnV(Bt, M, N, D, targets.tvm_target(preset), groups=groups, f=f, v_bits=bits)
            so = os.path.join(tmp, f"attn_v_{preset_name}_{Bt}x{M}x{N}x{D}_a{bits}.so")
            kernel.executable.export_library(so, fcompile=fcompile)
            bands = AV.weight_bands(f, groups) if kernel.variant == "neon_udot" else 1
            row = {"preset": preset_name, "kernel": "attn@V", "shape": f"{Bt}x{M}x{N}x{D}", "bits": f"A{bits}",
                   "planes": planes, "bands": bands, "variant": kernel.variant,
                   "tiles": list(AV.default_tiles(M, kernel.variant, planes)), **estimate(so, "main", cpus, llvm_mca)}
            for r in row["cpus"].values():
                r["useful_macs_per_cycle"] = round(r["macs_per_cycle"] / bands, 2)
            if sysroot:
                zeros = kernel.args(np.zeros((Bt, planes, M, N), np.int16), np.zeros((Bt, N, D), np.uint8), 0)
                cycles = whole_kernel_cycles(so, block_counts(so, [x.numpy() for x in zeros], sysroot), cpus, llvm_mca)
                useful = planes * Bt * M * N * D
                row["whole_kernel"] = {cpu: {"cycles": round(c), "useful_macs_per_cycle": round(useful / c, 2)}
                                       for cpu, c in cycles.items()}
            rows.append(row)
            figures = ", ".join(f"{cpu} {r['useful_macs_per_cycle']:.1f}" for cpu, r in row["cpus"].items())
            whole = ", ".join(f"{cpu} {r['useful_macs_per_cycle']:.1f}"
                              for cpu, r in row.get("whole_kernel", {}).items())
            print(f"{preset_name:22s} attn@V {row['shape']:>11s} {row['bits']} ({planes} planes) {row['variant']:9s} "
                  f"tiles {tuple(row['tiles'])}: loop of {row['instructions']} instr "
                  f"({', '.join(f'{k} {v}' for k, v in row['ops'].items())}), {row['macs']} MACs in {bands} band(s), "
                  f"{row['spills']} stack refs -> useful MACs/cycle {figures}"
                  + (f"; whole kernel {whole}" if whole else ""), flush=True)
    return rows


def default_llvm_mca() -> str:
    for name in ("llvm-mca-21", "llvm-mca-20", "llvm-mca-19", "llvm-mca-18", "llvm-mca"):
        if shutil.which(name):
            return name
    raise SystemExit("llvm-mca is not installed (Debian: apt-get install llvm, or llvm-19 for the Neoverse N1 model)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="MxNxK (default: 65x512x128 197x1536x384; the flag alone: none)")
    ap.add_argument("--bits", nargs="*", default=["4,4", "8,8"], help="bits_a,bits_w pairs (default 4,4 8,8)")
    ap.add_argument("--qk-shapes", nargs="*", help="q @ kT BtxMxNxD (default: 4x65x65x32 6x197x197x64; "
                    "the flag alone: none)")
    ap.add_argument("--attn-v-shapes", nargs="*", help="attn @ V BtxMxNxD (default: 4x65x65x32 6x197x197x64; "
                    "the flag alone: none)")
    ap.add_argument("--whole", action="store_true", help="attn @ V: whole-kernel estimate too (qemu, the arm64 "
                    "sysroot of `make aarch64-sysroot`)")
    ap.add_argument("--presets", nargs="*", default=["aarch64-neon-dotprod", "aarch64-neon"])
    ap.add_argument("--cpus", nargs="*", default=list(CPUS))
    ap.add_argument("--llvm-mca", default=None, help="llvm-mca binary (default: the newest on PATH)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    llvm_mca = args.llvm_mca or default_llvm_mca()
    version = subprocess.run([llvm_mca, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"LLVM version ([\d.]+)", version).group(1)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes]
    qk_shapes = QK_SHAPES if args.qk_shapes is None else [tuple(map(int, s.split("x"))) for s in args.qk_shapes]
    attn_v_shapes = ATTN_V_SHAPES if args.attn_v_shapes is None else [
        tuple(map(int, s.split("x"))) for s in args.attn_v_shapes]
    sysroot = None
    if args.whole:
        from repq_tvm.deploy import qemu

        sysroot = os.path.abspath(qemu.default_sysroot())
        qemu.check_sysroot(sysroot)

    import tvm

    from repq_tvm import targets
    from repq_tvm.kernels import qbmm as QK
    from repq_tvm.testing.qbmm import QBmm
    from repq_tvm.testing.qdense import build_qdense

    rows = []
    with tempfile.TemporaryDirectory(prefix="repq-mca-") as tmp:
        for preset_name in args.presets:
            preset = targets.load(preset_name)
            fcompile = tvm.support.cc.cross_compiler(preset["cross_compiler"])
            for M, N, K in shapes:
                for bits in args.bits:
                    bits_a, bits_w = map(int, bits.split(","))
                    kernel = build_qdense(M, N, K, targets.tvm_target(preset), bits_a=bits_a, bits_w=bits_w,
                                          epilogue=True)
                    so = os.path.join(tmp, f"k{len(rows)}.so")
                    kernel.executable.export_library(so, fcompile=fcompile)
                    row = {"preset": preset_name, "kernel": "dense", "shape": f"{M}x{N}x{K}",
                           "bits": f"W{bits_w}/A{bits_a}",
                           "variant": kernel.variant.name, "tiles": list(kernel.tiles),
                           "compensated": kernel.compensate, "llvm_mca": version,
                           **estimate(so, "main", args.cpus, llvm_mca)}
                    rows.append(row)
                    figures = ", ".join(f"{cpu} {r['macs_per_cycle']:.1f} ({r['model']} model)"
                                        for cpu, r in row["cpus"].items())
                    print(f"{preset_name:22s} {row['shape']:>12s} {row['bits']:7s} {row['variant']:9s} "
                          f"tiles {tuple(kernel.tiles)}: loop of {row['instructions']} instr "
                          f"({', '.join(f'{k} {v}' for k, v in row['ops'].items())}), {row['macs']} MACs, "
                          f"{row['spills']} stack refs -> MACs/cycle {figures}  [peak {SDOT_PEAK}]", flush=True)
            for Bt, M, N, D in qk_shapes:
                kernel = QBmm(Bt, M, N, D, targets.tvm_target(preset))
                so = os.path.join(tmp, f"k{len(rows)}.so")
                kernel.executable.export_library(so, fcompile=fcompile)
                tiles = QK.default_tiles(M, kernel.variant, N, D) if kernel.variant == "neon_sdot" else None
                row = {"preset": preset_name, "kernel": "q@kT", "shape": f"{Bt}x{M}x{N}x{D}",
                       "variant": kernel.variant, "tiles": list(tiles or QK.default_tiles(M, kernel.variant)),
                       "order": QK.sdot_order(D) if tiles else None, "llvm_mca": version,
                       **estimate(so, "main", args.cpus, llvm_mca)}
                rows.append(row)
                figures = ", ".join(f"{cpu} {r['macs_per_cycle']:.1f} ({r['model']} model)"
                                    for cpu, r in row["cpus"].items())
                print(f"{preset_name:22s} q@kT {row['shape']:>13s} {row['variant']:9s} tiles {tuple(row['tiles'])} "
                      f"{row['order'] or ''}: loop of {row['instructions']} instr "
                      f"({', '.join(f'{k} {v}' for k, v in row['ops'].items())}), {row['macs']} MACs, "
                      f"{row['converts']} converts, {row['spills']} stack refs -> MACs/cycle {figures}", flush=True)
            rows += attn_v_rows(preset_name, attn_v_shapes, args.cpus, llvm_mca, tmp, sysroot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"llvm_mca": version, "sdot_peak": SDOT_PEAK, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
