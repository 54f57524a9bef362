"""Join layer of FractalNet with local and global drop-path, Larsson et al. 2017.

Larsson, Maire, Shakhnarovich, "FractalNet: Ultra-Deep Neural Networks without Residuals", ICLR 2017.
A join merges the outputs of several columns by their element-wise mean.

- train, local drop-path: each input is dropped independently with probability ``p`` for each sample; at
  least one input survives per sample (if a sample would lose all, one input chosen uniformly at random is
  kept); the output is the mean of the surviving inputs;
- train, global drop-path: ``forward(inputs, column=c)`` uses only the input of column ``c`` (the network
  draws ``c`` once per mini-batch and passes it to every join);
- eval: mean of all inputs (``column``, if given, still selects that single column: the paper evaluates
  single columns this way);
- MC: local drop-path as train.

The expectation of the local join equals the mean of the inputs: the mask distribution is exchangeable
across inputs, so each input carries weight ``1/n`` on average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import bernoulli_mask, check_probability, torch_function_visible

__all__ = ["FractalJoin", "fractal_join"]


def _check_inputs(inputs: Sequence[Tensor], n_inputs: int | None) -> torch.Size:
    if isinstance(inputs, Tensor) or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty sequence of tensors")
    if n_inputs is not None and len(inputs) != n_inputs:
        raise ValueError(f"expected {n_inputs} inputs, got {len(inputs)}")
    shape = inputs[0].shape
    for i, t in enumerate(inputs):
        if t.shape != shape:
            raise ValueError(
                f"all join inputs must share one shape; input 0 {tuple(shape)}, input {i} {tuple(t.shape)}"
            )
    return shape


@torch_function_visible
def fractal_join(
    inputs: Sequence[Tensor],
    p: float = 0.15,
    *,
    training: bool,
    column: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean of ``inputs`` with FractalNet local drop-path (train, >= 1 survivor per sample) or one column."""
    p = check_probability(p)
    shape = _check_inputs(inputs, None)
    n = len(inputs)
    if column is not None:
        if isinstance(column, bool) or not isinstance(column, int) or not 0 <= column < n:
            raise ValueError(f"column must be an integer in [0, {n}), got {column!r}")
        return inputs[column]
    stacked = torch.stack(list(inputs))  # [n, B, ...]
    if not training or p == 0.0 or n == 1:
        return stacked.mean(0)
    if len(shape) == 0:
        raise ValueError("local drop-path needs a batch dimension")
    batch = shape[0]
    keep = bernoulli_mask((n, batch), 1.0 - p, stacked, generator)
    # A sample that lost every input keeps one chosen uniformly. Drawn for every sample (no data-dependent
    # branch: no host sync on GPUs, traceable for export); used only where needed.
    dead = keep.sum(0) == 0
    pick = torch.randint(n, (batch,), generator=generator, device=stacked.device)
    rescue = torch.nn.functional.one_hot(pick, n).T.to(keep.dtype)
    keep = torch.where(dead.unsqueeze(0), rescue, keep)
    weights = keep / keep.sum(0, keepdim=True)  # [n, B], columns sum to 1
    weights = weights.view(n, batch, *([1] * (len(shape) - 1)))
    return (stacked * weights).sum(0)


class FractalJoin(nn.Module):
    """FractalNet join: element-wise mean of ``n_inputs`` column outputs with drop-path.

    Args:
        n_inputs: number of inputs the join receives.
        p: local drop-path probability of each input (per sample); at least one input is kept.
        generator: optional ``torch.Generator`` used for every draw.

    ``forward(inputs, column=None)``: ``column`` selects a single input (global drop-path).
    """

    def __init__(self, n_inputs: int, *, p: float = 0.15, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
            raise ValueError(f"n_inputs must be a positive integer, got {n_inputs!r}")
        self.n_inputs = n_inputs
        self.p = check_probability(p)
        self.generator = generator

    def forward(self, inputs: Sequence[Tensor], column: int | None = None) -> Tensor:
        _check_inputs(inputs, self.n_inputs)
        return fractal_join(inputs, self.p, training=self.training, column=column, generator=self.generator)

    def extra_repr(self) -> str:
        return f"n_inputs={self.n_inputs}, p={self.p}"
