"""ClassicDropout (Srivastava 2014) and EmbeddingDropout (spatial dropout on [B, L, E])."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from dropwise.models.layers import ClassicDropout, EmbeddingDropout, classic_dropout, embedding_dropout
from torch import nn

SIGMAS = 5.0  # bounds below are 5 standard deviations of the statistic under a correct implementation


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- classic


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_classic_drop_rate_and_no_rescaling(p: float, assert_binomial: Callable[[int, int, float], None]) -> None:
    x = torch.rand(200_000, generator=_gen(1)) + 0.5
    y = ClassicDropout(p, generator=_gen(2)).train()(x)
    dropped = y == 0
    assert_binomial(int(dropped.sum()), x.numel(), p)
    assert torch.equal(y[~dropped], x[~dropped]), "classic dropout must not rescale kept units"


def test_classic_eval_equals_q_times_x() -> None:
    x = torch.randn(4, 7, generator=_gen(3))
    layer = ClassicDropout(0.3).eval()
    assert torch.allclose(layer(x), 0.7 * x, rtol=0, atol=1e-7)
    assert layer.eval_scale == pytest.approx(0.7)
    assert torch.equal(classic_dropout(x, 1.0, training=False), torch.zeros_like(x))


def test_classic_train_expectation_equals_eval_output() -> None:
    p, draws = 0.4, 2000
    x = torch.randn(64, generator=_gen(4))
    layer = ClassicDropout(p, generator=_gen(5)).train()
    mean = layer(x.expand(draws, -1)).mean(0)
    # each element: mean of `draws` i.i.d. x*Bernoulli(q), sd = |x| sqrt(pq/draws)
    bound = SIGMAS * x.abs() * math.sqrt(p * (1 - p) / draws) + 1e-6
    assert torch.all((mean - layer.eval()(x)).abs() <= bound)


def test_classic_gradient_is_mask_times_upstream() -> None:
    x = (torch.rand(500, generator=_gen(6)) + 0.5).requires_grad_()
    y = classic_dropout(x, 0.5, training=True, generator=_gen(7))
    upstream = torch.randn(500, generator=_gen(8))
    y.backward(upstream)
    mask = (y != 0).to(x.dtype)
    assert torch.equal(x.grad, mask * upstream)


def test_classic_gradcheck_with_fixed_mask() -> None:
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: classic_dropout(t, 0.5, training=True, generator=_gen(9)), (x,))


def test_classic_p_zero_and_one() -> None:
    x = torch.randn(10)
    assert torch.equal(ClassicDropout(0.0).train()(x), x)
    assert torch.equal(ClassicDropout(1.0).train()(x), torch.zeros_like(x))


def test_functional_requires_explicit_training_flag() -> None:
    with pytest.raises(TypeError):
        classic_dropout(torch.ones(3), 0.5)  # type: ignore[call-arg]


# -------------------------------------------------------------------------------------------- embedding


def test_embedding_mask_shared_across_positions() -> None:
    x = torch.rand(32, 11, 24, generator=_gen(10)) + 0.5
    y = EmbeddingDropout(0.5, generator=_gen(11)).train()(x)
    dropped = y == 0  # [B, L, E]
    assert torch.equal(dropped, dropped[:, :1, :].expand_as(dropped)), "mask must be constant over L"
    # and not constant over the embedding dimension or the batch (it is not token dropout)
    assert dropped[:, 0, :].float().std(1).min() > 0
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] / 0.5)


def test_embedding_is_not_token_dropout_like_dropout1d() -> None:
    x = torch.ones(64, 8, 16)
    ours = EmbeddingDropout(0.5, generator=_gen(12)).train()(x) == 0
    torch.manual_seed(0)
    tokens = nn.Dropout1d(0.5).train()(x) == 0
    # Dropout1d on [B, L, E] zeroes whole tokens (constant over E); ours zeroes dims constant over L
    assert torch.equal(tokens, tokens[:, :, :1].expand_as(tokens))
    assert not torch.equal(ours, ours[:, :, :1].expand_as(ours))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_embedding_drop_rate_per_sample_and_dimension(
    p: float, assert_binomial: Callable[[int, int, float], None]
) -> None:
    x = torch.ones(2000, 3, 64)
    y = embedding_dropout(x, p, training=True, generator=_gen(13))
    assert_binomial(int((y[:, 0, :] == 0).sum()), 2000 * 64, p)


def test_embedding_expectation_preserved() -> None:
    p, draws = 0.3, 4000
    x = torch.randn(1, 4, 8, generator=_gen(14))
    y = embedding_dropout(x.expand(draws, -1, -1), p, training=True, generator=_gen(15))
    # each element: mean of x*Bernoulli(q)/q, sd = |x| sqrt(p/q/draws)
    bound = SIGMAS * x[0].abs() * math.sqrt(p / (1 - p) / draws) + 1e-6
    assert torch.all((y.mean(0) - x[0]).abs() <= bound)


def test_embedding_eval_identity_and_gradient() -> None:
    layer = EmbeddingDropout(0.25, generator=_gen(16))
    x = (torch.rand(6, 5, 10, generator=_gen(17)) + 0.5).requires_grad_()
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    upstream = torch.randn(6, 5, 10, generator=_gen(18))
    y.backward(upstream)
    mask = (y != 0).to(x.dtype)
    assert torch.allclose(x.grad, mask / 0.75 * upstream)


def test_embedding_gradcheck_with_fixed_mask() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: embedding_dropout(t, 0.5, training=True, generator=_gen(19)), (x,))


def test_embedding_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="batch, length, embedding"):
        EmbeddingDropout(0.5).train()(torch.ones(4, 8))
