"""A FractalNet-style network (Larsson et al. 2017, "FractalNet: ultra-deep neural networks without
residuals").

A fractal block with ``C`` columns follows ``f_1(z) = conv(z)`` and
``f_C(z) = join(f_{C-1}(f_{C-1}(z)), conv(z))``; consecutive joins are merged so that the block ends in one
``FractalJoin`` over its ``C`` columns (column ``c`` holds ``2**c`` conv units). Drop-path:

- train, local (a fraction ``1 - global_fraction`` of mini-batches): every join drops each input with
  probability ``p`` per sample, keeping at least one; the join is the mean of the survivors;
- train, global (the other mini-batches): one column, drawn per mini-batch, is used in the whole network;
- eval: every join is the mean of all its inputs;
- MC: the joins are switched to training mode on their own, so local drop-path samples as in training
  (global selection is a training-only device drawn by the network, which stays in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from dropwise.models.layers import FractalJoin
from torch import Tensor, nn


def _conv_unit(in_c: int, out_c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_c, out_c, 3, padding=1, bias=False), nn.BatchNorm2d(out_c), nn.ReLU())


def _inner(column: int | None) -> int | None:
    """Column index inside the nested sub-fractal (columns 1.. of this one), None when not in it."""
    return None if column is None or column < 1 else column - 1


class FractalPath(nn.Module):
    """The ``C`` column outputs of ``f_C`` before its final join, shallowest (one conv) first."""

    def __init__(self, columns: int, in_c: int, out_c: int, p: float) -> None:
        super().__init__()
        self.columns = columns
        self.shallow = _conv_unit(in_c, out_c)
        if columns > 1:
            self.first = FractalBlock(columns - 1, in_c, out_c, p)
            self.second = FractalPath(columns - 1, out_c, out_c, p)

    def forward(self, x: Tensor, column: int | None = None) -> list[Tensor]:
        outs = [self.shallow(x)]
        if self.columns > 1:
            inner = _inner(column)
            outs += self.second(self.first(x, inner), inner)
        return outs


class FractalBlock(nn.Module):
    """``f_C`` with its final ``FractalJoin`` over ``C`` columns (none for ``C = 1``)."""

    def __init__(self, columns: int, in_c: int, out_c: int, p: float) -> None:
        super().__init__()
        if columns < 1:
            raise ValueError(f"columns must be >= 1, got {columns}")
        self.path = FractalPath(columns, in_c, out_c, p)
        self.join = FractalJoin(columns, p=p) if columns > 1 else None

    def forward(self, x: Tensor, column: int | None = None) -> Tensor:
        outs = self.path(x, column)
        if self.join is None:  # f_1 is a single conv unit: nothing to join
            return outs[0]
        return self.join(outs, column)


class FractalNet(nn.Module):
    """Fractal blocks separated by 2x2 max-pooling, then global average pooling and a linear classifier.

    Input ``[B, in_channels, H, W]``, output ``[B, out_features]`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32),
        columns: int = 3,
        out_features: int = 10,
        p_local: float = 0.15,
        global_fraction: float = 0.5,
        stem_pool: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= global_fraction <= 1.0:
            raise ValueError(f"global_fraction must be in [0, 1], got {global_fraction}")
        self.columns = columns
        self.global_fraction = float(global_fraction)
        self.pool_in = nn.MaxPool2d(2) if stem_pool else nn.Identity()
        blocks = []
        width = in_channels
        for out_c in widths:
            blocks.append(FractalBlock(columns, width, out_c, p_local))
            width = out_c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_features))

    def _draw_column(self) -> int | None:
        """Global drop-path for this mini-batch: a column index, or None for local drop-path."""
        if float(torch.rand(())) < self.global_fraction:
            return int(torch.randint(self.columns, ()))
        return None

    def forward(self, x: Tensor) -> Tensor:
        column = self._draw_column() if self.training else None
        x = self.pool_in(x)
        for i, block in enumerate(self.blocks):
            x = block(x, column)
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        return self.head(x)


def fractalnet(**kwargs: object) -> FractalNet:
    """Factory for :class:`FractalNet` (keyword arguments as its constructor)."""
    return FractalNet(**kwargs)  # type: ignore[arg-type]
