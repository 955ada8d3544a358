"""repq-tvm compile --target aarch64-neon-dotprod: a cross-linked aarch64 library, refused on x86, and (slow,
opt-in) run under user-mode QEMU with the device runner, agreeing with the x86 build of the same model.

The default tests need the cross compiler (Debian gcc-aarch64-linux-gnu: `make aarch64-tools`); the slow one also
needs qemu-user-static and the arm64 sysroot from `make aarch64-sysroot`.
"""

import ast
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import require_cross_compiler

from repq_tvm import data, models, targets
from repq_tvm.cli import main
from repq_tvm.deploy import cross, qemu
from repq_tvm.deploy.runtime import Runner
from repq_tvm.errors import ReqError
from repq_tvm.evaluate import load_batch, make_transform

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="cross-compiles from an x86_64 host")

TARGET = "aarch64-neon-dotprod"
EM_AARCH64 = 183


def elf_machine(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert head[4] == 2 and head[5] == 1, "expected a 64-bit little-endian ELF"
    return struct.unpack_from("<H", head, 18)[0]  # e_machine


def test_library_is_an_aarch64_elf(vit_aarch64_build):
    assert elf_machine(os.path.join(vit_aarch64_build[1], "model.so")) == EM_AARCH64


def kernel_symbols(so: str, prefix: str) -> set[str]:
    """Names of the library's functions that start with `prefix` (binutils' aarch64 objdump symbol table)."""
    table = subprocess.run(["aarch64-linux-gnu-objdump", "-t", so], capture_output=True, text=True, check=True).stdout
    return {name for name in re.findall(r"\s(\S+)$", table, re.M) if name.startswith(prefix)}


def test_attention_logits_run_on_sdot(vit_aarch64_build):
    """The preset's q @ kT kernels are the sdot variant (so the qemu comparison below covers them)."""
    names = kernel_symbols(os.path.join(vit_aarch64_build[1], "model.so"), "repq_qbmm")
    assert names and all(name.startswith("repq_qbmm_neon_sdot_") for name in names), names


def test_attention_times_v_runs_on_udot(vit_aarch64_build):
    """The preset's attn @ V kernels are the udot variant (so the qemu comparison below covers them)."""
    names = kernel_symbols(os.path.join(vit_aarch64_build[1], "model.so"), "repq_attn_v")
    assert names and all(name.startswith("repq_attn_v_neon_udot_") for name in names), names


def test_softmax_weights_are_one_kernel_for_every_block(vit_aarch64_build):
    """aarch64 keeps the three attention kernels; the fused softmax → log weights one reads its log quantizer's
    log2(s) at run time, so the fixture's six blocks call one kernel (each block's was a copy before)."""
    names = kernel_symbols(os.path.join(vit_aarch64_build[1], "model.so"), "repq_log_weights_softmax_")
    assert len({re.sub(r"_compute_$", "", name) for name in names}) == 1, names


def test_manifest_records_the_cross_compile(vit_aarch64_build):
    manifest = json.load(open(os.path.join(vit_aarch64_build[1], "manifest.json")))
    assert manifest["target"]["name"] == TARGET
    build = manifest["build"]
    assert build["cross_compiled"] is True and build["compiler"] == "aarch64-linux-gnu-gcc"
    assert build["host"] == "x86_64" and build["compiler_version"].startswith("aarch64-linux-gnu-gcc")


def test_run_on_x86_is_refused_naming_the_runner(vit_aarch64_build, capsys, tmp_path):
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.load(models.fixture_file(models.FIXTURE_EVAL_DATA))["images"][0]).save(img)
    capsys.readouterr()
    assert main(["run", vit_aarch64_build[1], str(img)]) == 2
    err = capsys.readouterr().err
    assert "built for aarch64" in err and "qemu-aarch64-static" in err and len(err.strip().splitlines()) == 1


def test_host_build_is_not_cross_compiled():
    assert cross.fcompile_for(targets.load("x86_64-avx2")) is None
    assert cross.build_info(None) == {"host": "x86_64", "cross_compiled": False}


def test_missing_cross_compiler_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no aarch64-linux-gnu-gcc
    with pytest.raises(ReqError, match="aarch64-linux-gnu-gcc .*not on PATH.*gcc-aarch64-linux-gnu"):
        cross.fcompile_for(targets.load(TARGET))
    # through the CLI it fails before loading or compiling anything (the .repq file need not exist)
    assert main(["compile", str(tmp_path / "absent.repq"), "--target", TARGET, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repq-tvm: error: cross compiler aarch64-linux-gnu-gcc") and "\n" not in err
    assert not (tmp_path / "a").exists()


def test_preset_without_cross_compiler_is_refused():
    preset = {**targets.load(TARGET), "cross_compiler": None}
    with pytest.raises(ReqError, match="names no cross_compiler"):
        cross.fcompile_for(preset)


def test_qemu_helper_errors(vit_aarch64_build, tmp_path, monkeypatch):
    with pytest.raises(ReqError, match="no aarch64 sysroot at .*make aarch64-sysroot"):
        qemu.check_sysroot(str(tmp_path / "none"))
    (tmp_path / "half" / "usr" / "bin").mkdir(parents=True)
    with pytest.raises(ReqError, match="no usr/bin/python3"):
        qemu.check_sysroot(str(tmp_path / "half"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ReqError, match="qemu-aarch64-static is not on PATH.*qemu-user-static"):
        qemu.run_under_qemu(vit_aarch64_build[1], np.zeros((1, 3, 32, 32), np.float32), sysroot=str(tmp_path / "none"))


def test_device_runner_needs_no_repq_tvm_or_torch():
    tree = ast.parse(open(qemu.DEVICE_RUNNER).read())
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imports <= {"argparse", "hashlib", "json", "os", "platform", "sys", "time", "numpy", "tvm"}, imports


def test_device_runner_checks_hash_and_architecture(vit_aarch64_build, tmp_path):
    """device_run.py on this x86 machine: the aarch64 library is refused before TVM is even imported."""
    inp, out = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(inp, np.zeros((2, 3, 32, 32), np.float32))

    def device_run(art):
        proc = subprocess.run([sys.executable, qemu.DEVICE_RUNNER, str(art), str(inp), str(out)],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr.strip()

    code, err = device_run(vit_aarch64_build[1])
    assert code == 2 and "built for aarch64-neon-dotprod" in err and "this machine is x86_64" in err, err
    tampered = tmp_path / "tampered"
    shutil.copytree(vit_aarch64_build[1], tampered)
    lib = bytearray((tampered / "model.so").read_bytes())
    lib[100] ^= 0xFF
    (tampered / "model.so").write_bytes(bytes(lib))
    code, err = device_run(tampered)
    assert code == 2 and "does not match its SHA-256" in err, err
    assert not out.exists()


def test_device_runner_on_this_host_matches_runner(vit_host_build, tmp_path):
    """device_run.py on an artifact for this machine: every image of the batch through its one input tensor gives
    `Runner`'s logits bit for bit."""
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    inp, out = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(inp, x)
    proc = subprocess.run([sys.executable, qemu.DEVICE_RUNNER, vit_host_build[1], str(inp), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["images"] == 3
    logits = np.load(out)
    assert np.array_equal(logits, Runner(vit_host_build[1]).predict(x))
    assert not np.array_equal(logits[0], logits[1])


# Agreement between the aarch64 build (run under QEMU) and the x86 build of the same calibrated model.
# Integer kernels are exact on both, but the float ops between them (LayerNorm, softmax, GELU, requantization
# scales) are vectorised and FMA-contracted differently by LLVM for NEON and AVX2, so values differ in the last
# float bits (~1e-6 relative). Usually that vanishes in the next quantizer's rounding; rarely a value sits within
# that distance of a rounding midpoint and moves one code step, which shows as a visible logit change on that
# image (the same effect test_compile.py sees between TVM and PyTorch). So: every argmax equal, nearly all images
# equal to float rounding (1e-4 on logits of magnitude ~1-10), and no image further off than one code step can
# explain (0.5). Measured with TVM 0.27: bit-identical logits on all 1000 held-out images, so these bounds only
# leave room for float schedules that come to differ per target.
QEMU_IMAGES = 32


def _assert_qemu_matches_host(art: str, host_art: str) -> None:
    """`art` (aarch64) under QEMU and `host_art` (the same calibrated file built for this host) on held-out
    images spread over all classes: equal logits."""
    sysroot = os.path.abspath(qemu.default_sysroot())
    if not os.path.isdir(sysroot):
        pytest.fail(f"no aarch64 sysroot at {sysroot}: run `make aarch64-sysroot` "
                    f"(or point {qemu.SYSROOT_ENV} at one)")
    runner = Runner(host_art)
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    idx = np.linspace(0, len(source) - 1, QEMU_IMAGES).astype(int)  # spread over all classes
    x, _ = load_batch(source, idx, make_transform(runner.manifest["preprocessing"]))
    x = x.numpy()

    info, t0 = {}, time.time()
    arm = qemu.run_under_qemu(art, x, sysroot=sysroot, info=info)
    wall = time.time() - t0
    ref = runner.predict(x)

    assert info["machine"] == "aarch64" and arm.shape == ref.shape
    per_image = np.abs(arm - ref).max(1)
    exact_share = (per_image < 1e-4).mean()
    print(f"\naarch64 (qemu) vs x86 on {len(x)} images: argmax agree {(arm.argmax(1) == ref.argmax(1)).mean():.3f}, "
          f"max |diff| {per_image.max():.2e}, median {np.median(per_image):.2e}, share < 1e-4 {exact_share:.3f}, "
          f"bit-identical {np.array_equal(arm, ref)}; "
          f"qemu wall {wall:.1f} s (load {info['load_seconds']} s, run {info['run_seconds']} s)")
    # integer kernels are exact and every float sum adds its partials in the same order on both builds
    # (`float_schedules.PARTIALS`, `log_weights.VECTOR`), and no fused kernel lets LLVM contract a product into an
    # add the unfused graph rounds between (`epilogue.as_stored`): the logits are equal, not merely close
    assert np.array_equal(arm, ref), f"max |diff| {per_image.max():.3g} on {(per_image > 0).sum()} images"


@pytest.mark.slow
def test_aarch64_under_qemu_matches_x86(vit_aarch64_build, vit_host_build):
    _assert_qemu_matches_host(vit_aarch64_build[1], vit_host_build[1])


@pytest.mark.slow
def test_swin_aarch64_under_qemu_matches_x86(tmp_path):
    """The Swin fixture at W8/A8: its shifted windows' mask and relative position bias are logit terms of the x86
    fused attention and separate adds on aarch64 (an FMA there had moved 2 of these 32 images by up to 0.027)."""
    require_cross_compiler(TARGET)
    cal = str(tmp_path / "swin.repq")
    assert main(["calibrate", "--model", "swin_cifar10", "--w-bits", "8", "--a-bits", "8", "-o", cal, "--quiet"]) == 0
    for target, name in ((TARGET, "arm"), ("host", "x86")):
        assert main(["compile", cal, "--target", target, "-o", str(tmp_path / name), "--quiet"]) == 0
    _assert_qemu_matches_host(str(tmp_path / "arm"), str(tmp_path / "x86"))
