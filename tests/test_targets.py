"""Target presets: shipped and user preset files (validated, one-line errors), `host` detection and the runnable
check from given CPU flag sets (valid on AVX2, AVX-512 VNNI and AMX hosts alike), `repq-tvm targets`, and the
presets reaching a non-editable (wheel) install."""

import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tvm

from repq_tvm import targets
from repq_tvm.cli import main
from repq_tvm.errors import ReqError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "targets").glob("*.json"))

# /proc/cpuinfo flag sets of real CPUs (the parts that matter)
BASE_X86 = {"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "aes", "avx", "f16c", "bmi1"}
ZEN3 = BASE_X86 | {"avx2", "fma", "bmi2", "adx", "sha_ni", "vaes"}  # AVX2, no AVX-512
ZEN4 = ZEN3 | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni"}
NEOVERSE_N1 = {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "asimdrdm", "asimddp"}
CORTEX_A53 = {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32"}  # no dot product

VALID = {"name": "my-haswell", "description": "a user's own preset", "int8_dot": "avx2", "cross_compiler": None,
         "runner": None, "tvm_target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell",
                                        "mattr": ["+avx2", "+fma"]}}


def write_preset(tmp_path, content, name="mine.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# --- presets -------------------------------------------------------------------------------------
def test_presets_cover_x86_and_arm():
    names = targets.available()
    assert {"x86_64-amx", "x86_64-avx512-vnni", "x86_64-avx2", "aarch64-neon-dotprod", "aarch64-neon"} <= set(names)
    arm = targets.load("aarch64-neon-dotprod")
    assert arm["tvm_target"]["mtriple"] == "aarch64-linux-gnu" and "+dotprod" in arm["tvm_target"]["mattr"]
    assert arm["cross_compiler"] == "aarch64-linux-gnu-gcc"
    plain = targets.load("aarch64-neon")  # Cortex-A72 (Raspberry Pi 4): NEON, no dot product
    assert plain["tvm_target"]["mtriple"] == "aarch64-linux-gnu" and plain["tvm_target"]["mattr"] == ["+neon"]
    assert targets.target_has(plain, "neon") and not targets.target_has(plain, "dotprod")
    assert plain["cross_compiler"] == "aarch64-linux-gnu-gcc" and plain["runner"] == "qemu-aarch64-static"


def test_every_shipped_preset_is_valid_and_named_after_its_file():
    assert targets.available() == SHIPPED
    for name in SHIPPED:
        preset = targets.load(name)
        assert preset["name"] == name and preset["description"]


def test_host_resolves_to_a_preset():
    assert targets.load("host")["name"] in targets.available()
    assert targets.load("host")["name"] == targets.host_name()


def test_unknown_target():
    with pytest.raises(ReqError, match="unknown target 'riscv'"):
        targets.load("riscv")


def test_corrupt_preset(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv("REPQ_TVM_TARGETS", str(tmp_path))
    with pytest.raises(ReqError, match="target preset .*broken.json is not valid JSON"):
        targets.load("broken")


def test_user_preset_file_is_loaded_and_compiles_a_kernel(tmp_path):
    from repq_tvm.testing.qdense import build_qdense

    path = write_preset(tmp_path, VALID)
    assert targets.load(path) == VALID
    target = targets.tvm_target(path)
    assert target.attrs["mcpu"] == "haswell" and target.attrs["num-cores"] == (os.cpu_count() or 1)
    kernel = build_qdense(8, 16, 12, path, bits_a=8, bits_w=8)  # a kernel builder takes the file's path too
    assert kernel.variant.name == "avx2_i16"
    assert targets.runnable_reason(path, flags=ZEN3, machine="x86_64") is None
    assert "AVX2" in targets.runnable_reason(path, flags=BASE_X86, machine="x86_64")


BAD_PRESETS = [
    ("{not json", " is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[1, 2]", ": expected a JSON object, got list"),
    ({"name": "x", "tvm_target": {"kind": "llvm"}}, " lacks int8_dot, cross_compiler, runner"),
    ({**VALID, "cross_compiler": 3}, ": cross_compiler must be a string or null, got 3"),
    ({**VALID, "name": ""}, ': name must be a non-empty string, got ""'),
    ({**VALID, "tvm_target": ["llvm"]}, ': tvm_target must be an object (a TVM target config), got ["llvm"]'),
    ({**VALID, "tvm_target": {"kind": "cuda"}}, ": tvm_target must have kind llvm (a CPU target), got 'cuda'"),
    ({**VALID, "tvm_target": {"kind": "llvm", "mattr": "+avx2"}},
     ": tvm_target is rejected by TVM: Option 'mattr': expected type 'Array<str>' but got 'ffi.SmallStr'."),
    ({**VALID, "tvm_target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswel"}},
     ": tvm_target has mcpu 'haswel', which LLVM does not know for x86_64-linux-gnu"),
    ({**VALID, "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+dotprd"]}},
     ": tvm_target has mattr '+dotprd', a feature LLVM does not know for aarch64-linux-gnu"),
    ({**VALID, "tvm_target": {"kind": "llvm", "mtriple": "z80-none-elf"}},
     ": tvm_target has mtriple 'z80-none-elf', an architecture this TVM's LLVM cannot generate code for"),
]


@pytest.mark.parametrize("content,problem", BAD_PRESETS, ids=range(len(BAD_PRESETS)))
def test_malformed_user_preset_is_one_exact_line(tmp_path, capsys, content, problem):
    path = write_preset(tmp_path, content)
    with pytest.raises(ReqError) as err:
        targets.load(path)
    assert str(err.value) == f"target preset {path}{problem}"
    # through the CLI: refused before the calibrated file is even opened
    capsys.readouterr()
    assert main(["compile", str(tmp_path / "absent.repq"), "--target", path, "-o", str(tmp_path / "art")]) == 2
    assert capsys.readouterr().err == f"repq-tvm: error: target preset {path}{problem}\n"


def test_missing_user_preset_file(tmp_path):
    with pytest.raises(ReqError, match=r"^target preset file .*nothere\.json does not exist$"):
        targets.load(str(tmp_path / "nothere.json"))


# --- the host and the runnable check -------------------------------------------------------------
# (machine, CPU flags) -> host preset, and the presets that CPU cannot run with a phrase of the reason
ARM_CODE = {"aarch64-neon-dotprod": "aarch64 code", "aarch64-neon": "aarch64 code"}
X86_CODE = {"x86_64-avx2": "x86_64 code", "x86_64-avx512-vnni": "x86_64 code", "x86_64-amx": "x86_64 code"}
NO_AMX = {"x86_64-amx": "needs AMX-TILE, AMX-INT8, AMX-BF16"}
MACHINES = {
    "zen3-avx2": ("x86_64", ZEN3, "x86_64-avx2", {"x86_64-avx512-vnni": "needs AVX-512F, AVX-512 VNNI",
                                                  "x86_64-amx": "needs AVX-512F, AVX-512 VNNI, AMX-TILE",
                                                  **ARM_CODE}),
    "zen4-vnni": ("x86_64", ZEN4, "x86_64-avx512-vnni", {**NO_AMX, **ARM_CODE}),
    "sapphire-rapids-amx": ("AMD64", SAPPHIRE_RAPIDS, "x86_64-amx", ARM_CODE),
    "neoverse-n1": ("aarch64", NEOVERSE_N1, "aarch64-neon-dotprod", X86_CODE),
    "cortex-a53-no-dotprod": ("aarch64", CORTEX_A53, "aarch64-neon",
                              {"aarch64-neon-dotprod": "needs Arm dot product (dotprod)", **X86_CODE}),
    "apple-arm64-flags-unknown": ("arm64", set(), "aarch64-neon-dotprod", X86_CODE),
}


@pytest.mark.parametrize("cpu", MACHINES)
def test_runnable_check_and_host_choice_from_given_flags(cpu):
    machine, flags, host, refused = MACHINES[cpu]
    assert targets.host_name(flags, machine) == host
    assert targets.load("host", flags=flags, machine=machine)["name"] == host
    for name in SHIPPED:
        reason = targets.runnable_reason(targets.load(name), flags=flags, machine=machine)
        if name in refused:
            assert reason is not None and refused[name] in reason, (name, reason)
        else:
            assert reason is None, (name, reason)


def test_amx_and_dotprod_are_checked():
    spr = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}
    assert targets.runnable_reason(spr, flags=SAPPHIRE_RAPIDS, machine="x86_64") is None
    assert "AMX-TILE, AMX-INT8" in targets.runnable_reason(spr, flags=ZEN4, machine="x86_64")
    reason = targets.runnable_reason("aarch64-neon-dotprod", flags=CORTEX_A53, machine="aarch64")
    assert reason == "it needs Arm dot product (dotprod), which this CPU lacks (no asimddp among its CPU flags)"


def test_no_preset_fits(monkeypatch):
    with monkeypatch.context() as patch:  # an aarch64 host list without the plain NEON preset
        patch.setitem(targets.HOST_PRESETS, "aarch64", ("aarch64-neon-dotprod",))
        with pytest.raises(ReqError, match=r"no target preset fits this machine \(aarch64, which cannot run "
                                            r"aarch64-neon-dotprod\); choose one of"):
            targets.host_name(CORTEX_A53, "aarch64")
    with pytest.raises(ReqError, match=r"no target preset fits this machine \(riscv64\)"):
        targets.host_name(set(), "riscv64")
    with pytest.raises(ReqError, match="which cannot run x86_64-amx, x86_64-avx512-vnni or x86_64-avx2"):
        targets.host_name(BASE_X86, "x86_64")


def test_check_runnable_raises_a_one_line_error_both_cli_and_kernels_catch():
    with pytest.raises(targets.NotRunnable) as err:
        targets.check_runnable("x86_64-avx512-vnni", "kernel", flags=ZEN3, machine="x86_64")
    assert isinstance(err.value, ReqError) and isinstance(err.value, RuntimeError)
    assert str(err.value) == ("kernel built for x86_64-avx512-vnni cannot run here: it needs AVX-512F, AVX-512 VNNI, "
                              "which this CPU lacks (no avx512f, avx512_vnni among its CPU flags)")
    targets.check_runnable("x86_64-avx2", flags=ZEN3, machine="x86_64")  # no error


def test_artifact_check_is_the_runnable_check(monkeypatch):
    """Loading an artifact refuses exactly what `runnable_reason` refuses (here on a pretend AVX2-only x86 host)."""
    from repq_tvm.deploy import artifact

    monkeypatch.setattr(targets, "host_flags", lambda: frozenset(ZEN3))
    monkeypatch.setattr(targets.platform, "machine", lambda: "x86_64")
    artifact.check_runnable_here({"target": targets.load("x86_64-avx2")})
    with pytest.raises(ReqError) as err:
        artifact.check_runnable_here({"target": targets.load("x86_64-avx512-vnni")})
    assert str(err.value) == ("artifact was built for x86_64-avx512-vnni and cannot run here: it needs AVX-512F, "
                              "AVX-512 VNNI, which this CPU lacks (no avx512f, avx512_vnni among its CPU flags)")
    with pytest.raises(ReqError) as err:
        artifact.check_runnable_here({"target": targets.load("aarch64-neon-dotprod")})
    assert str(err.value) == ("artifact was built for aarch64-neon-dotprod and cannot run here: it is aarch64 code "
                              "(aarch64-linux-gnu) and this machine is x86_64 (run it on an aarch64 device, or under "
                              "qemu-aarch64-static)")


def test_host_flags_are_read_once():
    assert targets.host_flags() is targets.host_flags()
    if platform.machine() == "x86_64":
        assert "sse2" in targets.host_flags()


# --- Targets -------------------------------------------------------------------------------------
def test_as_target_is_the_one_conversion():
    t = targets.tvm_target("x86_64-avx2", 3)
    assert isinstance(t, tvm.target.Target) and t.attrs["num-cores"] == 3 and t.attrs["mcpu"] == "haswell"
    assert targets.as_target(t) is t
    by_name = targets.as_target("x86_64-avx2")
    by_preset = targets.as_target(targets.load("x86_64-avx2"))
    assert str(by_name) == str(by_preset) and by_name.attrs["num-cores"] == (os.cpu_count() or 1)
    assert targets.as_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}).attrs["mtriple"] == "aarch64-linux-gnu"
    assert targets.target_has("x86_64-avx512-vnni", "avx512vnni") and not targets.target_has("x86_64-avx2", "avx512f")
    assert targets.target_arch("aarch64-neon-dotprod") == "aarch64"


def test_kernel_constants_are_the_presets():
    from repq_tvm.kernels import qdense as Q

    for const, name in ((Q.X86_VNNI_TARGET, "x86_64-avx512-vnni"), (Q.X86_AVX2_TARGET, "x86_64-avx2"),
                        (Q.AARCH64_TARGET, "aarch64-neon-dotprod"), (Q.AARCH64_NEON_TARGET, "aarch64-neon")):
        assert str(const) == str(targets.tvm_target(name))
    assert str(Q.host_target(1)) == str(targets.tvm_target("host", 1))


# --- repq-tvm targets ----------------------------------------------------------------------------
def test_targets_command_json(capsys):
    assert main(["targets", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    host = targets.host_name()
    assert out["host"] == host and out["host_error"] is None and out["machine"] == targets.host_arch()
    assert [r["name"] for r in out["presets"]] == targets.available()
    assert [r["name"] for r in out["presets"] if r["host"]] == [host]
    for row in out["presets"]:
        reason = targets.runnable_reason(targets.load(row["name"]))
        assert row["runs_here"] == (reason is None) and row["reason"] == reason
        assert row["description"] == targets.load(row["name"])["description"]
    assert next(r for r in out["presets"] if r["name"] == host)["runs_here"]


def test_targets_command_text(capsys):
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    host = targets.host_name()
    for name in targets.available():
        line = next(line for line in lines if line.startswith(name + " "))
        runs = targets.runnable_reason(targets.load(name)) is None
        assert line.split()[1] == ("yes," if name == host else "yes" if runs else "no")
        assert targets.load(name)["description"] in line
    assert f"--target host = {host} " in lines[-1]


def test_targets_command_checks_a_user_file(tmp_path, capsys):
    path = write_preset(tmp_path, VALID)
    assert main(["targets", path, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["presets"]
    assert row["name"] == "my-haswell" and row["file"] == path and row["host"] is False
    assert main(["targets", write_preset(tmp_path, "[]", "bad.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("bad.json: expected a JSON object, got list")


# --- packaging -----------------------------------------------------------------------------------
def test_pyproject_lists_every_package():
    """The package list is explicit (the presets are mapped in from targets/): a new subpackage must be added."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(d.relative_to(ROOT).parts) for d in [ROOT / "repq_tvm", *(ROOT / "repq_tvm").rglob("*")]
             if d.is_dir() and any(d.glob("*.py"))}
    assert set(cfg["packages"]) == found | {"repq_tvm._presets"}
    assert cfg["package-dir"] == {"repq_tvm._presets": "targets"}
    assert cfg["package-data"]["repq_tvm._presets"] == ["*.json"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="compiles for x86_64-avx2 without a cross compiler")
def test_wheel_install_finds_every_preset_and_compiles(tmp_path):
    """Build a wheel (offline, from a copy of the sources), install it into its own folder, and use it from
    outside the repo: every preset is found inside the install and `compile --target x86_64-avx2` works."""
    src, dist, site, elsewhere = (tmp_path / d for d in ("src", "dist", "site", "elsewhere"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("repq_tvm", "targets"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("REPQ_TVM_TARGETS", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, env=env)
    [wheel] = dist.glob("repq_tvm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, env=env)
    env["PYTHONPATH"] = str(site)
    elsewhere.mkdir()
    probe = ("import json, repq_tvm; from repq_tvm import targets; "
             "print(json.dumps({'file': repq_tvm.__file__, 'dir': targets.preset_dir(), "
             "'available': targets.available(), 'names': [targets.load(n)['name'] for n in targets.available()]}))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert Path(found["file"]).is_relative_to(site) and Path(found["dir"]).is_relative_to(site)
    assert found["available"] == found["names"] == SHIPPED

    cal = str(tmp_path / "x.repq")
    assert main(["calibrate", "--model", "vit_cifar10", "--w-bits", "4", "--a-bits", "4", "--quiet", "-o", cal]) == 0
    run = subprocess.run([str(site / "bin" / "repq-tvm"), "compile", cal, "--target", "x86_64-avx2", "-o", "art",
                          "--quiet", "--json"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["target"] == "x86_64-avx2"
    manifest = json.loads((elsewhere / "art" / "manifest.json").read_text())
    assert manifest["target"] == json.loads((ROOT / "targets" / "x86_64-avx2.json").read_text())
