"""fold: eval output kept, every eval-time scale folded into an adjacent affine op (or one multiply kept
and reported), original untouched. A fold that forgets q fails the weight and output checks here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import ClassicDropout, DropConnectConv2d, DropConnectLinear, DropPath, FractalJoin
from dropwise.surgery import find_sites, fold, fold_with_report
from dropwise.surgery.fold import ActivatedLinear, MeanJoin, Removed, Scale
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.2)
            if m.affine:
                m.weight.data.uniform_(0.5, 2.0, generator=g)
                m.bias.data.uniform_(-1.0, 1.0, generator=g)
    return model.eval()


def _assert_eval_equal(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_classic_dropout_into_next_linear_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), ClassicDropout(0.3), nn.Linear(5, 2)).eval()
    w = model[3].weight.detach().clone()
    b = model[3].bias.detach().clone()
    x = torch.randn(8, 6)
    result = fold_with_report(model, x)
    folded = result.model
    assert torch.allclose(folded[3].weight, 0.7 * w) and torch.equal(folded[3].bias, b)
    assert isinstance(folded[2], Removed) and folded[2].p == 0.3
    assert torch.equal(model[3].weight, w)  # original untouched
    assert find_sites(folded, x) == []
    assert result.report.scales_kept == 0
    assert "into next Linear 3" in str(result.report)
    _assert_eval_equal(model, folded, x)


@pytest.mark.parametrize("affine", [True, False])
def test_classic_dropout_into_next_batchnorm(affine: bool) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), ClassicDropout(0.4), nn.BatchNorm2d(3, affine=affine))
    )
    x = torch.randn(2, 2, 6, 6)
    result = fold_with_report(model, x)
    folded = result.model
    assert result.report.scales_kept == 0
    assert torch.allclose(folded[3].running_mean, model[3].running_mean / 0.6)
    _assert_eval_equal(model, folded, x)


def test_classic_dropout_backward_through_relu_and_pool() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), ClassicDropout(0.5), nn.Sigmoid()
    ).eval()
    x = torch.randn(3, 2, 8, 8)
    result = fold_with_report(model, x)
    folded = result.model
    assert torch.allclose(folded[0].weight, 0.5 * model[0].weight)
    assert torch.allclose(folded[0].bias, 0.5 * model[0].bias)
    assert "into previous Conv2d 0" in str(result.report)
    _assert_eval_equal(model, folded, x)


class _ClassicBlock(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop_path = DropPath(p, scale_by_keep=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.drop_path(self.bn(self.conv2(F.relu(self.conv1(x))))))


def test_classic_stochastic_depth_into_last_affine_op_of_branch() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(_ClassicBlock(0.2), _ClassicBlock(0.4)))
    x = torch.randn(2, 4, 5, 5)
    result = fold_with_report(model, x)
    folded = result.model
    for block, model_block, q in zip(folded, model, (0.8, 0.6), strict=True):
        assert isinstance(block.drop_path, Removed)
        assert torch.allclose(block.bn.weight, q * model_block.bn.weight)
    assert torch.allclose(folded[1].bn.weight, 0.6 * model[1].bn.weight)
    assert torch.allclose(folded[1].bn.bias, 0.6 * model[1].bn.bias)
    assert result.report.scales_kept == 0
    _assert_eval_equal(model, folded, x)


def test_unfoldable_scale_keeps_one_multiply_and_says_why() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), ClassicDropout(0.25), nn.Sigmoid()).eval()
    x = torch.randn(5, 4)
    result = fold_with_report(model, x)
    folded = result.model
    assert isinstance(folded[2], Scale) and folded[2].factor == 0.75
    assert result.report.scales_kept == 1
    entry = result.report.entries[0]
    assert entry.action == "scale kept" and "not affine" in entry.detail
    _assert_eval_equal(model, folded, x)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = ClassicDropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(torch.tanh(self.lin(x))))  # the same weights before and after


def test_shared_weights_are_not_changed() -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(3, 4)
    result = fold_with_report(model, x)
    folded = result.model
    assert isinstance(folded.drop, Scale)
    assert torch.equal(folded.lin.weight, model.lin.weight)
    assert "called 2 times" in result.report.entries[0].detail
    _assert_eval_equal(model, folded, x)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = ClassicDropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = -x
        return self.lin(self.drop(x))


def test_untraceable_model_keeps_scale() -> None:
    model = _Untraceable().eval()
    x = torch.randn(3, 4)
    result = fold_with_report(model, x)
    folded = result.model
    assert isinstance(folded.drop, Scale)
    assert "torch.fx could not trace" in result.report.entries[0].detail
    _assert_eval_equal(model, folded, x)


def test_drop_connect_mean_rule_and_gaussian_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        DropConnectConv2d(2, 3, 3, padding=1, p=0.3, activation="relu"),
        nn.Flatten(),
        DropConnectLinear(48, 8, p=0.4, activation="tanh"),
        DropConnectLinear(8, 4, p=0.5, activation="relu", inference="gaussian", gaussian_samples=8),
    ).eval()
    x = torch.randn(2, 2, 4, 4)
    result = fold_with_report(model, x)
    folded = result.model
    assert isinstance(folded[2], ActivatedLinear)
    assert torch.allclose(folded[2].weight, 0.6 * model[2].weight)
    assert torch.allclose(folded[0].weight, 0.7 * model[0].weight)
    assert [e.action for e in result.report.entries] == ["replaced", "replaced", "frozen"]
    folded.train()  # the Gaussian rule layer stays in its deterministic eval form
    assert find_sites(folded) == []
    _assert_eval_equal(model, folded, x)


class _Fractal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.join = FractalJoin(2, p=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join([self.a(x), self.b(x)])


def test_fractal_join_becomes_deterministic_mean() -> None:
    model = _Fractal().eval()
    x = torch.randn(3, 4)
    result = fold_with_report(model, x)
    folded = result.model
    assert isinstance(folded.join, MeanJoin)
    folded.train()
    with torch.no_grad():
        assert torch.equal(folded(x), folded(x))
    _assert_eval_equal(model, folded.eval(), x)


def test_folded_model_runs_no_more_modules_than_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), ClassicDropout(0.5), nn.Linear(8, 8), nn.Dropout(0.2))
    folded = fold(model.eval())

    def calls(m: nn.Module) -> list[str]:
        seen: list[str] = []
        hooks = [c.register_forward_hook(lambda mod, i, o: seen.append(type(mod).__name__)) for c in m]
        with torch.no_grad():
            m(torch.randn(2, 8))
        for h in hooks:
            h.remove()
        return seen

    assert calls(folded) == ["Linear", "ReLU", "Removed", "Linear", "Removed"]
    assert len(calls(folded)) == len(calls(model))
    assert not any(isinstance(m, Scale) for m in folded.modules())
