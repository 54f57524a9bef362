"""Surgery on every zoo network (untrained, with randomised BatchNorm statistics so that folds matter)."""

from __future__ import annotations

import pytest
import torch
from dropwise.models.zoo import ZOO, build
from dropwise.surgery import find_sites, fold_with_report, split, to_mc
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


# Input shapes of the zoo's datasets (batch of 4); int64 = token ids below `vocab`.
_SHAPES = {
    "digits": ((64,), torch.float32),
    "digits_tokens": ((64,), torch.int64),
    "mnist": ((1, 28, 28), torch.float32),
    "diabetes": ((10,), torch.float32),
}

# The kind each layer class must be reported as.
_KIND = {
    "Dropout": "dropout",
    "Dropout2d": "dropout2d",
    "ClassicDropout": "classic_dropout",
    "DropConnectLinear": "drop_connect",
    "DropConnectConv2d": "drop_connect",
    "DropBlock2d": "drop_block",
    "FractalJoin": "fractal_join",
    "EmbeddingDropout": "embedding_dropout",
}


def _input(name: str) -> torch.Tensor:
    shape, dtype = _SHAPES[ZOO[name].dataset]
    g = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        return torch.randint(0, 17, (4, *shape), generator=g)
    return torch.randn(4, *shape, generator=g)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build(name)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_surgery(name: str) -> None:
    model = _model(name)
    x = _input(name)
    with torch.no_grad():
        want = model(x)
    sites = find_sites(model, x)
    assert sites, name

    # sites: right kind and p for every module of a known class
    by_name = dict(model.named_modules())
    for site in sites:
        module = by_name[site.name]
        cls = type(module).__name__
        if cls == "DropPath":
            assert site.kind == ("drop_path" if module.scale_by_keep else "stochastic_depth_classic")
        else:
            assert site.kind == _KIND[cls], (site, cls)
        assert site.p == pytest.approx(float(module.p))
        assert site.called is True
    layer_count = sum(type(m).__name__ in {*_KIND, "DropPath"} for m in model.modules())
    assert len([s for s in sites if s.function is None]) == layer_count

    # fold: equal to eval, no site left, no kept multiply, original untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_with_report(model, x)
    folded = result.model
    assert find_sites(folded, x) == []
    assert result.report.scales_kept == 0, str(result.report)
    with torch.no_grad():
        got = folded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # MC: samples differ, BatchNorm statistics fixed, eval()/train() do not undo it
    mc = to_mc(model, example_input=x)
    bn = _bn_state(mc)
    mc.eval()
    with torch.no_grad():
        a, b = mc(x), mc(x)
    mc.train()
    with torch.no_grad():
        c = mc(x)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert all(torch.equal(u, v) for u, v in zip(bn, _bn_state(mc), strict=True))

    # split reproduces the model in eval and in MC mode (same seed -> same draws)
    sp = split(model, x)
    assert sp.captured, sp.reason
    with torch.no_grad():
        assert torch.equal(sp(x), want)
    sp_mc = split(mc, x)
    assert sp_mc.captured, sp_mc.reason
    with torch.no_grad():
        torch.manual_seed(7)
        ref = mc(x)
        torch.manual_seed(7)
        assert torch.equal(sp_mc(x), ref)
        torch.manual_seed(7)
        trunk_out = sp_mc.trunk(x)
        assert all(isinstance(t, torch.Tensor) for t in trunk_out)
        assert torch.equal(sp_mc.tail(*trunk_out), ref)
