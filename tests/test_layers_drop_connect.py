"""DropConnect (Wan 2013): masks, per-example sampling, mean and Gaussian inference, from trained layers."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dropwise.models.layers import (
    DropConnectConv2d,
    DropConnectLinear,
    drop_connect_conv2d,
    drop_connect_linear,
    gaussian_nodes,
)
from dropwise.models.layers._common import bernoulli_mask
from dropwise.models.layers.drop_connect import per_example_conv2d
from torch import nn

SIGMAS = 5.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trained_linear(in_f: int = 12, out_f: int = 5) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f)


# ------------------------------------------------------------------------------ construction from layers


def test_from_linear_keeps_weights_bias_and_mode() -> None:
    linear = _trained_linear().eval()
    layer = DropConnectLinear.from_linear(linear, p=0.3, activation="relu")
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert layer.weight.data_ptr() != linear.weight.data_ptr(), "a copy, not shared storage"
    assert not layer.training and layer.p == 0.3
    no_bias = DropConnectLinear.from_linear(nn.Linear(4, 3, bias=False), p=0.5)
    assert no_bias.bias is None
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        DropConnectLinear.from_linear(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]


def test_eval_mean_rule_equals_q_w_x_plus_b() -> None:
    linear = _trained_linear()
    x = torch.randn(7, 12, generator=_gen(1))
    layer = DropConnectLinear.from_linear(linear, p=0.25).eval()
    assert torch.allclose(layer(x), F.linear(x, 0.75 * linear.weight, linear.bias), atol=1e-6)
    relu = DropConnectLinear.from_linear(linear, p=0.25, activation=nn.ReLU()).eval()
    assert torch.allclose(relu(x), F.relu(F.linear(x, 0.75 * linear.weight, linear.bias)), atol=1e-6)


def test_from_conv_keeps_geometry_and_eval_mean_rule() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
    layer = DropConnectConv2d.from_conv(conv, p=0.4)
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == ((2, 2), (2, 2), (2, 2), 2)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    x = torch.randn(3, 4, 11, 9, generator=_gen(2))
    expected = F.conv2d(x, 0.6 * conv.weight, conv.bias, 2, 2, 2, 2)
    assert torch.allclose(layer.eval()(x), expected, atol=1e-5)
    assert torch.allclose(layer(x[0]), expected[0], atol=1e-5), "unbatched input"
    with pytest.raises(ValueError, match="padding_mode"):
        DropConnectConv2d.from_conv(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))


# -------------------------------------------------------------------------------------- training masks


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_linear_weight_drop_rate_per_example(p: float, assert_binomial: Callable[[int, int, float], None]) -> None:
    rows, in_f, out_f = 400, 8, 16
    layer = DropConnectLinear(in_f, out_f, bias=False, p=p, generator=_gen(3)).train()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(out_f, in_f, generator=_gen(4)) + 0.5)
    # one-hot rows: y[n, o] = M[n, o, j] * W[o, j], so zeros reveal the dropped weights one by one
    x = torch.eye(in_f).repeat(rows // in_f, 1)
    y = layer(x)
    assert_binomial(int((y == 0).sum()), y.numel(), p)
    kept = y != 0
    assert torch.allclose(y[kept], (layer.weight.T.repeat(rows // in_f, 1))[kept]), "no rescaling (Wan 2013)"
    # per example: identical rows j, j + in_f, ... draw different masks
    assert not torch.equal(y[:in_f] == 0, y[in_f : 2 * in_f] == 0)


def test_linear_shared_mask_when_not_per_example() -> None:
    layer = DropConnectLinear(10, 6, p=0.5, per_example=False, generator=_gen(5)).train()
    x = torch.randn(1, 10, generator=_gen(6)).expand(8, -1)
    y = layer(x)
    # one mask for the whole batch: identical rows give identical outputs (up to BLAS row blocking)
    assert torch.allclose(y, y[:1].expand_as(y), rtol=0.0, atol=1e-6)


def test_linear_train_expectation_is_the_mean_rule() -> None:
    p, draws = 0.5, 8000
    layer = DropConnectLinear.from_linear(_trained_linear(), p=p, generator=_gen(7)).train()
    x = torch.randn(1, 12, generator=_gen(8))
    with torch.no_grad():
        y = layer(x.expand(draws, -1))
        expected = layer.eval()(x)[0]
        # var of one output: p q sum_j W_oj^2 x_j^2
        sd = torch.sqrt(p * (1 - p) * F.linear(x * x, layer.weight * layer.weight)[0] / draws)
    assert torch.all((y.mean(0) - expected).abs() <= SIGMAS * sd)


def test_linear_gradients_follow_the_sampled_mask() -> None:
    in_f, out_f = 6, 4
    weight = torch.randn(out_f, in_f, dtype=torch.float64, generator=_gen(9)).requires_grad_()
    bias = torch.randn(out_f, dtype=torch.float64, generator=_gen(10))

    def run(x: torch.Tensor) -> torch.Tensor:  # fresh generator: the same mask on every call
        return drop_connect_linear(x, weight, None, 0.5, training=True, per_example=False, generator=_gen(11))

    masked = run(torch.eye(in_f, dtype=torch.float64)).T.detach()  # = M * W
    mask = (masked != 0).to(torch.float64)
    assert torch.allclose(masked, mask * weight)
    x = torch.randn(5, in_f, dtype=torch.float64, generator=_gen(12)).requires_grad_()
    upstream = torch.randn(5, out_f, dtype=torch.float64, generator=_gen(13))
    run(x).backward(upstream)
    assert torch.allclose(x.grad, upstream @ (mask * weight))
    assert torch.allclose(weight.grad, mask * (upstream.T @ x.detach()))
    assert torch.autograd.gradcheck(
        lambda a, w, b: drop_connect_linear(a, w, b, 0.5, training=True, generator=_gen(14)),
        (x.detach().requires_grad_(), weight.detach().requires_grad_(), bias.requires_grad_()),
    )


def test_conv_per_example_masks_match_a_per_sample_loop() -> None:
    torch.manual_seed(2)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    x = torch.randn(5, 4, 8, 7, dtype=torch.float64)
    y = drop_connect_conv2d(x, weight, bias, 1, 1, 1, 2, 0.5, training=True, generator=_gen(15))
    # white-box: the layer draws one mask of shape [B, *weight.shape] from its generator
    masks = bernoulli_mask((5, *weight.shape), 0.5, weight, _gen(15))
    loop = torch.cat([F.conv2d(x[b : b + 1], masks[b] * weight, bias, 1, 1, 1, 2) for b in range(5)])
    assert torch.allclose(y, loop)
    same = drop_connect_conv2d(x[:1].expand(5, -1, -1, -1), weight, bias, 1, 1, 1, 2, 0.5, training=True)
    assert not torch.equal(same[0], same[1]), "identical samples get different masks"


# (in, out, kernel, stride, padding, dilation, groups); input 11 x 10
GEOMETRIES = [
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 1, 1, 2),
    (6, 9, (3, 2), (2, 1), (0, 2), (2, 1), 3),
    (3, 4, (2, 3), 1, "same", (1, 2), 1),
    (4, 4, 3, (1, 2), "valid", 1, 4),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_per_example_conv_matmul_form_equals_the_grouped_conv_and_a_loop(geometry: tuple) -> None:
    in_c, out_c, kernel, stride, padding, dilation, groups = geometry
    torch.manual_seed(3)
    conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, dilation, groups, dtype=torch.float64)
    x = torch.randn(5, in_c, 11, 10, dtype=torch.float64)
    filters = torch.randn(5, *conv.weight.shape, dtype=torch.float64)
    args = (conv.bias, conv.stride, conv.padding, conv.dilation, groups)
    grouped = per_example_conv2d(x, filters, *args, grouped=True)
    matmul = per_example_conv2d(x, filters, *args, grouped=False)
    loop = torch.cat([F.conv2d(x[n : n + 1], filters[n], *args) for n in range(5)])
    assert matmul.shape == grouped.shape == loop.shape
    torch.testing.assert_close(grouped, loop)
    torch.testing.assert_close(matmul, loop)
    assert per_example_conv2d(x, filters, *args).equal(grouped), "eager default: the grouped convolution"
    # gradients of the matmul form (input, filters, bias)
    a, f, b = (t.detach().clone().requires_grad_() for t in (x[:2], filters[:2], conv.bias))
    assert torch.autograd.gradcheck(lambda a, f, b: per_example_conv2d(a, f, b, *args[1:], grouped=False), (a, f, b))


def test_per_example_conv_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="same N"):
        per_example_conv2d(torch.zeros(3, 2, 5, 5), torch.zeros(2, 4, 2, 3, 3))


def test_per_example_conv_exports_with_a_dynamic_batch() -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    layer = DropConnectConv2d(4, 6, 3, stride=2, padding=1, groups=2, p=0.5, activation="relu")

    class Masked(nn.Module):  # the layer's per-example path with the masks as an input
        def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            w = layer.weight
            return per_example_conv2d(x, masks * w, layer.bias, layer.stride, layer.padding, 1, 2).relu()

    x, masks = torch.randn(3, 4, 9, 9), (torch.rand(3, *layer.weight.shape) < 0.5).float()
    rows = torch.export.Dim("rows", min=1)
    program = torch.onnx.export(
        Masked().eval(),
        (x, masks),
        dynamo=True,
        verbose=False,
        dynamic_shapes={"x": {0: rows}, "masks": {0: rows}},
    )
    conv_groups = [
        next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in program.model_proto.graph.node
        if n.op_type == "Conv"
    ]
    assert conv_groups == [4], "one static depthwise Conv (the patches), no batch-dependent group"
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # row counts other than the example's
        xn, mn = torch.randn(n, 4, 9, 9), (torch.rand(n, *layer.weight.shape) < 0.5).float()
        (got,) = session.run(None, {"x": xn.numpy(), "masks": mn.numpy()})
        want = torch.cat([F.conv2d(xn[i : i + 1], mn[i] * layer.weight, layer.bias, 2, 1, 1, 2) for i in range(n)])
        np.testing.assert_allclose(got, want.relu().detach().numpy(), rtol=1e-5, atol=1e-5)


def test_conv_weight_drop_rate_and_gradcheck(assert_binomial: Callable[[int, int, float], None]) -> None:
    p = 0.3
    layer = DropConnectConv2d(1, 64, 1, bias=False, p=p, generator=_gen(16)).train()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(64, 1, 1, 1, generator=_gen(17)) + 0.5)
    y = layer(torch.ones(300, 1, 1, 1))  # y[b, o] = M[b, o] W[o]
    assert_binomial(int((y == 0).sum()), y.numel(), p)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, k: drop_connect_conv2d(a, k, None, 2, 1, training=True, p=0.5, generator=_gen(18)), (x, w)
    )


def test_conv_train_expectation_is_the_mean_rule() -> None:
    p, draws = 0.5, 3000
    torch.manual_seed(3)
    layer = DropConnectConv2d(2, 3, 3, padding=1, p=p, generator=_gen(19))
    x = torch.randn(1, 2, 4, 4, generator=_gen(20))
    with torch.no_grad():
        y = layer.train()(x.expand(draws, -1, -1, -1))
        expected = layer.eval()(x)[0]
        sd = torch.sqrt(p * (1 - p) * F.conv2d(x * x, layer.weight**2, None, 1, 1)[0] / draws)
    assert torch.all((y.mean(0) - expected).abs() <= SIGMAS * sd + 1e-6)


# ------------------------------------------------------------------------------------ Gaussian inference


def test_gaussian_inference_approximates_the_mc_average_of_the_activation() -> None:
    torch.manual_seed(4)
    layer = DropConnectLinear(128, 16, p=0.5, activation="relu", inference="gaussian", generator=_gen(21))
    x = torch.randn(2, 128, generator=_gen(22))
    draws = 4000
    with torch.no_grad():
        samples = layer.train()(x.repeat(draws, 1)).view(draws, 2, 16)
        mc, se = samples.mean(0), samples.std(0) / math.sqrt(draws)
        gaussian = layer.eval()(x)
        layer.inference = "mean"
        mean_rule = layer(x)
    gaussian_error = (gaussian - mc).abs()
    # the Gaussian rule matches E[relu(u)] up to MC noise (and a small CLT error over 128 inputs) ...
    assert torch.all(gaussian_error <= SIGMAS * se + 0.01 * mc.abs().max())
    # ... while relu((qW)x + b) misses it by far (Jensen)
    assert float((mean_rule - mc).abs().mean()) > 5 * float(gaussian_error.mean())


def test_gaussian_inference_is_exact_mean_without_activation_and_deterministic() -> None:
    linear = _trained_linear()
    layer = DropConnectLinear.from_linear(linear, p=0.5, inference="gaussian").eval()
    x = torch.randn(3, 12, generator=_gen(23))
    assert torch.allclose(layer(x), F.linear(x, 0.5 * linear.weight, linear.bias), atol=1e-6)
    tanh = DropConnectLinear.from_linear(linear, p=0.5, inference="gaussian", activation=torch.tanh).eval()
    assert torch.equal(tanh(x), tanh(x))


def test_gaussian_conv_close_to_mc() -> None:
    torch.manual_seed(5)
    layer = DropConnectConv2d(8, 4, 3, p=0.5, activation="sigmoid", inference="gaussian", generator=_gen(24))
    x = torch.randn(1, 8, 5, 5, generator=_gen(25))
    with torch.no_grad():
        samples = layer.train()(x.expand(2000, -1, -1, -1))
        mc, se = samples.mean(0), samples.std(0) / math.sqrt(2000)
        gaussian = layer.eval()(x)[0]
    assert torch.all((gaussian - mc).abs() <= SIGMAS * se + 0.01)


def test_gaussian_nodes_match_the_first_two_moments() -> None:
    nodes = gaussian_nodes(64, torch.empty(0, dtype=torch.float64))
    assert float(nodes.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(nodes.square().mean()) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(nodes[1:] > nodes[:-1])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="inference"):
        DropConnectLinear(3, 3, inference="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gaussian_samples"):
        DropConnectLinear(3, 3, gaussian_samples=0)
    with pytest.raises(ValueError, match="activation"):
        DropConnectLinear(3, 3, activation="swishy")
    with pytest.raises(ValueError, match="last dimension must be 3"):
        DropConnectLinear(3, 3).train()(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        DropConnectConv2d(1, 1, 1).train()(torch.ones(2, 2))
