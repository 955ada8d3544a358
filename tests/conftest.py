"""Shared fixtures: small random-weight models (fast, no files), a seeded calibration batch and one compiled
ViT fixture artifact."""

import fcntl
import os
import shutil

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one TVM thread each (set before repq_tvm's import sizes
    # the pool to every CPU). Two workers whose fork-join pools each want both cores slowed the tests that run
    # artifacts 2x; tests of the pool itself start fresh interpreters without this variable. Unbound: a pool of
    # one thread pins the main thread (and every child it starts) to CPU 0, all workers to the same core.
    os.environ["TVM_NUM_THREADS"] = "1"
    os.environ["TVM_BIND_THREADS"] = "0"

from repq_tvm import models  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist each worker's PyTorch keeps one thread as well: two workers whose intra-op pools each
    spin on every core slowed the calibration-heavy tests 3-5x."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def built_once(tmp_path_factory, name: str, build) -> str:
    """The folder `build(folder)` filled, once per test run: under pytest-xdist the first worker to ask builds it
    under a file lock and the others wait for it and reuse it (the compiles are the suite's slowest setup)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(str(folder))
            (folder / ".done").touch()
    return str(folder)


# The slowest test files, slowest first (per-file sums of the suite's pytest command with --junitxml, AVX2 Zen 3,
# 2026-12-04, in s: 280, 154, 151, 147, 121, 75, 64, 61, 59, 57, 54, 48, 41, 37, 28 of 1535 in all). pytest-xdist
# hands out whole files in collection order: the long ones first, the short ones fill in (the files not listed keep
# their alphabetical order).
SLOWEST_FIRST = ("test_compile", "test_kernel_arm", "test_tuning", "test_timm_models", "test_cli_fuzz", "test_fixtures",
                 "test_atomic", "test_frontends", "test_rpc", "test_pass_qdense_epilogues", "test_threads",
                 "test_kernel_attention_vector", "test_pass_fused_attention", "test_targets", "test_api")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def vit_host_build(tmp_path_factory):
    """(calibrated file, artifact folder) of the ViT fixture, W4/A4 on 8 calibration images, compiled for
    `host`: one build for every test that only reads an artifact (copy it before changing it)."""
    from repq_tvm.cli import main

    def build(root):
        assert main(["calibrate", "--model", "vit_cifar10", "--calib-size", "8", "-o", f"{root}/m.repq",
                     "--quiet"]) == 0
        assert main(["compile", f"{root}/m.repq", "--target", "host", "-o", f"{root}/art", "--quiet"]) == 0

    root = built_once(tmp_path_factory, "vit_host", build)
    return f"{root}/m.repq", f"{root}/art"


@pytest.fixture(scope="session")
def vit_w8_build(tmp_path_factory):
    """(calibrated file, artifact folder) of the ViT fixture at W8/A8 (32 calibration images: what deployment users
    start with), compiled for `host`; built once per run and read-only, as `vit_host_build`."""
    from repq_tvm.cli import main

    def build(root):
        assert main(["calibrate", "--model", "vit_cifar10", "--w-bits", "8", "--a-bits", "8", "-o",
                     f"{root}/m.repq", "--quiet"]) == 0
        assert main(["compile", f"{root}/m.repq", "--target", "host", "-o", f"{root}/art", "--quiet"]) == 0

    root = built_once(tmp_path_factory, "vit_w8", build)
    return f"{root}/m.repq", f"{root}/art"


@pytest.fixture(scope="session")
def swin_w8_calibrated(tmp_path_factory) -> str:
    """The Swin fixture calibrated at W8/A8 (32 images), built once per run; read-only."""
    from repq_tvm.cli import main

    def build(root):
        assert main(["calibrate", "--model", "swin_cifar10", "--w-bits", "8", "--a-bits", "8", "-o",
                     f"{root}/m.repq", "--quiet"]) == 0

    return f"{built_once(tmp_path_factory, 'swin_w8', build)}/m.repq"


def require_cross_compiler(target: str) -> None:
    """Fail (not skip: the aarch64 tests are part of the default suite) with what to install."""
    from repq_tvm import targets
    from repq_tvm.deploy import cross

    compiler = targets.load(target)["cross_compiler"]
    if shutil.which(compiler) is None:
        pytest.fail(f"{compiler} is not installed: run `make aarch64-tools` (Debian {cross.debian_package(compiler)})")


@pytest.fixture(scope="session")
def vit_aarch64_build(tmp_path_factory, vit_host_build):
    """(calibrated file, artifact folder): the same calibrated file cross-compiled for `aarch64-neon-dotprod`
    (fails with what to install when the cross compiler is missing). Read-only, as `vit_host_build`."""
    from repq_tvm.cli import main

    require_cross_compiler("aarch64-neon-dotprod")
    cal = vit_host_build[0]

    def build(root):
        assert main(["compile", cal, "--target", "aarch64-neon-dotprod", "-o", f"{root}/art", "--quiet"]) == 0

    return cal, f"{built_once(tmp_path_factory, 'vit_aarch64', build)}/art"


def calibrated_logits(model: torch.nn.Module, x: torch.Tensor, chunk: int = 100):
    """The calibrated (fake-quant) model's logits, `chunk` images at a time: its elementwise quantizers run 2x
    faster on chunks that stay in cache than on 1,000 images at once."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)]).numpy()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_model(name: str = "vit_cifar10") -> torch.nn.Module:
    """A fixture architecture with random weights and uneven LayerNorm affines (inter-channel variation)."""
    torch.manual_seed(0)
    model = models.build(models.arch_for(name))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand_like(m.weight) * 3 + 0.1)
                m.bias.copy_(torch.randn_like(m.bias))
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def extreme_codes(M, N, K, bits_a, bits_w, seed=0, zero_last_row=False):
    """Random integer-kernel operands with extreme rows: a = max code (and 0 in the last row if asked);
    centred weights w = -max / +max.  8-bit weights are codes minus a per-channel zero point, +-255 at
    the extremes (rows 0, 1) and -128 / 127 (rows 2, 3); below 8 bits |w| <= 2^b - 1."""
    rng = np.random.default_rng(seed)
    a_max = 2**bits_a - 1
    a = rng.integers(0, a_max + 1, (M, K), dtype=np.uint8)
    a[0, :] = a_max
    if zero_last_row and M > 1:
        a[-1, :] = 0
    if bits_w < 8:
        w_max = 2**bits_w - 1
        w = rng.integers(-w_max, w_max + 1, (N, K))
        w[0, :], w[1, :] = -w_max, w_max
    else:
        w = rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))
        w[0, :], w[1, :] = -255, 255
        w[2, :], w[3, :] = -128, 127
    return a, w.astype(np.int16)
