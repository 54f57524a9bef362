"""Drop path / stochastic depth on a residual branch, Huang et al. 2016.

Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016. The layer is applied
to the OUTPUT OF A RESIDUAL BRANCH ``f(x)``; the block computes ``x + drop_path(f(x))``.

Two forms, chosen by ``scale_by_keep``:

- ``scale_by_keep=True`` (timm's form): train ``g * f(x) / q`` with one gate ``g ~ Bernoulli(q)`` per
  sample; eval ``f(x)``; MC as train.
- ``scale_by_keep=False`` (Huang's classic form): train ``g * f(x)`` with ONE gate per mini-batch; eval
  ``q * f(x)`` (the expected contribution, the paper's test-time rule); MC as train.

``linear_decay`` is Huang's rule for the survival probabilities through depth, written for drop
probabilities: ``p_l = l / L * p_L`` for blocks ``l = 1 .. L``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import bernoulli_mask, check_probability, torch_function_visible

__all__ = ["DropPath", "drop_path", "linear_decay"]


@torch_function_visible
def drop_path(
    x: Tensor,
    p: float = 0.0,
    *,
    training: bool,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gate a residual branch output ``x``: per-sample gate ``/q`` (timm) or one gate per batch (Huang).

    Eval returns ``x`` (``scale_by_keep=True``) or ``q * x`` (``scale_by_keep=False``).
    """
    p = check_probability(p)
    q = 1.0 - p
    if not training:
        return x if scale_by_keep else x * q
    if p == 0.0:
        return x
    if not scale_by_keep:
        return x * bernoulli_mask((), q, x, generator)
    if x.dim() == 0:
        raise ValueError("drop_path with scale_by_keep=True needs a batch dimension")
    if p == 1.0:
        return x * 0.0
    gate = bernoulli_mask((x.shape[0],) + (1,) * (x.dim() - 1), q, x, generator)
    return x * (gate / q)


def linear_decay(p_last: float, depth: int) -> list[float]:
    """Huang 2016 linear decay rule: drop probability ``l / depth * p_last`` of block ``l = 1 .. depth``."""
    p_last = check_probability(p_last, "p_last")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    return [p_last * layer / depth for layer in range(1, depth + 1)]


class DropPath(nn.Module):
    """Stochastic depth gate for a residual branch (apply to ``f(x)``, then add the shortcut).

    Args:
        p: probability of dropping the branch.
        scale_by_keep: ``True``: timm's per-sample gate scaled by ``1/q``, eval identity.
            ``False``: Huang's one gate per mini-batch, eval multiplies by ``q``.
        generator: optional ``torch.Generator`` used for every gate draw.
    """

    def __init__(self, p: float = 0.0, *, scale_by_keep: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.scale_by_keep = bool(scale_by_keep)
        self.generator = generator

    @property
    def eval_scale(self) -> float:
        """Factor applied in eval mode: 1 for timm's form, ``q`` for Huang's classic form."""
        return 1.0 if self.scale_by_keep else 1.0 - self.p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, training=self.training, scale_by_keep=self.scale_by_keep, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale_by_keep={self.scale_by_keep}"
