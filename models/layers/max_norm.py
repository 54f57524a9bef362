"""Max-norm constraint, Srivastava et al. 2014 (section 5.1).

Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov, "Dropout: A Simple Way to Prevent Neural
Networks from Overfitting", JMLR 15 (2014): after each optimiser step the incoming weight vector of every
hidden unit is projected onto the ball ``||w||_2 <= c`` (c about 3-4).

The incoming weight vector of a unit is a row of a ``Linear`` weight ``[out, in]`` and one output filter
``weight[o]`` of a ``Conv1d/2d/3d`` (``[out, in/groups, *kernel]``), i.e. slice ``o`` along dim 0. Biases
are not constrained. Not a layer: no train / eval / MC behaviour; it changes parameters in place, without
autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .drop_connect import DropConnectConv2d, DropConnectLinear

__all__ = ["MaxNorm", "max_norm_"]

CONSTRAINED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    DropConnectLinear,
    DropConnectConv2d,
)


def _check_radius(max_norm: float) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a positive float, got {type(max_norm).__name__}")
    value = float(max_norm)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"max_norm must be a positive finite float, got {max_norm}")
    return value


@torch.no_grad()
def max_norm_(module: nn.Module, max_norm: float = 3.0) -> nn.Module:
    """Project, in place, each unit's incoming weight vector of ``module`` and its submodules onto
    ``||w||_2 <= max_norm`` (Linear, Conv1d/2d/3d and DropConnect layers). Returns ``module``."""
    radius = _check_radius(max_norm)
    if not isinstance(module, nn.Module):
        raise TypeError(f"max_norm_ expects an nn.Module, got {type(module).__name__}")
    for sub in module.modules():
        if isinstance(sub, CONSTRAINED_TYPES):
            # renorm_ rescales each slice along dim 0 whose 2-norm exceeds the radius, leaves the others
            weight = sub.weight
            assert isinstance(weight, torch.Tensor)
            weight.renorm_(2, 0, radius)
    return module


class MaxNorm:
    """A max-norm constraint bound to a model: call it after each optimiser step, or ``attach`` it.

    Example::

        constraint = MaxNorm(model, max_norm=3.0)
        handle = constraint.attach(optimizer)  # projects after every optimizer.step()
    """

    def __init__(self, module: nn.Module, max_norm: float = 3.0) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"MaxNorm expects an nn.Module, got {type(module).__name__}")
        self.module = module
        self.max_norm = _check_radius(max_norm)

    def __call__(self) -> None:
        max_norm_(self.module, self.max_norm)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run the projection after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self())

    def __repr__(self) -> str:
        return f"MaxNorm(max_norm={self.max_norm})"
