"""Classic (non-inverted) dropout, Srivastava et al. 2014.

Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov, "Dropout: A Simple Way to Prevent Neural
Networks from Overfitting", JMLR 15 (2014). The paper writes p for the KEEP probability; here ``p`` is the
DROP probability and ``q = 1 - p`` (docs/DESIGN.md §2).

- train: ``m * x`` with ``m ~ Bernoulli(q)`` per element, no rescaling;
- eval: ``q * x`` (the "weight scaling" rule: the expectation of the training output);
- MC: as train (call ``.train()`` on the module).

Backward in train: ``dL/dx = m * dL/dy``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import bernoulli_mask, check_probability, torch_function_visible

__all__ = ["ClassicDropout", "classic_dropout"]


@torch_function_visible
def classic_dropout(x: Tensor, p: float = 0.5, *, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Non-inverted dropout: ``m * x`` when ``training`` (``m ~ Bernoulli(1 - p)``), else ``(1 - p) * x``."""
    p = check_probability(p)
    q = 1.0 - p
    if not training:
        return x * q
    if p == 0.0:
        return x
    return x * bernoulli_mask(x.shape, q, x, generator)


class ClassicDropout(nn.Module):
    """Srivastava 2014 dropout without rescaling: train ``m * x``, eval ``q * x``, MC as train.

    Args:
        p: drop probability of each element.
        generator: optional ``torch.Generator`` used for every mask draw (reproducible samples).
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.generator = generator

    @property
    def eval_scale(self) -> float:
        """The factor ``q = 1 - p`` applied in eval mode (what folding multiplies into an adjacent op)."""
        return 1.0 - self.p

    def forward(self, x: Tensor) -> Tensor:
        return classic_dropout(x, self.p, training=self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"
