"""find_sites: module types (ours, torch, name-only timm / torchvision / transformers), functional calls,
user registration, and that finding leaves the model and the RNG untouched."""

from __future__ import annotations

import json

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
from dropwise.surgery import find_sites, register_site_type
from dropwise.surgery.site_types import _USER, SiteType
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _foreign(module: str, name: str, **attrs: object) -> nn.Module:
    """An instance of a class that looks like a third-party class (recognition is by name and module)."""
    cls = type(name, (nn.Module,), {"forward": lambda self, x: x, "__module__": module})
    obj = cls()
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def test_module_sites_kinds_and_p() -> None:
    model = nn.Sequential(
        nn.Dropout(0.1),
        nn.Dropout1d(0.2),
        nn.Dropout2d(0.3),
        nn.Dropout3d(0.4),
        nn.AlphaDropout(0.15),
        nn.FeatureAlphaDropout(0.25),
        ClassicDropout(0.35),
        EmbeddingDropout(0.45),
        DropConnectLinear(4, 4, p=0.55),
        DropPath(0.6),
        DropPath(0.65, scale_by_keep=False),
        FractalJoin(2, p=0.7),
        DropBlock2d(0.75, 3),
    )
    got = [(s.name, s.kind, s.p, s.switch, s.rule) for s in find_sites(model)]
    assert got == [
        ("0", "dropout", 0.1, "module.training", "delete"),
        ("1", "dropout1d", 0.2, "module.training", "delete"),
        ("2", "dropout2d", 0.3, "module.training", "delete"),
        ("3", "dropout3d", 0.4, "module.training", "delete"),
        ("4", "alpha_dropout", 0.15, "module.training", "delete"),
        ("5", "feature_alpha_dropout", 0.25, "module.training", "delete"),
        ("6", "classic_dropout", 0.35, "module.training", "scale"),
        ("7", "embedding_dropout", 0.45, "module.training", "delete"),
        ("8", "drop_connect", 0.55, "module.training", "mean_rule"),
        ("9", "drop_path", 0.6, "module.training", "delete"),
        ("10", "stochastic_depth_classic", 0.65, "module.training", "scale"),
        ("11", "fractal_join", 0.7, "module.training", "mean_join"),
        ("12", "drop_block", 0.75, "module.training", "delete"),
    ]
    sites = find_sites(model)
    assert sites[6].details["eval_scale"] == pytest.approx(0.65)
    assert sites[10].details == {"scale_by_keep": False, "eval_scale": pytest.approx(0.35)}
    assert sites[12].details["block_size"] == 3
    assert sites[0].module_class == "torch.nn.modules.dropout.Dropout"
    json.dumps([s.to_dict() for s in sites])  # JSON-able


def test_third_party_classes_recognised_by_name_without_import() -> None:
    model = nn.Sequential(
        _foreign("timm.layers.drop", "DropPath", drop_prob=0.1, scale_by_keep=True),
        _foreign("timm.models.layers.drop", "DropBlock2d", drop_prob=0.2, block_size=7),
        _foreign("torchvision.ops.stochastic_depth", "StochasticDepth", p=0.3, mode="row"),
        _foreign("torchvision.ops.drop_block", "DropBlock2d", p=0.4, block_size=5),
        _foreign("transformers.models.beit.modeling_beit", "BeitDropPath", drop_prob=0.5),
        _foreign("mylib.layers", "DropPath", drop_prob=0.9),  # same name, unknown library: not a site
        _foreign("timm_extra.layers", "DropPath", drop_prob=0.9),  # prefix must end at a dot
    )
    got = [(s.name, s.kind, s.p, s.details) for s in find_sites(model)]
    assert got == [
        ("0", "drop_path", 0.1, {"scale_by_keep": True}),
        ("1", "drop_block", 0.2, {"block_size": 7}),
        ("2", "drop_path", 0.3, {"mode": "row"}),
        ("3", "drop_block", 0.4, {"block_size": 5}),
        ("4", "drop_path", 0.5, {}),
    ]


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.bn(self.lin(x)), 0.3, self.training)
        return F.alpha_dropout(x, p=0.2, training=self.training)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.p = 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, 1, 2, 4).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return out.reshape(x.shape[0], 8)


class _AlwaysOn(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.1)  # training defaults to True: random even in eval


class _FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gated = _Gated()
        self.drop = nn.Dropout(0.4)  # its internal F.dropout must not be reported twice
        self.att = _Attention()
        self.always = _AlwaysOn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.always(self.att(self.drop(self.gated(x))))


def test_functional_sites_found_with_gate() -> None:
    model = _FunctionalNet().eval()
    x = torch.randn(4, 8)
    assert [s.key for s in find_sites(model)] == ["drop"]  # no example: module sites only
    sites = find_sites(model, x)
    got = [(s.key, s.kind, pytest.approx(s.p), s.switch, s.foldable) for s in sites]
    assert got == [
        ("drop", "dropout", 0.4, "module.training", True),
        ("gated:dropout#0", "functional_dropout", 0.3, "parent.training (functional)", True),
        ("gated:alpha_dropout#0", "functional_dropout", 0.2, "parent.training (functional)", True),
        (
            "att:scaled_dot_product_attention#0",
            "attention_dropout",
            0.25,
            "parent.training (functional)",
            True,
        ),
        ("always:dropout#0", "functional_dropout", 0.1, "always (training=True)", False),
    ]
    assert sites[1].module_class.endswith("_Gated")


def test_find_sites_leaves_model_and_rng_untouched() -> None:
    model = _FunctionalNet()
    model.eval()
    model.att.train()  # mixed flags must survive
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    find_sites(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm statistics unchanged


class _Noise(nn.Module):
    """A user's stochastic layer: multiplicative noise in train, eval multiplies by `keep`."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * torch.bernoulli(torch.full_like(x, 1 - self.rate))
        return x * (1 - self.rate)


def test_register_site_type() -> None:
    before = list(_USER)
    try:
        assert find_sites(nn.Sequential(_Noise(0.3))) == []
        st = register_site_type(_Noise, kind="my_noise", p_attr="rate", fold="scale")
        assert isinstance(st, SiteType)
        (site,) = find_sites(nn.Sequential(nn.Linear(2, 2), _Noise(0.3)))
        assert (site.name, site.kind, site.p, site.rule) == ("1", "my_noise", 0.3, "scale")
        assert site.details["eval_scale"] == pytest.approx(0.7)
        register_site_type(f"{__name__}._Noi*", kind="by_name", p_attr="rate")
        assert find_sites(nn.Sequential(_Noise(0.3)))[0].kind == "by_name"  # later registration wins
        with pytest.raises(ValueError, match="fold"):
            register_site_type(_Noise, kind="x", fold="bogus")
        with pytest.raises(ValueError, match="ClassName"):
            register_site_type("NoDots", kind="x")
        with pytest.raises(TypeError):
            register_site_type(int, kind="x")
    finally:
        _USER[:] = before


def test_batch_of_one_and_bad_example() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), _Gated()).eval()
    sites = find_sites(model, torch.randn(1, 3))  # BatchNorm in train mode would refuse a batch of one
    assert [s.key for s in sites] == ["2:dropout#0", "2:alpha_dropout#0"]
    with pytest.raises(ValueError, match="example forward of Sequential failed"):
        find_sites(model, torch.randn(2, 5))
