"""The fast MC engine and its counter-based masks: statistics, independence, reproducibility, MC parity.

Statistical bounds are derived from the sample size: rates within 5 binomial standard deviations,
correlations within 5 / sqrt(n), chi-square statistics below the 1e-6 upper quantile, MC estimates within
5 standard errors of the naive MC estimate (z-test); with the fixed seeds used here each check is
deterministic, and a wrong implementation (missing rescale, shared masks, wrong rate) fails by far.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import (
    ClassicDropout,
    DropBlock2d,
    DropConnectLinear,
    DropPath,
    EmbeddingDropout,
    FractalJoin,
)
from dropwise.surgery.engine import MCEngine, mc_predict
from dropwise.surgery.keyed_sites import KeyedRandom
from dropwise.surgery.masks import keep_mask, quantised_p, row_keys, sample_keys, threshold
from torch import nn

Z = 5.0


def _keys(n_rows: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    rows = torch.arange(n_rows)
    return sample_keys(row_keys(torch.full((n_rows,), seed), rows), n_samples)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(1,), (7,), (64,), (3, 5), (4, 1, 9)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_fast_and_exportable_paths_are_bit_identical(shape: tuple[int, ...], p: float) -> None:
    keys = _keys(16, 3, seed=11)
    fast = keep_mask(keys, 2, shape, p)
    slow = keep_mask(keys, 2, shape, p, exportable=True)
    assert fast.shape == (48, *shape)
    assert torch.equal(fast, slow)


def test_quantisation_of_p() -> None:
    assert quantised_p(0.5) == 0.5
    assert threshold(0.1) == 6554
    assert abs(quantised_p(0.1) - 0.1) <= 2**-17
    assert quantised_p(0.0) == 0.0 and quantised_p(1.0) == 1.0
    with pytest.raises(ValueError):
        threshold(1.5)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_drop_rate_within_binomial_bounds(p: float) -> None:
    keep = keep_mask(_keys(256, 8, seed=3), 0, (257,), p)
    n = keep.numel()
    rate = 1.0 - keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - quantised_p(p)) < Z * sigma


def test_independence_between_samples_rows_sites_positions() -> None:
    n_rows, n_samples, width = 128, 16, 256
    keys = _keys(n_rows, n_samples, seed=5)
    m = keep_mask(keys, 0, (width,), 0.5).reshape(n_samples, n_rows, width)
    other_site = keep_mask(keys, 1, (width,), 0.5).reshape(n_samples, n_rows, width)
    n = m[0].numel()
    bound = Z / math.sqrt(n)
    assert abs(_corr(m[:-1], m[1:])) < bound / math.sqrt(n_samples - 1)  # sample t vs t+1
    assert abs(_corr(m[:, :-1], m[:, 1:])) < bound  # row b vs b+1
    assert abs(_corr(m, other_site)) < bound  # site 0 vs site 1
    assert abs(_corr(m[..., 0::2], m[..., 1::2])) < bound  # the two halves of one hash word
    assert abs(_corr(m[..., 1:-1:2], m[..., 2::2])) < bound  # neighbouring words
    # joint distribution of adjacent positions: chi-square with 3 degrees of freedom
    pairs = (m[..., :-1].long() * 2 + m[..., 1:].long()).flatten()
    counts = torch.bincount(pairs, minlength=4).double()
    expected = pairs.numel() / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 33.4  # P(chi2_3 > 33.4) ~ 3e-7


def test_sixteen_bit_values_uniform() -> None:
    # 64 thresholds p = k / 64: the drop counts of successive thresholds give a 64-bin histogram
    keys = _keys(64, 8, seed=9)
    prev = torch.zeros((), dtype=torch.float64)
    bins = []
    for k in range(1, 65):
        dropped = (~keep_mask(keys, 4, (128,), k / 64)).double().sum()
        bins.append(dropped - prev)
        prev = dropped
    counts = torch.stack(bins)
    expected = counts.sum() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 134.0  # P(chi2_63 > 134) ~ 1e-7


def test_seeds_and_rows_give_different_masks_same_key_same_mask() -> None:
    a = keep_mask(_keys(8, 4, seed=1), 0, (512,), 0.5)
    b = keep_mask(_keys(8, 4, seed=2), 0, (512,), 0.5)
    agreement = (a == b).double().mean().item()
    assert abs(agreement - 0.5) < Z * math.sqrt(0.25 / a.numel())
    # same seed, row index 3 computed alone or inside a larger batch: the same mask
    alone = keep_mask(sample_keys(row_keys(torch.tensor([1]), torch.tensor([3])), 4), 0, (512,), 0.5)
    assert torch.equal(alone, a.reshape(4, 8, 512)[:, 3])
    # a 64-bit seed differing only in its high half still changes the masks
    hi = keep_mask(_keys(8, 4, seed=1 + (1 << 40)), 0, (512,), 0.5)
    assert not torch.equal(hi, a)


# ---------------------------------------------------------------- engine vs naive MC


def _naive_samples(model: nn.Module, x: torch.Tensor, n_samples: int, stochastic: list[nn.Module]) -> torch.Tensor:
    """Plain MC: T forward passes with the chosen modules in train mode (torch's own random draws)."""
    model.eval()
    for module in stochastic:
        module.train()
    with torch.no_grad():
        out = torch.stack([model(x) for _ in range(n_samples)])
    model.eval()
    return out


def _z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-sample z of the means over dim 0 (per output element)."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt().clamp_min(1e-9)
    return (a.mean(0) - b.mean(0)) / se


class _Residual(nn.Module):
    def __init__(self, width: int, path: nn.Module) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.path(self.f(x))


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Dropout(0.6),
        nn.Linear(16, 4),
    )
    cnn = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.4), nn.Flatten(), nn.Linear(6 * 25, 3))
    classic = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), ClassicDropout(0.5), nn.Linear(12, 3))
    emb = nn.Sequential(nn.Linear(5, 8), EmbeddingDropout(0.4), nn.Flatten(), nn.Linear(24, 3))
    paths = nn.Sequential(
        _Residual(6, DropPath(0.3)), _Residual(6, DropPath(0.5, scale_by_keep=False)), nn.Linear(6, 3)
    )
    alpha = nn.Sequential(nn.Linear(6, 12), nn.SELU(), nn.AlphaDropout(0.2), nn.Linear(12, 3))
    connect = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), DropConnectLinear(12, 3, p=0.4))
    return {
        "mlp": (mlp, torch.randn(5, 6)),
        "cnn": (cnn, torch.randn(3, 2, 5, 5)),
        "classic": (classic, torch.randn(4, 6)),
        "embedding": (emb, torch.randn(3, 3, 5)),
        "drop_path": (paths, torch.randn(4, 6)),
        "alpha": (alpha, torch.randn(4, 6)),
        "drop_connect": (connect, torch.randn(4, 6)),
    }


STOCHASTIC = (
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    ClassicDropout,
    EmbeddingDropout,
    DropPath,
    DropConnectLinear,
)


@pytest.mark.parametrize("name", list(_models()))
def test_engine_matches_naive_mc_within_monte_carlo_error(name: str) -> None:
    model, x = _models()[name]
    n_samples = 1500 if name == "cnn" else 3000  # keep the naive conv loop short
    engine = MCEngine(model, x)
    got = engine(x, samples=n_samples, seed=7, return_samples=True).sample_logits
    torch.manual_seed(1)
    want = _naive_samples(model, x, n_samples, [m for m in model.modules() if isinstance(m, STOCHASTIC)])
    got = got.reshape(want.shape)
    # first moment of the outputs and of the softmax probabilities, and the per-element spread
    assert _z_scores(got, want).abs().max() < Z
    assert _z_scores(got.softmax(-1), want.softmax(-1)).abs().max() < Z
    ratio = got.std(0) / want.std(0).clamp_min(1e-9)
    # each std estimate has relative error ~ 1/sqrt(2T) (1.3% at T = 3000, 1.8% at 1500)
    assert ((ratio - 1).abs() < 0.15).all(), ratio


def test_trunk_runs_once_and_tail_holds_hash_sites() -> None:
    model, x = _models()["mlp"]
    engine = MCEngine(model, x)
    assert engine.captured
    calls = []
    engine.trunk.register_forward_hook(lambda *_: calls.append(1))
    engine(x, samples=64, seed=0)
    assert calls == [1]
    assert sum(type(m).__name__ == "HashMaskSite" for m in engine.tail.modules()) == 2


def test_non_chosen_sites_are_deterministic_and_masks_follow_the_key_schedule() -> None:
    model, x = _models()["mlp"]
    engine = MCEngine(model, x, sites="last")
    assert [s.name for s in engine.chosen] == ["5"]
    n_samples, seed = 6, 123
    got = engine(x, samples=n_samples, seed=seed, return_samples=True).sample_logits
    # recompute by hand: eval up to the last site, then the site-1 hash mask, then the head
    with torch.no_grad():
        h = model.eval()[:5](x)
        keys = sample_keys(row_keys(torch.full((5,), seed), torch.arange(5)), n_samples)
        keep = keep_mask(keys, 1, (16,), 0.6).reshape(n_samples, 5, 16)
        want = model[6](h * keep / (1 - quantised_p(0.6)))
    torch.testing.assert_close(got, want)


def test_seeded_request_reproducible_whatever_its_batch_companions() -> None:
    model, x = _models()["mlp"]
    engine = MCEngine(model, x)
    alone = engine(x, samples=8, seed=42, return_samples=True)
    others = torch.randn(3, 6)
    batch = torch.cat([others, x])
    first, second = engine.run_batch(batch, [3, 5], [4, 8], [99, 42], return_samples=True)
    torch.testing.assert_close(second.samples, alone.samples)
    torch.testing.assert_close(second.mean_probs, alone.mean_probs)
    assert first.samples.shape == (4, 3, 4)
    again = engine(x, samples=8, seed=42, return_samples=True)
    assert torch.equal(again.samples, alone.samples)
    other_seed = engine(x, samples=8, seed=43, return_samples=True)
    assert not torch.allclose(other_seed.samples, alone.samples)


class _Join(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.join = FractalJoin(2, p=0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.join([self.a(x), self.b(x)]))


@pytest.mark.parametrize("name", ["drop_connect", "join"])
def test_train_mode_sites_use_keyed_draws_reproducible_per_row(name: str) -> None:
    if name == "join":
        torch.manual_seed(0)
        model, x = _Join(), torch.randn(4, 6)
    else:
        model, x = _models()[name]
    engine = MCEngine(model, x)
    assert any(type(m).__name__ == "TrainModeSite" for m in engine.replaced)
    alone = engine(x, samples=16, seed=8, return_samples=True)
    _, inside = engine.run_batch(torch.cat([torch.randn(2, 6), x]), [2, 4], [3, 16], [1, 8], return_samples=True)
    torch.testing.assert_close(inside.samples, alone.samples)
    assert alone.samples.std(0).min() > 0
    assert not torch.allclose(engine(x, samples=16, seed=9, return_samples=True).samples, alone.samples)


def _drop_block_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        DropBlock2d(0.3, 3),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )


def test_drop_block_row_does_not_depend_on_its_batch_companions() -> None:
    model, x = _drop_block_cnn(), torch.randn(3, 2, 6, 6)
    engine = MCEngine(model, x)
    (site,) = engine.replaced
    assert type(site).__name__ == "TrainModeSite" and engine.rows_independent
    alone = engine(x[:1], samples=24, seed=11, return_samples=True)
    assert alone.samples.std(0).min() > 0
    companions = torch.randn(5, 2, 6, 6) * 3
    for rows, samples in (([5, 1], [9, 24]), ([2, 1], [1, 24])):
        _, inside = engine.run_batch(
            torch.cat([companions[: rows[0]], x[:1]]), rows, samples, [3, 11], return_samples=True
        )
        # a batch-wide rescale (count / count_ones over the whole tensor) moves every sample by percents
        torch.testing.assert_close(inside.samples, alone.samples, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inside.mean_probs, alone.mean_probs, rtol=1e-5, atol=1e-5)
    # the row's first sample, recomputed by hand with a per-sample rescale of its own keyed mask
    assert model[2].normalize == "batch"  # the user's model is untouched
    with torch.no_grad():
        h = model[:2](x[:1])
        keys = sample_keys(row_keys(torch.tensor([11]), torch.tensor([0])), 1)
        with KeyedRandom(keys, 0):
            mask = (torch.rand(1, 8, 4, 4) < model[2].p / 9 * 36 / 16).float()
        blocks = F.max_pool2d(F.pad(mask, (2, 2, 2, 2)), 3, stride=1)[..., :6, :6]
        keep = 1 - blocks
        want = model[3:](h * keep * keep.numel() / keep.sum())
    torch.testing.assert_close(alone.sample_logits[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 1), (6, 3, 5), (2, 6, 7)])
def test_keyed_uniforms_follow_the_int64_hash(shape: tuple[int, ...]) -> None:
    # eager draws take the in-place int32 hash; the export path the int64 one: same 24-bit uniforms
    from dropwise.surgery.masks import _C4, _C5, _mixed_constant, mix32, site_keys

    keys = _keys(3, 2, seed=4)  # N = 6 sample-rows
    with KeyedRandom(keys, 2) as random:
        got = torch.rand(shape)
    row_dim = shape.index(6)
    inner = [n for d, n in enumerate(shape) if d != row_dim]
    positions = mix32(torch.arange(math.prod(inner)) ^ _C4)
    base = mix32(site_keys(keys, 2) ^ _mixed_constant(0, _C5))
    words = mix32(base.unsqueeze(1) ^ positions.unsqueeze(0))
    want = ((words >> 8).float() / (1 << 24)).reshape(6, *inner).movedim(0, row_dim)
    assert torch.equal(got, want) and random.shared_draws == 0


def test_rows_independent_only_when_every_train_mode_site_keys_rows() -> None:
    x = torch.randn(4, 6)
    shared = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), DropConnectLinear(12, 3, p=0.4, per_example=False))
    engine = MCEngine(shared, x)
    assert not engine.rows_independent  # one weight mask drawn for the whole batch
    assert MCEngine(_models()["drop_connect"][0], x).rows_independent
    assert MCEngine(_models()["mlp"][0], torch.randn(4, 6)).rows_independent  # hash sites only


def test_unseeded_calls_differ_and_report_a_reproducing_seed() -> None:
    model, x = _models()["mlp"]
    engine = MCEngine(model, x)
    a = engine(x, samples=8, return_samples=True)
    b = engine(x, samples=8, return_samples=True)
    assert a.seed != b.seed and not torch.allclose(a.samples, b.samples)
    torch.testing.assert_close(engine(x, samples=8, seed=a.seed, return_samples=True).samples, a.samples)


def test_chunking_does_not_change_results() -> None:
    model, x = _models()["cnn"]
    whole = MCEngine(model, x)(x, samples=10, seed=5, return_samples=True)
    chunked_engine = MCEngine(model, x, chunk_rows=7)
    assert chunked_engine.chunk_rows == 7
    chunked = chunked_engine(x, samples=10, seed=5, return_samples=True)
    torch.testing.assert_close(chunked.samples, whole.samples)


def test_channels_last_tail_gives_the_same_values() -> None:
    model, x = _models()["cnn"]
    fast = MCEngine(model, x)
    assert fast.channels_last
    plain = MCEngine(model, x, channels_last=False)
    torch.testing.assert_close(
        fast(x, samples=6, seed=2, return_samples=True).samples,
        plain(x, samples=6, seed=2, return_samples=True).samples,
    )


def test_batchnorm_statistics_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(16, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6)
    engine = MCEngine(model, x)
    engine_before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    result = engine(x, samples=16, seed=0)
    assert model.training  # the user's model is not touched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in engine.model.state_dict().items():
        assert torch.equal(value, engine_before[key]), key
    # BN in eval inside the tail: a batch of one row gives the same mean as that row inside a batch
    single = engine(x[:1], samples=16, seed=0)
    torch.testing.assert_close(single.mean_probs, result.mean_probs[:1])


def test_regression_and_one_shot_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    x = torch.randn(3, 4)
    r = mc_predict(model, x, samples=2000, seed=1, task="regression", return_samples=True)
    assert r.mean.shape == (3, 2) and r.std.shape == (3, 2) and r.mean_probs is None
    torch.testing.assert_close(r.mean, r.samples.mean(0))
    c = mc_predict(model, x, samples=16, seed=1)
    assert c.probabilities.shape == (3, 2) and c.num_samples == 16 and c.seed == 1
    assert c.mean_probs is c.probabilities and c.n_samples == 16  # deprecated spellings still read
    assert set(c.as_dict()) == {
        "probabilities",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
        "std",
    }


def test_classification_samples_are_probabilities_and_logits_say_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    x = torch.randn(5, 4)
    r = mc_predict(model, x, samples=8, seed=3, return_samples=True)
    assert r.samples.shape == r.sample_logits.shape == (8, 5, 3)
    torch.testing.assert_close(r.samples, torch.softmax(r.sample_logits, dim=-1))
    torch.testing.assert_close(r.samples.sum(-1), torch.ones(8, 5))
    torch.testing.assert_close(r.probabilities, r.samples.mean(0))
    assert set(r.as_dict()) >= {"samples", "sample_logits"}
    assert mc_predict(model, x, samples=8, seed=3).samples is None


def test_functional_dropout_site_runs_in_train_mode() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.dropout(torch.relu(self.a(x)), 0.5, self.training))

    model = Functional()
    x = torch.randn(2, 4)
    out = MCEngine(model, x)(x, samples=50, seed=0, return_samples=True).samples
    assert out.std(0).min() > 0


def test_bad_arguments_are_refused() -> None:
    model, x = _models()["mlp"]
    engine = MCEngine(model, x)
    with pytest.raises(ValueError):
        engine.run_batch(x, [2, 2], [4, 4], [0, 1])  # rows do not sum to the batch
    with pytest.raises(ValueError):
        engine(x, samples=0)
    with pytest.raises(ValueError):
        engine(x, samples=2, seed=-1)
    with pytest.raises(ValueError):
        MCEngine(model, x, sites=["nope"])
    with pytest.raises(ValueError):
        MCEngine(nn.Linear(3, 2), torch.randn(1, 3))


def test_one_shot_builds_on_a_slice_and_matches_a_prebuilt_engine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        DropBlock2d(0.2, block_size=3),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4 * 6 * 6, 3),
    ).eval()
    x = torch.randn(40, 1, 6, 6)  # more rows than the slice the one-shot engine is built on
    one_shot = mc_predict(model, x, samples=8, seed=5, return_samples=True)
    prebuilt = MCEngine(model, x)(x, samples=8, seed=5, return_samples=True)
    assert one_shot.samples.shape == (8, 40, 3)
    torch.testing.assert_close(one_shot.samples, prebuilt.samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_shot.probabilities, prebuilt.probabilities, rtol=1e-5, atol=1e-6)
