"""split: deterministic trunk + stochastic tail with tail(*trunk(x)) == model(x) in eval and MC mode,
residual values carried across the split point, honest fallback where fx cannot capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import DropPath
from dropwise.surgery import split, to_mc
from torch import fx, nn

pytestmark = pytest.mark.usefixtures("one_thread")


class _Block(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop_path = DropPath(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(F.relu(self.bn(self.conv(x))))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.3, self.training))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = _Block(0.2)
        self.b2 = _Block(0.4)
        self.drop = nn.Dropout(0.5)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = self.b2(self.b1(h))
        pooled = h.mean((2, 3))
        n = pooled.shape[0]
        return self.head(self.drop(pooled)).view(n, -1) + x.flatten(1)[:, :3]  # the input jumps to the end


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _ResNet().eval()


def _seeded(fn, x: torch.Tensor, seed: int = 11) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(x)


def test_split_reproduces_model_in_eval_and_mc_and_carries_residuals() -> None:
    model = _model()
    x = torch.randn(3, 1, 6, 6)
    sp = split(model, x)
    assert sp.captured and sp.reason is None and sp.split_at == "b1.drop_path"
    # the residual (input of block 1) and the branch output cross the split; so does x (used at the end)
    assert len(sp.carried) == 3 and "x" in sp.carried
    trunk_out = sp.trunk(x)
    assert isinstance(trunk_out, tuple) and all(isinstance(t, torch.Tensor) for t in trunk_out)
    with torch.no_grad():
        assert torch.equal(sp(x), model(x))
        assert torch.equal(sp.tail(*sp.trunk(x)), model(x))
    mc = to_mc(model, example_input=x)
    sp_mc = split(mc, x)
    a, b = _seeded(mc, x), _seeded(sp_mc, x)
    assert torch.equal(a, b)
    assert not torch.equal(_seeded(mc, x, 1), _seeded(mc, x, 2))  # it is stochastic
    # the trunk is deterministic in MC mode: run it once, the tail T times
    t1, t2 = _seeded(sp_mc.trunk, x, 1), _seeded(sp_mc.trunk, x, 2)
    assert all(torch.equal(u, v) for u, v in zip(t1, t2, strict=True))


def test_tail_site_nodes_are_call_module_with_original_names() -> None:
    model = _model()
    sp = split(model, torch.randn(2, 1, 6, 6))
    assert isinstance(sp.tail, fx.GraphModule)
    targets = {n.target for n in sp.tail.graph.nodes if n.op == "call_module"}
    assert {"b1.drop_path", "b2.drop_path", "drop", "head"} <= targets  # head gates F.dropout: a leaf
    trunk_targets = {n.target for n in sp.trunk.graph.nodes if n.op == "call_module"}
    assert trunk_targets == {"stem", "b1.conv", "b1.bn"}
    assert sp.tail.get_submodule("b1.drop_path") is model.b1.drop_path  # shared, not copied


def test_split_at_a_chosen_subset() -> None:
    model = _model()
    x = torch.randn(2, 1, 6, 6)
    sp = split(model, x, sites=["head:dropout#0"])
    assert sp.split_at == "head"
    mc = to_mc(model, example_input=x)
    for name in ("b1.drop_path", "b2.drop_path", "drop"):
        mc.get_submodule(name).training = False  # only the chosen site stays stochastic
    sp_mc = split(mc, x, sites=["head:dropout#0"])
    assert torch.equal(_seeded(mc, x), _seeded(sp_mc, x))
    with pytest.raises(ValueError, match="unknown site"):
        split(model, x, sites=["nope"])


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.drop(self.lin(x))


class _RootGated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), 0.5, self.training)


def test_fallback_says_why_and_still_reproduces() -> None:
    model = _DataDependent().eval()
    x = torch.randn(3, 4)
    sp = split(model, x)
    assert not sp.captured and sp.frontend is None
    assert "torch.fx could not trace" in sp.reason and "torch.export could not capture" in sp.reason
    assert sp.trunk(x)[0] is x
    with torch.no_grad():
        assert torch.equal(sp(x), model(x))
    mc = to_mc(model, example_input=x)
    assert torch.equal(_seeded(split(mc, x), x), _seeded(mc, x))


def test_root_gated_dropout_is_split_by_torch_export() -> None:
    model = _RootGated().eval()
    x = torch.randn(3, 4)
    sp = split(model, x)
    assert sp.captured and sp.frontend == "export", sp.reason
    assert sp.reason is None
    assert sp.split_at == ":dropout#0" and sp.carried  # the trunk (the Linear) runs before the cut
    with torch.no_grad():
        assert torch.equal(sp(x), model(x))
    mc = to_mc(model, example_input=x)
    sp_mc = split(mc, x)
    assert sp_mc.frontend == "export"
    assert torch.equal(_seeded(sp_mc, x), _seeded(mc, x))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drop(self.a(x)) * y


def test_tuple_input_and_no_site() -> None:
    model = _TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    sp = split(model, (x, y))
    assert sp.captured
    with torch.no_grad():
        assert torch.equal(sp(x, y), model(x, y))
    with pytest.raises(ValueError, match="no stochastic site"):
        split(nn.Linear(2, 2), torch.randn(1, 2))
