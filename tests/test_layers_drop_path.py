"""DropPath / stochastic depth (Huang 2016, timm form), linear decay, FractalJoin (Larsson 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from dropwise.models.layers import DropPath, FractalJoin, drop_path, fractal_join, linear_decay

SIGMAS = 5.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------- DropPath


def test_timm_form_gates_per_sample_and_rescales(assert_binomial: Callable[[int, int, float], None]) -> None:
    p, batch = 0.3, 20_000
    x = torch.rand(batch, 3, 4, generator=_gen(1)) + 0.5
    y = DropPath(p, generator=_gen(2)).train()(x)
    dropped = (y == 0).flatten(1)
    per_sample = dropped.all(1)
    assert torch.equal(dropped.any(1), per_sample), "a sample is dropped whole or not at all"
    assert_binomial(int(per_sample.sum()), batch, p)
    assert torch.allclose(y[~per_sample], x[~per_sample] / (1 - p))


def test_timm_form_preserves_expectation_and_eval_is_identity() -> None:
    p, batch = 0.25, 40_000
    x = torch.ones(batch, 1)
    layer = DropPath(p, generator=_gen(3))
    mean = float(layer.train()(x).mean())
    # mean of `batch` i.i.d. Bernoulli(q)/q: sd = sqrt(p/q/batch)
    assert abs(mean - 1.0) <= SIGMAS * math.sqrt(p / (1 - p) / batch)
    assert torch.equal(layer.eval()(x), x)
    assert layer.eval_scale == 1.0


def test_classic_form_one_gate_per_batch_and_eval_multiplies_by_q(
    assert_binomial: Callable[[int, int, float], None],
) -> None:
    p, calls = 0.4, 3000
    layer = DropPath(p, scale_by_keep=False, generator=_gen(4)).train()
    x = torch.rand(16, 5, generator=_gen(5)) + 0.5
    zeroed = 0
    for _ in range(calls):
        y = layer(x)
        if bool((y == 0).all()):
            zeroed += 1
        else:
            assert torch.equal(y, x), "classic stochastic depth does not rescale and gates the whole batch"
    assert_binomial(zeroed, calls, p)
    assert torch.allclose(layer.eval()(x), (1 - p) * x)
    assert layer.eval_scale == pytest.approx(1 - p)


def test_drop_path_gradient_is_gate_over_q_times_upstream() -> None:
    p = 0.5
    x = (torch.rand(400, 3, generator=_gen(6)) + 0.5).requires_grad_()
    y = drop_path(x, p, training=True, generator=_gen(7))
    upstream = torch.randn(400, 3, generator=_gen(8))
    y.backward(upstream)
    gate = (y != 0).to(x.dtype)
    assert torch.allclose(x.grad, gate / (1 - p) * upstream)


@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_gradcheck_with_fixed_gate(scale_by_keep: bool) -> None:
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: drop_path(t, 0.5, training=True, scale_by_keep=scale_by_keep, generator=_gen(9)), (x,)
    )


def test_linear_decay_rule() -> None:
    assert linear_decay(0.5, 4) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert linear_decay(0.2, 1) == pytest.approx([0.2])
    with pytest.raises(ValueError):
        linear_decay(0.5, 0)
    with pytest.raises(ValueError):
        linear_decay(1.5, 3)


# ----------------------------------------------------------------------------------------- FractalJoin

VALUES = (1.0, 2.0, 4.0)  # every subset of survivors has a distinct mean


def _subset_means() -> dict[float, tuple[int, ...]]:
    subsets: dict[float, tuple[int, ...]] = {}
    for bits in range(1, 8):
        members = tuple(i for i in range(3) if bits >> i & 1)
        subsets[round(sum(VALUES[i] for i in members) / len(members), 6)] = members
    return subsets


def _inputs(batch: int) -> list[torch.Tensor]:
    return [torch.full((batch, 2), v) for v in VALUES]


def test_fractal_join_never_drops_all_inputs(assert_binomial: Callable[[int, int, float], None]) -> None:
    batch = 5000
    join = FractalJoin(3, p=0.9, generator=_gen(10)).train()  # P(all dropped) = 0.729 before the rescue
    out = join(_inputs(batch))
    assert torch.equal(out[:, 0], out[:, 1])
    allowed = _subset_means()
    seen = [allowed.get(round(float(v), 6)) for v in out[:, 0]]
    assert all(s is not None for s in seen), "output must be the mean of a non-empty subset of inputs"
    singles = [s for s in seen if s is not None and len(s) == 1]
    # P(exactly one survivor) = 3 p^2 q + p^3 (rescued)
    assert_binomial(len(singles), batch, 3 * 0.9**2 * 0.1 + 0.9**3)
    # the rescued input is uniform: each single survivor about a third of the singles
    for i in range(3):
        assert_binomial(sum(1 for s in singles if s == (i,)), len(singles), 1 / 3)


def test_fractal_join_local_drop_rate_and_expectation(assert_binomial: Callable[[int, int, float], None]) -> None:
    p, batch = 0.5, 20_000
    out = fractal_join(_inputs(batch), p, training=True, generator=_gen(11))[:, 0]
    allowed = _subset_means()
    all_three = sum(1 for v in out if allowed[round(float(v), 6)] == (0, 1, 2))
    assert_binomial(all_three, batch, (1 - p) ** 3)
    # expectation equals the mean of the inputs; bound from the sample standard deviation
    expected = sum(VALUES) / 3
    assert abs(float(out.mean()) - expected) <= SIGMAS * float(out.std()) / math.sqrt(batch)


def test_fractal_join_eval_mean_and_global_column() -> None:
    xs = [torch.randn(4, 3, generator=_gen(i)) for i in range(3)]
    join = FractalJoin(3, p=0.5, generator=_gen(12))
    assert torch.allclose(join.eval()(xs), (xs[0] + xs[1] + xs[2]) / 3)
    for mode in (True, False):
        join.train(mode)
        assert torch.equal(join(xs, column=1), xs[1])
    with pytest.raises(ValueError, match="column"):
        join(xs, column=3)


def test_fractal_join_gradients_are_survivor_weights() -> None:
    batch = 300
    xs = [(torch.rand(batch, 2, generator=_gen(20 + i)) + 0.5).requires_grad_() for i in range(3)]
    out = fractal_join(xs, 0.6, training=True, generator=_gen(13))
    out.sum().backward()
    grads = torch.stack([x.grad[:, 0] for x in xs])  # [3, B]
    assert torch.allclose(grads.sum(0), torch.ones(batch))
    count = (grads > 0).sum(0)
    assert torch.all(count >= 1)
    assert torch.allclose(grads[grads > 0], (1.0 / count.expand(3, -1).to(grads.dtype))[grads > 0])


def test_fractal_join_gradcheck_with_fixed_mask() -> None:
    xs = tuple(torch.randn(5, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: fractal_join([a, b, c], 0.5, training=True, generator=_gen(14)), xs)


def test_fractal_join_input_checks() -> None:
    join = FractalJoin(2)
    with pytest.raises(ValueError, match="expected 2"):
        join([torch.ones(2, 2)] * 3)
    with pytest.raises(ValueError, match="shape"):
        join([torch.ones(2, 2), torch.ones(2, 3)])
    with pytest.raises(ValueError):
        FractalJoin(0)
