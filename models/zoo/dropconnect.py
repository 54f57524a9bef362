"""DropConnect networks (Wan et al. 2013, "Regularization of neural networks using DropConnect").

Each weight is dropped independently (train: ``a((M*W)v + b)`` with a fresh mask per example; eval: the mean
rule ``a((qW)v + b)``, or Gaussian moment matching with ``inference="gaussian"``; MC: sample ``M`` as in
training). The activation lives inside the DropConnect layer so the Gaussian rule can average it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from dropwise.models.layers import DropConnectConv2d, DropConnectLinear
from torch import nn


def dropconnect_mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    p: float = 0.5,
    inference: Literal["mean", "gaussian"] = "mean",
) -> nn.Sequential:
    """MLP of ``DropConnectLinear`` hidden layers (ReLU inside each) and a plain ``Linear`` output.

    Input ``[B, in_features]`` float, output ``[B, out_features]`` logits.
    """
    if not hidden:
        raise ValueError("hidden must list at least one layer width")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(DropConnectLinear(width, h, p=p, inference=inference, activation="relu"))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def dropconnect_cnn(
    image_shape: Sequence[int] = (1, 8, 8),
    channels: Sequence[int] = (16, 32),
    out_features: int = 10,
    p: float = 0.2,
    inference: Literal["mean", "gaussian"] = "mean",
) -> nn.Sequential:
    """Small CNN of ``DropConnectConv2d`` layers (3x3, ReLU inside) for flat image input.

    Input ``[B, C*H*W]`` float (unflattened to ``image_shape``); one 2x2 max-pooling after the last conv;
    output ``[B, out_features]`` logits.
    """
    c, h, w = (int(v) for v in image_shape)
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    width = c
    for out_c in channels:
        layers.append(DropConnectConv2d(width, out_c, 3, padding=1, p=p, inference=inference, activation="relu"))
        width = out_c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * (h // 2) * (w // 2), out_features)]
    return nn.Sequential(*layers)
