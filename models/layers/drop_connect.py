"""DropConnect, Wan et al. 2013.

Wan, Zeiler, Zhang, LeCun, Fergus, "Regularization of Neural Networks using DropConnect", ICML 2013.
Each WEIGHT is kept with probability ``q = 1 - p``: ``r = a((M * W) v + b)``, ``M ~ Bernoulli(q)``; no
rescaling in training. The activation ``a`` lives inside the layer because the inference rule averages it.

- train: a fresh mask ``M`` per example (``per_example=True``, the paper's algorithm 1) or one mask per
  forward call (``per_example=False``); output ``a((M * W) v + b)``;
- eval, ``inference="mean"``: the mean rule ``a((q W) v + b)``;
- eval, ``inference="gaussian"``: the paper's moment matching (section 3). Each pre-activation is
  approximated by ``u ~ N(q W v + b, q (1 - q) (W * W)(v * v))`` and the output is the average of
  ``a(u)`` over ``gaussian_samples`` = Z points. The Z points are the Z stratified quantiles of N(0, 1)
  (normalised to unit variance), not random draws, so eval stays deterministic (the layer is stochastic
  exactly when ``self.training``); without an activation the exact expectation (the mean rule) is returned;
- MC: as train (sample ``M``).

Cost of per-example masks: a mask of ``N x out x in`` (Linear, N rows) or ``B x out x in/groups x kh x kw``
(Conv2d) numbers is drawn and stored for backward on every training forward; the Linear product becomes a
batched matmul and the convolution a single grouped convolution with ``groups * B`` groups (batch folded into
channels), so the FLOPs are those of the plain layer but memory and RNG grow linearly with the batch.

Export: ONNX ``Conv`` takes ``group`` as a constant attribute, so the grouped form cannot follow a batch size
known only at run time (the MC ONNX graph runs its tail on T * B rows). While exporting
(``torch.onnx.is_in_onnx_export()`` or ``torch.compiler.is_exporting()``) the per-example convolution is
computed as im2col + batched matmul instead (`per_example_conv2d`): the patches come from a depthwise
convolution with a fixed one-hot kernel (a Conv with the static ``group = in_channels``; cheaper here than
``F.unfold``, whose export is a gather chain), then ``[B, groups, out/groups, k] @ [B, groups, k, L]``. Same
masks, same result up to float rounding; the grouped convolution stays the eager path (faster on the CPU:
about 650 ms vs 820 ms for 2048 rows of 32 -> 64 channels on 8x8, torch 2.13).

``from_linear`` / ``from_conv`` keep the trained weights, bias, stride, padding, dilation and groups (Baal's
patching re-initialises the layer instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import bernoulli_mask, check_probability, torch_function_visible

__all__ = [
    "DropConnectConv2d",
    "DropConnectLinear",
    "drop_connect_conv2d",
    "drop_connect_linear",
    "gaussian_nodes",
    "per_example_conv2d",
]

Inference = Literal["mean", "gaussian"]
Activation = nn.Module | Callable[[Tensor], Tensor] | str | None

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def _resolve_activation(activation: Activation) -> nn.Module | Callable[[Tensor], Tensor] | None:
    if activation is None or isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[activation]()
    if callable(activation):
        return activation
    raise TypeError(f"activation must be an nn.Module, a callable, a name or None, got {type(activation).__name__}")


def _check_inference(inference: str, gaussian_samples: int) -> None:
    if inference not in ("mean", "gaussian"):
        raise ValueError(f"inference must be 'mean' or 'gaussian', got {inference!r}")
    if isinstance(gaussian_samples, bool) or not isinstance(gaussian_samples, int) or gaussian_samples < 1:
        raise ValueError(f"gaussian_samples must be a positive integer, got {gaussian_samples!r}")


def gaussian_nodes(count: int, like: Tensor) -> Tensor:
    """``count`` stratified quantiles of N(0, 1), rescaled to mean 0 and mean square 1 (shape ``[count]``)."""
    levels = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    nodes = torch.special.ndtri(levels)
    if count > 1:
        nodes = nodes / nodes.square().mean().sqrt()
    return nodes.to(dtype=like.dtype, device=like.device)


def _apply(activation: Callable[[Tensor], Tensor] | None, u: Tensor) -> Tensor:
    return u if activation is None else activation(u)


def _moment_matched(mean: Tensor, var: Tensor, activation: Callable[[Tensor], Tensor] | None, samples: int) -> Tensor:
    """Average ``a(u)`` over Z quantile points of ``u ~ N(mean, var)`` (element-wise)."""
    if activation is None:
        return mean
    std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
    nodes = gaussian_nodes(samples, mean).view(-1, *([1] * mean.dim()))
    return activation(mean.unsqueeze(0) + std.unsqueeze(0) * nodes).mean(0)


@torch_function_visible
def drop_connect_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    p: float = 0.5,
    *,
    training: bool,
    per_example: bool = True,
    inference: Inference = "mean",
    gaussian_samples: int = 64,
    activation: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropConnect linear layer ``a((M * W) x + b)`` (train) / mean or Gaussian rule (eval).

    With ``per_example`` every row of ``x`` (all leading dimensions flattened) gets its own mask.
    """
    p = check_probability(p)
    _check_inference(inference, gaussian_samples)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be {weight.shape[1]}, got shape {tuple(x.shape)}")
    q = 1.0 - p
    if training:
        if p == 0.0:
            return _apply(activation, F.linear(x, weight, bias))
        if not per_example:
            mask = bernoulli_mask(weight.shape, q, weight, generator)
            return _apply(activation, F.linear(x, mask * weight, bias))
        out_f, in_f = weight.shape
        rows = x.reshape(-1, in_f)
        mask = bernoulli_mask((rows.shape[0], out_f, in_f), q, weight, generator)
        y = torch.bmm(mask * weight, rows.unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            y = y + bias
        return _apply(activation, y.reshape(*x.shape[:-1], out_f))
    mean = F.linear(x, weight * q, bias)
    if inference == "mean" or p in (0.0, 1.0):
        return _apply(activation, mean)
    var = (p * q) * F.linear(x * x, weight * weight)
    return _moment_matched(mean, var, activation, gaussian_samples)


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def per_example_conv2d(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    grouped: bool | None = None,
) -> Tensor:
    """Row ``n`` of ``x`` ``[N, C, H, W]`` convolved with its own filters ``filters[n]``.

    ``filters``: ``[N, O, C/groups, kh, kw]``. ``grouped=True``: one convolution with ``groups * N`` groups
    (batch folded into channels; ``group`` depends on N, so not exportable with a dynamic N).
    ``grouped=False``: im2col + batched matmul, every op static in N: the patches ``[N, C*kh*kw, H', W']``
    come from a depthwise convolution (``group = C``) with a one-hot kernel (output channel ``c*kh*kw + j``
    = input channel ``c`` at kernel offset ``j``, the flattening order of the filters), so stride, padding
    (numbers or ``"same"``/``"valid"``) and dilation are exactly those of ``F.conv2d``; then
    ``[N, groups, O/groups, C/groups*kh*kw] @ [N, groups, C/groups*kh*kw, H'*W']``.
    ``None`` (default): the matmul form while exporting, the grouped convolution otherwise.
    """
    if x.dim() != 4 or filters.dim() != 5 or filters.shape[0] != x.shape[0]:
        raise ValueError(
            "per_example_conv2d expects x [N, C, H, W] and filters [N, O, C/groups, kh, kw] with the same N, "
            f"got {tuple(x.shape)} and {tuple(filters.shape)}"
        )
    batch, channels, height, width = x.shape
    out_c, in_per_group, kh, kw = filters.shape[1:]
    if grouped is None:
        grouped = not _exporting()
    if grouped:
        y = F.conv2d(
            x.reshape(1, batch * channels, height, width),
            filters.reshape(batch * out_c, in_per_group, kh, kw),
            None, stride, padding, dilation, groups * batch,
        )  # fmt: skip
        y = y.reshape(batch, out_c, *y.shape[-2:])
    else:
        taps = kh * kw
        one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, kh, kw)
        patches = F.conv2d(x, one_hot.repeat(channels, 1, 1, 1), None, stride, padding, dilation, channels)
        out_h, out_w = patches.shape[-2:]
        k = in_per_group * taps
        cols = patches.reshape(batch, groups, k, out_h * out_w)
        y = torch.matmul(filters.reshape(batch, groups, out_c // groups, k), cols)
        y = y.reshape(batch, out_c, out_h, out_w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


@torch_function_visible
def drop_connect_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    p: float = 0.5,
    *,
    training: bool,
    per_example: bool = True,
    inference: Inference = "mean",
    gaussian_samples: int = 64,
    activation: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropConnect 2-D convolution on ``[B, C, H, W]`` or ``[C, H, W]``; per-sample masks if ``per_example``.

    Per-example masks use `per_example_conv2d`: one grouped convolution (the batch folded into the channel
    dimension, each sample's masked filters forming ``groups`` groups of their own), or, while exporting,
    im2col + batched matmul (an exportable form with a dynamic batch).
    """
    p = check_probability(p)
    _check_inference(inference, gaussian_samples)
    if x.dim() not in (3, 4):
        raise ValueError(f"drop_connect_conv2d expects [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    q = 1.0 - p

    def conv(inp: Tensor, w: Tensor, b: Tensor | None, g: int = groups) -> Tensor:
        return F.conv2d(inp, w, b, stride, padding, dilation, g)

    if training:
        if p == 0.0:
            y = conv(x, weight, bias)
        elif not per_example:
            y = conv(x, bernoulli_mask(weight.shape, q, weight, generator) * weight, bias)
        else:
            mask = bernoulli_mask((x.shape[0], *weight.shape), q, weight, generator)
            y = per_example_conv2d(x, mask * weight, bias, stride, padding, dilation, groups)
        y = _apply(activation, y)
    else:
        mean = conv(x, weight * q, bias)
        if inference == "mean" or p in (0.0, 1.0):
            y = _apply(activation, mean)
        else:
            var = (p * q) * conv(x * x, weight * weight, None)
            y = _moment_matched(mean, var, activation, gaussian_samples)
    return y.squeeze(0) if unbatched else y


_Layer = TypeVar("_Layer", bound=nn.Module)


def _copy_trained(layer: _Layer, source: nn.Linear | nn.Conv2d) -> _Layer:
    """Copy `source`'s trained weight, bias and train/eval mode into the freshly built `layer`."""
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, Tensor)
    with torch.no_grad():
        weight.copy_(source.weight)
        if source.bias is not None:
            assert isinstance(bias, Tensor)
            bias.copy_(source.bias)
    return layer.train(source.training)


class DropConnectLinear(nn.Module):
    """Linear layer with DropConnect on its weights (Wan 2013), activation included.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (same initialisation).
        p: drop probability of each weight.
        inference: eval rule, ``"mean"`` (``a((qW)x + b)``) or ``"gaussian"`` (moment matching).
        gaussian_samples: Z, the number of points averaged by the Gaussian rule.
        activation: ``nn.Module``, callable, name (``"relu"``, ``"tanh"``, ...) or None (identity).
        per_example: one mask per example (paper) or one per forward call.
        generator: optional ``torch.Generator`` used for every mask draw.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        p: float = 0.5,
        inference: Inference = "mean",
        gaussian_samples: int = 64,
        activation: Activation = None,
        per_example: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_inference(inference, gaussian_samples)
        reference = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = reference.weight
        self.bias = reference.bias
        self.p = check_probability(p)
        self.inference: Inference = inference
        self.gaussian_samples = gaussian_samples
        self.activation = _resolve_activation(activation)
        self.per_example = bool(per_example)
        self.generator = generator

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float = 0.5, **kwargs: object) -> DropConnectLinear:
        """A DropConnect layer carrying a copy of ``linear``'s trained weight and bias (and its mode)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            p=p,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,  # type: ignore[arg-type]
        )
        return _copy_trained(layer, linear)

    def forward(self, x: Tensor) -> Tensor:
        return drop_connect_linear(
            x,
            self.weight,
            self.bias,
            self.p,
            training=self.training,
            per_example=self.per_example,
            inference=self.inference,
            gaussian_samples=self.gaussian_samples,
            activation=self.activation,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"p={self.p}, inference={self.inference!r}, per_example={self.per_example}"
        )


class DropConnectConv2d(nn.Module):
    """2-D convolution with DropConnect on its filters (Wan 2013), activation included.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (zero padding only; same initialisation).
        p, inference, gaussian_samples, activation, per_example, generator: as ``DropConnectLinear``;
            per-example masks here are per sample of the batch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        p: float = 0.5,
        inference: Inference = "mean",
        gaussian_samples: int = 64,
        activation: Activation = None,
        per_example: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_inference(inference, gaussian_samples)
        reference = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = reference.kernel_size
        self.stride = reference.stride
        self.padding = reference.padding
        self.dilation = reference.dilation
        self.groups = groups
        self.weight = reference.weight
        self.bias = reference.bias
        self.p = check_probability(p)
        self.inference: Inference = inference
        self.gaussian_samples = gaussian_samples
        self.activation = _resolve_activation(activation)
        self.per_example = bool(per_example)
        self.generator = generator

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, p: float = 0.5, **kwargs: object) -> DropConnectConv2d:
        """A DropConnect layer with a copy of ``conv``'s weights, bias, stride, padding, dilation, groups."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            p=p,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,  # type: ignore[arg-type]
        )
        return _copy_trained(layer, conv)

    def forward(self, x: Tensor) -> Tensor:
        return drop_connect_conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.p,
            training=self.training,
            per_example=self.per_example,
            inference=self.inference,
            gaussian_samples=self.gaussian_samples,
            activation=self.activation,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, p={self.p}, inference={self.inference!r}, "
            f"per_example={self.per_example}"
        )
