"""dropwise.models.zoo: every reference network builds, runs, is fx-traceable, and the zoo covers the whole family."""

from __future__ import annotations

import pytest
import torch
from dropwise.models.data import load_dataset
from dropwise.models.layers import (
    ClassicDropout,
    DropBlock2d,
    DropConnectConv2d,
    DropConnectLinear,
    DropPath,
    EmbeddingDropout,
    FractalJoin,
    linear_decay,
)
from dropwise.models.zoo import ZOO, ZooSpec, build
from dropwise.models.zoo.fractalnet import FractalBlock, FractalNet
from dropwise.models.zoo.mlp import dropout_mlp
from dropwise.package import build_from_architecture
from torch import fx, nn

NAMES = list(ZOO)


def _example(spec: ZooSpec, n: int = 3) -> torch.Tensor:
    return load_dataset(spec.dataset).test[0][:n]


class _FamilyLeafTracer(fx.Tracer):
    """Treat the family's layers as leaves (their own argument checks are not symbolic)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("dropwise.models.layers") or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_forward_shapes(name: str) -> None:
    spec = ZOO[name]
    torch.manual_seed(0)
    model = build(name)
    x = _example(spec)
    k = 10 if spec.task == "classification" else 1
    model.eval()
    out = model(x)
    assert out.shape == (3, k) and torch.isfinite(out).all()
    assert torch.equal(out, model(x)), "eval mode must be deterministic"
    assert model(x[:1]).shape == (1, k)
    model.train()
    assert model(x).shape == (3, k)


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_is_stochastic(name: str) -> None:
    torch.manual_seed(1)
    model = build(name).train()
    x = _example(ZOO[name], 8)
    outs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", NAMES)
def test_rebuilds_from_its_factory_string(name: str) -> None:
    spec = ZOO[name]
    torch.manual_seed(2)
    a = build(name)
    b = build_from_architecture({"factory": spec.factory, "kwargs": spec.kwargs})
    b.load_state_dict(a.state_dict())
    x = _example(spec)
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("name", NAMES)
def test_fx_traceable_in_eval_mode(name: str) -> None:
    model = build(name).eval()
    graph = _FamilyLeafTracer().trace(model)
    traced = fx.GraphModule(model, graph)
    x = _example(ZOO[name])
    assert torch.equal(traced(x), model(x))


def test_zoo_uses_every_member_of_the_family() -> None:
    kinds: set[str] = set()
    for name in NAMES:
        for m in build(name).modules():
            if isinstance(m, DropPath):
                kinds.add("DropPath(timm)" if m.scale_by_keep else "DropPath(classic)")
            for cls in (
                ClassicDropout, EmbeddingDropout, DropConnectLinear, DropConnectConv2d,
                FractalJoin, DropBlock2d, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d,
            ):  # fmt: skip
                if type(m) is cls:
                    kinds.add(cls.__name__)
    assert kinds >= {
        "ClassicDropout", "EmbeddingDropout", "DropConnectLinear", "DropConnectConv2d", "FractalJoin",
        "DropBlock2d", "Dropout", "Dropout2d", "BatchNorm2d", "DropPath(timm)", "DropPath(classic)",
    }  # fmt: skip
    assert any(s.train.max_norm for s in ZOO.values())
    assert any(s.train.cutout and s.dataset == "mnist" for s in ZOO.values())
    assert any(s.task == "regression" for s in ZOO.values())
    assert {s.dataset for s in ZOO.values()} == {"digits", "digits_tokens", "mnist", "diabetes"}


def test_mlp_recipes() -> None:
    """mlp_digits: dropout 0.5 only before the head (the MC-NLL pick); mlp_classic_digits: Srivastava's rates."""
    model = build("mlp_digits")
    drops = [(i, m.p) for i, m in enumerate(model) if isinstance(m, nn.Dropout)]
    assert drops == [(len(model) - 2, 0.5)], "one dropout, between the last hidden layer and the head"
    assert isinstance(model[-1], nn.Linear) and not isinstance(model[0], nn.Dropout)
    assert ZOO["mlp_digits"].train.max_norm == 3.0
    classic = build("mlp_classic_digits")
    assert [m.p for m in classic.modules() if isinstance(m, ClassicDropout)] == [0.2, 0.5, 0.5]
    assert isinstance(classic[0], ClassicDropout), "Srivastava's input dropout comes first"
    assert not any(type(m) is nn.Dropout for m in classic.modules())
    assert ZOO["mlp_classic_digits"].train.max_norm == 3.0


def test_dropout_mlp_per_layer_rates() -> None:
    model = dropout_mlp(in_features=4, hidden=[8, 6, 5], out_features=2, p_input=0.0, p_hidden=[0.1, 0.0, 0.3])
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear", "ReLU", "Dropout", "Linear"]
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.1, 0.3]
    same = dropout_mlp(in_features=4, hidden=[8, 6], out_features=2, p_input=0.2, p_hidden=0.4)
    assert [m.p for m in same if isinstance(m, nn.Dropout)] == [0.2, 0.4, 0.4], "a float still means every layer"
    classic = dropout_mlp(in_features=4, hidden=[8, 6], p_input=0.0, p_hidden=(0.0, 0.5), dropout="classic")
    assert [m.p for m in classic if isinstance(m, ClassicDropout)] == [0.5]


@pytest.mark.parametrize(
    ("p_hidden", "p_input", "message"),
    [
        ([0.1], 0.0, "lists 1 rates for 2 hidden layers"),
        ([0.1, 1.0], 0.0, r"p_hidden\[1\] must be a dropout probability"),
        (-0.1, 0.0, "p_hidden must be a dropout probability"),
        ("0.5", 0.0, "one float per hidden layer"),
        ([0.1, "x"], 0.0, r"p_hidden\[1\]"),
        (0.5, 1.5, "p_input must be a dropout probability"),
    ],
)
def test_dropout_mlp_rejects_bad_rates(p_hidden: object, p_input: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dropout_mlp(hidden=[8, 6], p_input=p_input, p_hidden=p_hidden)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet_mnist", "resnet_classic_digits"])
def test_resnet_drop_path_rates_decay_linearly(name: str) -> None:
    gates = [m for m in build(name).modules() if isinstance(m, DropPath)]
    p_last = ZOO[name].kwargs["p_last"]
    assert [g.p for g in gates] == pytest.approx(linear_decay(p_last, len(gates)))
    assert gates[-1].p == pytest.approx(p_last) and gates[0].p < gates[-1].p


def test_fractal_block_columns_and_joins() -> None:
    torch.manual_seed(3)
    block = FractalBlock(3, 2, 4, p=0.15).eval()
    x = torch.randn(2, 2, 6, 6)
    outs = block.path(x)
    assert len(outs) == 3
    # column c holds 2**c conv units: 7 convs in all for 3 columns
    assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 7
    assert torch.allclose(block(x), torch.stack(outs).mean(0))
    # global drop-path: column 0 is the single shallow conv; column 2 chains the deepest convs
    assert torch.allclose(block(x, 0), block.path.shallow(x))
    deep = block.path.second.second.shallow(
        block.path.second.first.path.shallow(block.path.first.path.second.shallow(block.path.first.path.first(x)))
    )
    assert torch.allclose(block(x, 2), deep)


def test_fractal_net_draws_global_columns_only_in_training() -> None:
    torch.manual_seed(4)
    net = FractalNet(widths=(4,), columns=3, global_fraction=1.0)
    draws = {net._draw_column() for _ in range(60)}
    assert draws == {0, 1, 2}
    local = FractalNet(widths=(4,), columns=3, global_fraction=0.0)
    assert {local._draw_column() for _ in range(20)} == {None}
    assert len([m for m in net.modules() if isinstance(m, FractalJoin)]) == 2  # outer join + nested f_2 join


def test_unknown_network_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown zoo network"):
        build("alexnet")
