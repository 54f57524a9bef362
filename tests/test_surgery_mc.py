"""to_mc: sites stochastic at inference, everything else in eval (BatchNorm statistics fixed), DropBlock at
its target probability, classic forms in train form, flags that survive eval()/train(), clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import ClassicDropout, DropBlock2d, DropBlockSchedule, DropPath
from dropwise.surgery import NoStochasticSiteError, to_mc
from dropwise.surgery.mc import HeadDropoutLinear
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        DropBlock2d(0.3, 3),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 36, 3),
    ).eval()


def _bn(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]


def test_mc_samples_differ_and_batchnorm_statistics_stay_fixed() -> None:
    model = _cnn()
    DropBlockSchedule(model, total_steps=10).set_step(0)  # training schedule left at drop_prob 0
    assert model[3].drop_prob == 0.0
    x = torch.randn(4, 1, 6, 6)
    mc = to_mc(model)
    assert mc[3].drop_prob == pytest.approx(0.3) and model[3].drop_prob == 0.0  # target p; original kept
    assert mc[3].training and mc[7].training and not mc[1].training and not mc[5].training
    before = _bn(mc)
    with torch.no_grad():
        outs = [mc(x) for _ in range(5)]
    assert not torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(before, _bn(mc), strict=True))
    assert not model[3].training and not model[7].training  # original untouched


def test_eval_and_train_do_not_undo_mc_state() -> None:
    mc = to_mc(_cnn())
    for call in (mc.eval, mc.train, lambda: mc.train(False)):
        assert call() is mc
        assert mc[3].training and mc[7].training and not mc[1].training
    parent = nn.Sequential(mc)
    parent.eval()  # a parent's eval() reaches the MC model through its train()
    assert mc[7].training and not mc[1].training


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.bn(self.lin(x)), 0.5, self.training)


def test_functional_dropout_switched_on_by_the_gating_module_alone() -> None:
    model = nn.Sequential(_Gate(), nn.Linear(6, 2)).eval()
    x = torch.randn(8, 6)
    mc = to_mc(model, example_input=x)
    assert [s.key for s in mc.mc_sites] == ["0:dropout#0"]
    assert mc[0].training and not mc[0].bn.training  # BatchNorm child stays in eval
    before = [mc[0].bn.running_mean.clone(), mc[0].bn.running_var.clone()]
    with torch.no_grad():
        a, b = mc(x), mc(x)
    assert not torch.equal(a, b)
    assert torch.equal(before[0], mc[0].bn.running_mean) and torch.equal(before[1], mc[0].bn.running_var)
    with (
        pytest.warns(UserWarning, match="example_input"),
        pytest.raises(NoStochasticSiteError, match="example_input"),
    ):
        to_mc(model)  # without the example the functional site is invisible


def test_classic_forms_run_in_train_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ClassicDropout(0.5), DropPath(0.5, scale_by_keep=False)).eval()
    mc = to_mc(model)
    x = torch.randn(64, 4)
    with torch.no_grad():
        lin = model[0](x)
        outs = [mc(x) for _ in range(20)]
    for out in outs:
        # train form: m * x (no 1/q) and one gate for the whole batch (0 or 1)
        kept = out != 0
        assert torch.equal(out[kept], lin[kept])
    assert any(bool((o == 0).all()) for o in outs) and any(bool((o != 0).any()) for o in outs)


def test_no_site_fails_clearly_and_head_dropout_can_be_added() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 3)).eval()
    with pytest.raises(NoStochasticSiteError, match=r"p = 0: 2"):
        to_mc(model)
    keys = set(model.state_dict())
    with pytest.warns(UserWarning, match="fine-tune"):
        mc = to_mc(model, add_dropout_before_head=0.3)
    assert isinstance(mc[3], HeadDropoutLinear) and mc.head_dropout_added == "3"
    assert set(mc.state_dict()) == keys  # same state-dict keys: weights still load
    assert [s.key for s in mc.mc_sites] == ["3.dropout"]
    x = torch.randn(16, 4)
    with torch.no_grad():
        assert not torch.equal(mc(x), mc(x))
        mc[3].dropout.eval()
        assert torch.allclose(mc(x), model(x))
    with pytest.raises(ValueError, match="add_dropout_before_head"):
        to_mc(model, add_dropout_before_head=1.5)


class _AlwaysOn(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.2)  # training=True by default: random in eval too


def test_sites_that_no_flag_controls_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _AlwaysOn(), nn.Dropout(0.1)).eval()
    with pytest.warns(UserWarning, match=r"1:dropout#0 cannot be switched"):
        mc = to_mc(model, example_input=torch.randn(2, 4))
    assert [s.key for s in mc.mc_sites] == ["2"]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, self.training))


def test_surgery_on_an_mc_model_sees_real_train_and_eval() -> None:
    from dropwise.surgery import find_sites, fold, split

    model = nn.Sequential(nn.Linear(4, 4), _Head()).eval()
    x = torch.randn(8, 4)
    mc = to_mc(model, example_input=x)
    # find_sites must not be fooled by the MC model's sticky train()/eval()
    (site,) = find_sites(mc, x)
    assert site.switch == "parent.training (functional)"
    folded = fold(mc, x)
    assert not folded[1].training and not hasattr(folded, "mc_sites")
    with torch.no_grad():
        assert torch.equal(folded(x), folded(x))
    sp = split(mc, x)
    assert sp.captured and sp.split_at == "1"  # the gating module is a leaf: its flag stays live
    mc.get_submodule("1").training = False
    with torch.no_grad():
        assert torch.equal(sp(x), model(x))
