"""Cutout data augmentation, DeVries & Taylor 2017.

DeVries, Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", arXiv:1708.04552
(2017). A square of side ``size`` whose centre is drawn uniformly over the WHOLE image (so the square may be
clipped at the border, as in the paper) is filled with ``fill`` (0 after normalisation in the paper);
``n_holes`` squares per image, the whole augmentation applied to each image with probability ``p``.

This is an input transform, not a layer of the network: the module applies it when ``self.training`` and
returns the input unchanged in eval mode; it takes no part in Monte-Carlo inference or folding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_generator, check_probability

__all__ = ["Cutout", "cutout"]


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def cutout(
    x: Tensor,
    size: int,
    n_holes: int = 1,
    p: float = 1.0,
    fill: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return a copy of ``x`` (``[C, H, W]`` or ``[B, C, H, W]``) with ``n_holes`` clipped squares filled.

    Each image independently gets the holes with probability ``p``; holes cover all channels.
    """
    _check_int(size, "size", 1)
    _check_int(n_holes, "n_holes", 1)
    p = check_probability(p)
    if x.dim() not in (3, 4):
        raise ValueError(f"cutout expects [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
    check_generator(generator, x.device)
    batched = x.dim() == 4
    images = x if batched else x.unsqueeze(0)
    b, _, h, w = images.shape
    dev = images.device
    cy = torch.randint(h, (b, n_holes, 1), generator=generator, device=dev)
    cx = torch.randint(w, (b, n_holes, 1), generator=generator, device=dev)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= top) & (rows < top + size)  # [B, n, H]; out-of-range rows simply never match
    in_cols = (cols >= left) & (cols < left + size)  # [B, n, W]
    holes = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).any(1)  # [B, H, W]
    if p < 1.0:
        apply = torch.rand(b, generator=generator, device=dev) < p
        holes = holes & apply.view(b, 1, 1)
    out = images.masked_fill(holes.unsqueeze(1), fill)
    return out if batched else out.squeeze(0)


class Cutout(nn.Module):
    """Cutout transform (DeVries 2017): ``n_holes`` squares of side ``size``, centres anywhere (clipped).

    Args:
        size: side of each square in pixels.
        n_holes: squares per image.
        p: probability of applying the augmentation to an image.
        fill: value written into the squares.
        generator: optional ``torch.Generator`` used for every draw.

    Applied when ``self.training``; identity in eval mode.
    """

    def __init__(
        self,
        size: int,
        n_holes: int = 1,
        p: float = 1.0,
        fill: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.size = _check_int(size, "size", 1)
        self.n_holes = _check_int(n_holes, "n_holes", 1)
        self.p = check_probability(p)
        self.fill = float(fill)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return cutout(x, self.size, self.n_holes, self.p, self.fill, generator=self.generator)

    def extra_repr(self) -> str:
        return f"size={self.size}, n_holes={self.n_holes}, p={self.p}, fill={self.fill}"
