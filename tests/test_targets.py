"""Target presets are data files; unknown names are refused with the list of known ones."""

import pytest

from repq_tvm import targets
from repq_tvm.errors import ReqError


def test_presets_cover_x86_and_arm():
    names = targets.available()
    assert {"x86_64-avx512-vnni", "x86_64-avx2", "aarch64-neon-dotprod"} <= set(names)
    arm = targets.load("aarch64-neon-dotprod")
    assert arm["tvm_target"]["mtriple"] == "aarch64-linux-gnu" and "+dotprod" in arm["tvm_target"]["mattr"]
    assert arm["cross_compiler"] == "aarch64-linux-gnu-gcc"


def test_host_resolves_to_a_preset():
    assert targets.load("host")["name"] in targets.available()


def test_unknown_target():
    with pytest.raises(ReqError, match="unknown target 'riscv'"):
        targets.load("riscv")


def test_corrupt_preset(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv("REPQ_TVM_TARGETS", str(tmp_path))
    with pytest.raises(ReqError, match="target preset .*broken.json is not valid JSON"):
        targets.load("broken")
