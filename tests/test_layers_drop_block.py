"""DropBlock2d (Ghiasi 2018): valid-region seeds per sample and channel; square and non-square maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import DropBlock2d, DropBlockSchedule, drop_block, drop_block2d, drop_block_gamma
from dropwise.models.layers.drop_block import dilate_seeds, dilate_seeds_by_max_pool, drop_block_mask
from torch import nn

SIGMAS = 5.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_drop_probability(p: float, block: int, height: int, width: int) -> torch.Tensor:
    """Per-pixel drop probability computed by brute force over every valid seed (naive loops).

    Seeds lie where a whole (clamped) block fits; pixel (r, s) is dropped unless all seeds covering it are
    off: P(drop) = 1 - (1 - gamma) ** (number of valid seeds whose block covers the pixel).
    """
    bh, bw = min(block, height), min(block, width)
    gamma = p / (bh * bw) * height * width / ((height - bh + 1) * (width - bw + 1))
    cover = torch.zeros(height, width, dtype=torch.float64)
    for i in range(height - bh + 1):
        for j in range(width - bw + 1):
            cover[i : i + bh, j : j + bw] += 1
    return 1.0 - (1.0 - gamma) ** cover


def _dropped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y == 0) & (x != 0)


def test_seven_by_seven_map_with_block_seven_drops_p_of_it(assert_binomial: Callable[[int, int, float], None]) -> None:
    # timm >= 1.0.23 zeroes ~92% here (seeds anywhere, gamma for the valid region); the paper gives p.
    p, batch, channels = 0.1, 64, 64
    x = torch.rand(batch, channels, 7, 7, generator=_gen(1)) + 0.5
    y = DropBlock2d(p, 7, generator=_gen(2)).train()(x)
    maps = _dropped(x, y).flatten(2)
    whole = maps.all(2)
    assert torch.equal(maps.any(2), whole), "with the block as large as the map, a map goes whole or not at all"
    assert_binomial(int(whole.sum()), batch * channels, p)


@pytest.mark.parametrize(
    ("p", "block", "height", "width"),
    [(0.1, 3, 14, 9), (0.1, 7, 14, 9), (0.3, 4, 14, 9), (0.2, 5, 3, 10), (0.15, 7, 5, 5)],
)
def test_drop_fraction_matches_brute_force_and_is_about_p(p: float, block: int, height: int, width: int) -> None:
    maps = 8192
    x = torch.ones(maps // 64, 64, height, width)
    y = drop_block2d(x, p, block, training=True, generator=_gen(3))
    per_map = _dropped(x, y).flatten(2).double().mean(2).flatten()  # i.i.d. over (sample, channel)
    expected = float(reference_drop_probability(p, block, height, width).mean())
    sd = float(per_map.std()) / math.sqrt(maps)
    assert abs(float(per_map.mean()) - expected) <= SIGMAS * sd + 1e-12
    # "about p": overlapping blocks lose a little (the union bound caps the fraction at p); timm's form
    # exceeds p many times over on the small maps here
    assert 0.8 * p <= expected <= p + 1e-12
    assert 0.8 * p - SIGMAS * sd <= float(per_map.mean()) <= p + SIGMAS * sd


def test_seeds_only_in_the_valid_region(assert_binomial: Callable[[int, int, float], None]) -> None:
    # A corner pixel is covered by exactly one valid seed, so it drops with probability gamma (seeds
    # anywhere would also let border seeds reach it, and clipped partial blocks would appear).
    p, block, height, width = 0.3, 3, 14, 9
    x = torch.ones(256, 64, height, width)
    y = drop_block2d(x, p, block, training=True, generator=_gen(4))
    dropped = _dropped(x, y)
    gamma = drop_block_gamma(p, block, height, width)
    for r, s in [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]:
        assert_binomial(int(dropped[:, :, r, s].sum()), 256 * 64, gamma)
    # every dropped pixel lies in a fully dropped block x block window inside the map
    d = dropped.flatten(0, 1).unsqueeze(1).double()  # [N, 1, H, W]
    full_windows = (-F.max_pool2d(-d, block, stride=1) > 0.5).double()  # window at (i, j) all dropped
    covered = F.max_pool2d(F.pad(full_windows, (block - 1,) * 4), block, stride=1)
    assert torch.equal(covered, d), "dropped regions must be unions of whole in-map blocks"


def test_masks_are_per_sample_and_per_channel() -> None:
    x = torch.ones(16, 32, 7, 7)
    y = DropBlock2d(0.5, 7, generator=_gen(5)).train()(x)
    whole = (y == 0).flatten(2).all(2)  # [B, C]
    assert whole.any(1).all() and not whole.all(1).any(), "channels of one sample get different masks"
    assert not torch.equal(whole[0], whole[1]), "samples get different masks"


def test_rescaling_preserves_the_sum_and_gradient_is_mask_scaled() -> None:
    x = (torch.rand(8, 4, 10, 10, generator=_gen(6)) + 0.5).requires_grad_()
    y = drop_block2d(x, 0.2, 3, training=True, generator=_gen(7))
    keep = (y != 0).to(x.dtype)
    scale = keep.numel() / keep.sum()
    assert torch.allclose(y, x * keep * scale)
    ones = drop_block2d(torch.ones(8, 4, 10, 10), 0.2, 3, training=True, generator=_gen(7))
    assert float(ones.sum()) == pytest.approx(ones.numel(), rel=1e-5)
    upstream = torch.randn(8, 4, 10, 10, generator=_gen(8))
    y.backward(upstream)
    assert torch.allclose(x.grad, keep * scale * upstream)


@pytest.mark.parametrize("block", [1, 2, 3, 6])
def test_gradcheck_with_fixed_mask(block: int) -> None:
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: drop_block2d(t, 0.3, block, training=True, generator=_gen(9)), (x,))


def test_sample_normalisation_rescales_each_sample_by_its_own_kept_fraction() -> None:
    x = torch.rand(6, 4, 10, 10, generator=_gen(10)) + 0.5
    batch = drop_block2d(x, 0.3, 3, training=True, generator=_gen(11))
    sample = DropBlock2d(0.3, 3, generator=_gen(11), normalize="sample").train()(x)
    keep = (batch != 0).to(x.dtype)
    assert torch.equal(keep, (sample != 0).to(x.dtype)), "the option changes the scale, not the mask"
    per_sample = 400 / keep.sum(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(sample, x * keep * per_sample)
    ones = torch.ones(6, 4, 10, 10)
    sums = drop_block2d(ones, 0.3, 3, training=True, generator=_gen(11), normalize="sample").sum((1, 2, 3))
    torch.testing.assert_close(sums, torch.full((6,), 400.0))  # each sample keeps its own total
    batch_sums = drop_block2d(ones, 0.3, 3, training=True, generator=_gen(11)).sum((1, 2, 3))
    assert (batch_sums - 400).abs().max() > 1.0, "the batch rescale does not preserve each sample's total"
    assert float(batch_sums.sum()) == pytest.approx(2400.0, rel=1e-5)
    # a row's output depends on its own mask only: the same mask rows give the same values in any batch
    assert torch.equal(sample[2:3], x[2:3] * keep[2:3] * per_sample[2:3])
    assert DropBlock2d(0.1, 3).normalize == "batch"
    assert "normalize='sample'" in repr(DropBlock2d(0.1, 3, normalize="sample"))
    with pytest.raises(ValueError, match="normalize"):
        DropBlock2d(0.1, 3, normalize="channel")


def test_both_normalisations_preserve_the_expected_mean_factor() -> None:
    # On a constant map the rescaled mask's mean over all positions is 1 in both modes; per position
    # neither is 1 (DropBlock drops central pixels more often than edge ones), and the two modes agree up
    # to the ratio-of-counts bias of the per-sample count, O(1 / (C * H * W)).
    n, ones = 8000, torch.ones(8000, 4, 8, 8)
    sample = drop_block2d(ones, 0.2, 3, training=True, generator=_gen(13), normalize="sample")
    batch = drop_block2d(ones, 0.2, 3, training=True, generator=_gen(14))
    assert float(sample.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(batch.mean()) == pytest.approx(1.0, rel=1e-5)
    se = (sample.var(0) / n + batch.var(0) / n).sqrt()
    assert ((sample.mean(0) - batch.mean(0)).abs() < SIGMAS * se + 0.02).all()
    assert float(batch.mean(0)[0, 3, 3]) < 0.9 < 1.1 < float(batch.mean(0)[0, 0, 0])  # not 1 per position


def test_eval_identity_and_input_checks() -> None:
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(DropBlock2d(0.5, 3).eval()(x), x)
    with pytest.raises(ValueError, match="batch, channels"):
        DropBlock2d(0.5, 3).train()(torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(0.1, 0)


def test_gamma_formula_for_non_square_maps() -> None:
    assert drop_block_gamma(0.1, 3, 14, 9) == pytest.approx(0.1 / 9 * 126 / (12 * 7))
    assert drop_block_gamma(0.1, 7, 7, 7) == pytest.approx(0.1)
    assert drop_block_gamma(0.2, 9, 4, 6) == pytest.approx(0.2)  # block clamped to the whole map


def test_schedule_ramps_drop_prob_linearly_to_p() -> None:
    model = nn.Sequential(DropBlock2d(0.2, 3), nn.Identity(), nn.Sequential(DropBlock2d(0.4, 5)))
    schedule = DropBlockSchedule(model, total_steps=10)
    blocks = [model[0], model[2][0]]
    assert schedule.blocks == blocks
    assert [b.drop_prob for b in blocks] == [0.0, 0.0]
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(model.train()(x), x), "drop_prob 0 at step 0: identity"
    for _ in range(5):
        schedule.step()
    assert [b.drop_prob for b in blocks] == pytest.approx([0.1, 0.2])
    for _ in range(20):
        schedule.step()
    assert [b.drop_prob for b in blocks] == pytest.approx([0.2, 0.4])
    assert [b.p for b in blocks] == [0.2, 0.4]
    schedule.set_step(2)
    assert blocks[1].drop_prob == pytest.approx(0.08)
    with pytest.raises(ValueError):
        DropBlockSchedule(model, 0)


@pytest.mark.parametrize(("bh", "bw", "vh", "vw"), [(5, 5, 10, 10), (3, 1, 6, 9), (1, 4, 5, 2), (2, 3, 1, 1)])
def test_max_pool_dilation_of_the_onnx_export_gives_the_same_blocks(bh: int, bw: int, vh: int, vw: int) -> None:
    seeds = torch.rand((3, 4, vh, vw), generator=_gen(bh * 10 + bw)) < 0.2
    seeds[0, 0] = True  # saturated and empty maps too
    seeds[0, 1] = False
    by_shifts = dilate_seeds(seeds, bh, bw)
    assert by_shifts.shape == (3, 4, vh + bh - 1, vw + bw - 1)
    assert torch.equal(dilate_seeds_by_max_pool(seeds, bh, bw), by_shifts)


def test_the_onnx_export_traces_the_max_pool_dilation(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 12, 12)
    eager = drop_block_mask((2, 3, 12, 12), 0.3, 5, x, _gen(4))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    calls: list[int] = []
    original = drop_block.dilate_seeds_by_max_pool

    def counted(seeds: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
        calls.append(bh)
        return original(seeds, bh, bw)

    monkeypatch.setattr(drop_block, "dilate_seeds_by_max_pool", counted)
    assert torch.equal(drop_block_mask((2, 3, 12, 12), 0.3, 5, x, _gen(4)), eager)
    assert calls == [5]
