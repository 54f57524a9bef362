"""Spatial dropout on embeddings (Keras ``SpatialDropout1D`` semantics).

Tompson, Goroshin, Jain, LeCun, Bregler, "Efficient Object Localization Using Convolutional Networks",
CVPR 2015 (spatial dropout: drop whole feature maps because neighbouring activations are correlated);
applied to token embeddings as in Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in
Recurrent Neural Networks", NeurIPS 2016 (one mask per sequence, shared across time steps).

For an input ``[B, L, E]`` one Bernoulli(q) draw per (sample, embedding dimension) is shared by all ``L``
positions: mask shape ``[B, 1, E]``, output ``x * mask / q``.

- train: ``x * m / q``, ``m ~ Bernoulli(q)`` of shape ``[B, 1, E]``;
- eval: ``x``;
- MC: as train.

Note: ``torch.nn.Dropout1d`` on ``[B, L, E]`` treats ``L`` as channels and drops whole tokens, which is
not this layer; ``nn.Dropout1d/2d/3d`` are used as they are for channel dropout on conv feature maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import bernoulli_mask, check_probability, torch_function_visible

__all__ = ["EmbeddingDropout", "embedding_dropout"]


@torch_function_visible
def embedding_dropout(x: Tensor, p: float = 0.5, *, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Drop embedding dimensions of ``x: [B, L, E]`` shared across the ``L`` positions, rescale by ``1/q``."""
    p = check_probability(p)
    if x.dim() != 3:
        raise ValueError(f"embedding_dropout expects [batch, length, embedding], got shape {tuple(x.shape)}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    q = 1.0 - p
    mask = bernoulli_mask((x.shape[0], 1, x.shape[2]), q, x, generator)
    return x * (mask / q)


class EmbeddingDropout(nn.Module):
    """Drop whole embedding dimensions per sequence: mask ``[B, 1, E] / q``; eval ``x``; MC as train.

    Args:
        p: probability of dropping one embedding dimension of one sample (for all its positions).
        generator: optional ``torch.Generator`` used for every mask draw.
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        return embedding_dropout(x, self.p, training=self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"
