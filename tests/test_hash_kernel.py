"""The fused C++ mask kernel gives exactly the bits of the torch path and of the int64 reference formula.

The kernel (`dropwise.surgery.hash_kernel`) is built with gcc on first use; CI and this machine have gcc,
so a failed build fails here instead of silently falling back.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from dropwise.surgery import hash_kernel, masks
from dropwise.surgery.masks import keep_factor, keep_mask, keep_product, quantised_p, row_keys, sample_keys


def _keys(n_rows: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    return sample_keys(row_keys(torch.full((n_rows,), seed), torch.arange(n_rows)), n_samples)


@pytest.fixture(autouse=True)
def kernel_built() -> None:
    """Wait for the background build, so that every test here exercises the kernel (not the fallback)."""
    assert hash_kernel.available(), hash_kernel.disable_reason()


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every mask through the pure-torch fallback."""
    monkeypatch.setattr(hash_kernel, "masked_factors", lambda *a, **k: None)
    monkeypatch.setattr(hash_kernel, "masked_product", lambda *a, **k: None)
    monkeypatch.setattr(hash_kernel, "available", lambda: False)


def test_kernel_builds_here() -> None:
    assert hash_kernel.available(), hash_kernel.disable_reason()


def _reference(keys: torch.Tensor, site: int, shape: tuple[int, ...], p: float, scale: float) -> torch.Tensor:
    """The int64 formula (the ONNX graph's path): keep -> scale, drop -> 0."""
    return keep_mask(keys, site, shape, p, exportable=True).to(torch.float32) * scale


@pytest.mark.parametrize("shape", [(1,), (7,), (64,), (3, 5), (4, 1, 9), (1031,)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.77, 2**-16, 1 - 2**-16])
def test_kernel_factors_match_reference(shape: tuple[int, ...], p: float) -> None:
    keys = _keys(16, 3, seed=11)
    scale = 1.0 / (1.0 - quantised_p(p))
    fused = keep_factor(keys, 2, shape, p, scale)
    assert fused.shape == (48, *shape) and fused.dtype == torch.float32
    assert torch.equal(fused, _reference(keys, 2, shape, p, scale))


@pytest.mark.parametrize("shape", [(7,), (64,), (3, 5)])
def test_kernel_and_torch_path_agree(shape: tuple[int, ...], torch_path: None) -> None:
    keys = _keys(8, 4, seed=3)
    fallback = keep_factor(keys, 1, shape, 0.3, 1.25)
    assert torch.equal(fallback, _reference(keys, 1, shape, 0.3, 1.25))


@pytest.mark.parametrize("shape", [(9,), (128,), (2, 3, 5)])
def test_fused_product_bit_identical(shape: tuple[int, ...]) -> None:
    keys = _keys(12, 5, seed=7)
    x = torch.randn(60, *shape)
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3.0])
    expected = x * _reference(keys, 4, shape, 0.4, 1.0 / (1.0 - quantised_p(0.4)))
    fused = keep_product(x, keys, 4, 0.4, 1.0 / (1.0 - quantised_p(0.4)))
    # same bits, NaN included (a dropped NaN stays NaN, a dropped -3.0 becomes -0.0, as in the torch path)
    assert torch.equal(fused.view(torch.int32), expected.view(torch.int32))


def test_product_of_non_contiguous_input_falls_back_to_the_same_bits() -> None:
    keys = _keys(4, 2, seed=1)
    x = torch.randn(8, 6, 5).transpose(1, 2)  # not contiguous: built factors times x
    out = keep_product(x, keys, 0, 0.5, 2.0)
    assert torch.equal(out, x * _reference(keys, 0, (5, 6), 0.5, 2.0))


def test_kernel_drop_rate_within_binomial_bounds() -> None:
    p = 0.3
    factors = keep_factor(_keys(256, 8, seed=3), 0, (257,), p, 1.0)
    n = factors.numel()
    rate = 1.0 - factors.double().mean().item()
    assert abs(rate - quantised_p(p)) < 5.0 * math.sqrt(p * (1 - p) / n)


def test_masks_module_uses_the_kernel_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = hash_kernel.masked_product

    def spy(*args: object, **kwargs: object) -> object:
        calls.append("product")
        return real(*args, **kwargs)

    monkeypatch.setattr(hash_kernel, "masked_product", spy)
    keep_product(torch.randn(4, 16), _keys(2, 2), 0, 0.5, 2.0)
    assert calls == ["product"]
    assert masks.hash_kernel is hash_kernel


def test_masks_never_wait_for_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    monkeypatch.setattr(hash_kernel, "_module", None)
    monkeypatch.setattr(hash_kernel, "_reason", None)
    monkeypatch.setattr(hash_kernel, "_builder", None)
    monkeypatch.setattr(hash_kernel, "_build", lambda: gate.wait(60))
    keys = _keys(4, 2, seed=2)
    x = torch.randn(8, 33)
    # the build has not finished: the torch path answers at once, with the same bits
    assert torch.equal(keep_factor(keys, 1, (33,), 0.5, 2.0), _reference(keys, 1, (33,), 0.5, 2.0))
    assert torch.equal(keep_product(x, keys, 1, 0.5, 2.0), x * _reference(keys, 1, (33,), 0.5, 2.0))
    builder = hash_kernel._builder
    assert builder is not None and builder.is_alive()
    gate.set()
    builder.join(60)
    assert not builder.is_alive()


def test_cached_library_loads_without_any_lock(tmp_path: Path) -> None:
    built = hash_kernel._library_path()  # the library this session built or found
    target = tmp_path / "dropwise" / built.name  # content-hashed name under $TORCH_EXTENSIONS_DIR/dropwise
    target.parent.mkdir(parents=True)
    shutil.copy(built, target)
    (target.parent / "lock").touch()  # what a killed torch build leaves behind: never waited for
    code = (
        "from dropwise.surgery import hash_kernel as h; "
        "assert h._library_path() == __import__('pathlib').Path(__import__('sys').argv[1]), h._library_path(); "
        "assert h.available(), h.disable_reason()"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env, timeout=240, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
