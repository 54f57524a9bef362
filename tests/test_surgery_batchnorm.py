"""recalibrate_batchnorm: running statistics re-estimated with dropout off (Li et al., CVPR 2019)."""

from __future__ import annotations

import pytest
import torch
from dropwise.surgery import recalibrate_batchnorm
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def test_running_variance_moves_to_the_dropout_off_variance() -> None:
    model = _model()
    x = torch.randn(512, 8) * 2 + 1
    model.train()
    with torch.no_grad():
        for chunk in x.split(64) * 5:  # statistics accumulated with dropout ON (what training leaves)
            model(chunk)
    model.eval()
    with torch.no_grad():
        bn_in = model[1](model[0](x))  # dropout off (eval): what the layer sees at test time
    off_var = bn_in.var(0, unbiased=True)
    off_mean = bn_in.mean(0)
    shifted = model[2].running_var.clone()
    assert (shifted / off_var).mean() > 1.5  # variance shift: inverted dropout inflates the variance
    momentum = model[2].momentum
    model[1].train()  # a mixed state must be restored afterwards
    flags = [m.training for m in model.modules()]
    report = recalibrate_batchnorm(model, x, batch_size=len(x))  # one batch: exact unbiased variance
    assert torch.allclose(model[2].running_var, off_var, rtol=1e-4)
    assert torch.allclose(model[2].running_mean, off_mean, atol=1e-5)
    assert [m.training for m in model.modules()] == flags and model[2].momentum == momentum
    (layer,) = report.layers
    assert layer.name == "2" and layer.var_before == pytest.approx(float(shifted.mean()))
    assert layer.var_after == pytest.approx(float(off_var.mean()), rel=1e-4)
    assert layer.relative_change < -0.3
    assert report.batches == 1 and report.samples == 512
    assert "rel change" in str(report)


def test_batches_from_a_loader_average_cumulatively() -> None:
    model = _model().eval()
    x = torch.randn(256, 8)
    y = torch.zeros(256, dtype=torch.long)
    loader = list(zip(x.split(32), y.split(32), strict=True))  # (x, y) pairs like a DataLoader
    report = recalibrate_batchnorm(model, loader, max_batches=4)
    assert report.batches == 4 and report.samples == 128
    with torch.no_grad():
        per_batch = [model[0](c).var(0, unbiased=True) for c in x[:128].split(32)]
    assert torch.allclose(model[2].running_var, torch.stack(per_batch).mean(0), rtol=1e-4)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(2, 2), torch.randn(4, 2))
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no data"):
        recalibrate_batchnorm(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # a failed recalibration restores the statistics


def test_population_method_matches_what_each_layer_sees_at_test_time() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.Dropout(0.5),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
    )
    x = torch.randn(300, 8) * 3
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    report = recalibrate_batchnorm(model, iter(list(x.split(16))), method="population")
    assert report.batches == 19 and report.samples == 300
    model.eval()
    with torch.no_grad():
        first = model[0](x)
        second = model[5](model[4](model[3](model[2](model[1](first)))))  # upstream BatchNorm recalibrated
    for bn, inp in ((model[2], first), (model[6], second)):
        assert torch.allclose(bn.running_mean, inp.mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, inp.var(0, unbiased=True), rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        recalibrate_batchnorm(model, x, method="exact")
