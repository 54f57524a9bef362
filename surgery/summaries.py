"""Monte-Carlo dropout summaries (docs/DESIGN.md §3), one torch implementation for every runtime.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation") approximates the posterior
predictive by averaging T stochastic forward passes. From the per-sample outputs this module computes:

classification, from per-sample logits ``[T, B, K]``:

* ``probabilities``      p_bar = mean_t softmax(z_t)                              ``[B, K]``
* ``predictive_entropy`` H = -sum_k p_bar log p_bar (total uncertainty, nats)     ``[B]``
* ``expected_entropy``   E = mean_t H(softmax(z_t)) (aleatoric part)              ``[B]``
* ``mutual_information`` MI = H - E, BALD (Houlsby et al. 2011), clamped at 0      ``[B]``
* ``variation_ratio``    1 - f_mode / T, f_mode = votes of the most voted class   ``[B]``
* ``std``                per-class standard deviation of softmax(z_t) over t       ``[B, K]``

regression, from per-sample outputs ``[T, B, D]``: ``mean`` and ``std`` ``[B, D]``.

The names, dtypes and shapes are those of the output table `dropwise.surgery.outputs` (``probabilities`` was
called ``mean_probs`` before; the attribute stays readable under that name).

Everything is computed in log space (``log_softmax`` and ``logsumexp`` over samples), so a logit of any
size gives finite values (NaN logits count as 0, infinite ones as the largest finite value): ``0 * log 0``
never appears because entropies are written as
``-sum p * log p`` with ``log p`` finite. Standard deviations are population standard deviations
(divisor T, not T - 1), so T = 1 gives 0 rather than NaN. Only plain tensor operations are used, so the
functions export to ONNX with ``torch.onnx.export`` (the MC graph of ``dropwise.surgery.mc_export`` embeds them) and
serve the torch runtime unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .outputs import summary_names

CLASSIFICATION_OUTPUTS: tuple[str, ...] = summary_names("classification")
"""Names (and order) of the classification summaries, shared by the torch runtime and the MC ONNX graph."""

REGRESSION_OUTPUTS: tuple[str, ...] = summary_names("regression")
"""Names (and order) of the regression summaries."""


@dataclass(frozen=True)
class ClassificationSummaries:
    """MC classification summaries for a batch of B inputs over K classes (see module docstring)."""

    probabilities: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variation_ratio: Tensor
    std: Tensor

    @property
    def mean_probs(self) -> Tensor:
        """Deprecated spelling of `probabilities` (kept for callers written before the output table)."""
        return self.probabilities

    def as_tuple(self) -> tuple[Tensor, ...]:
        """The tensors in the order of `CLASSIFICATION_OUTPUTS`."""
        return tuple(getattr(self, name) for name in CLASSIFICATION_OUTPUTS)


@dataclass(frozen=True)
class RegressionSummaries:
    """MC regression summaries: predictive mean and standard deviation over the T samples, ``[B, D]``."""

    mean: Tensor
    std: Tensor

    def as_tuple(self) -> tuple[Tensor, ...]:
        """The tensors in the order of `REGRESSION_OUTPUTS`."""
        return (self.mean, self.std)


def _entropy_from_log(logp: Tensor) -> Tensor:
    """Entropy ``-sum_k p log p`` over the last axis from finite log-probabilities (never NaN)."""
    return -(logp.exp() * logp).sum(dim=-1)


def classification_summaries(logits: Tensor) -> ClassificationSummaries:
    """Summaries of T stochastic passes from per-sample logits ``[T, B, K]`` (Gal & Ghahramani 2016).

    Mutual information is the BALD score of Houlsby et al. (2011), ``H[p_bar] - mean_t H[p_t]``, clamped at
    0 because the two terms are computed separately and can differ by rounding. Computation is in float32 at
    least (half-precision logits are upcast). Exportable to ONNX.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected per-sample logits [T, B, K], got shape {tuple(logits.shape)}")
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    # Non-finite logits are mapped to finite ones (NaN -> 0, +-inf -> +-max) and log-probabilities are
    # floored at the dtype's lowest finite value, so p * log p is 0 * finite, never 0 * -inf.
    lowest = torch.finfo(z.dtype).min
    z = torch.nan_to_num(z)
    logp = torch.log_softmax(z, dim=-1).clamp(min=lowest)  # [T, B, K]
    probs = logp.exp()
    # log T from the data itself (a [1, 1, 1] count), so a run-time T exports as a graph value.
    log_t = torch.ones_like(logp[:, :1, :1]).sum(dim=0).log()
    log_mean = torch.logsumexp(logp, dim=0) - log_t
    # logsumexp minus log T can exceed 0 by rounding; keep log p_bar <= 0 so p_bar stays a distribution.
    log_mean = torch.clamp(log_mean, max=0.0)
    mean_probs = log_mean.exp()
    predictive = _entropy_from_log(log_mean)
    expected = _entropy_from_log(logp).mean(dim=0)
    mutual = torch.clamp(predictive - expected, min=0.0)
    n_classes = z.shape[-1]
    votes = torch.argmax(z, dim=-1)  # [T, B]
    classes = torch.arange(n_classes, device=z.device)
    freq = (votes.unsqueeze(-1) == classes).to(z.dtype).mean(dim=0)  # [B, K] vote frequencies
    variation = 1.0 - freq.max(dim=-1).values
    std = (probs - mean_probs.unsqueeze(0)).square().mean(dim=0).sqrt()
    return ClassificationSummaries(mean_probs, predictive, expected, mutual, variation, std)


def regression_summaries(outputs: Tensor) -> RegressionSummaries:
    """Predictive mean and (population) standard deviation over T samples of outputs ``[T, B, D]``.

    The std is the MC-dropout epistemic spread (Gal & Ghahramani 2016, eq. 8 without the 1/tau term: add
    the model-precision term downstream when it is known). Exportable to ONNX.
    """
    if outputs.dim() != 3:
        raise ValueError(f"expected per-sample outputs [T, B, D], got shape {tuple(outputs.shape)}")
    y = outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()
    mean = y.mean(dim=0)
    std = (y - mean.unsqueeze(0)).square().mean(dim=0).sqrt()
    return RegressionSummaries(mean, std)


class SummaryHead(torch.nn.Module):
    """Module form for export: per-sample outputs ``[T, B, K]`` -> tuple of summaries (task-dependent).

    ``task`` is ``"classification"`` (outputs in `CLASSIFICATION_OUTPUTS` order) or ``"regression"``
    (`REGRESSION_OUTPUTS` order).
    """

    def __init__(self, task: str = "classification") -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', not {task!r}")
        self.task = task

    def forward(self, samples: Tensor) -> tuple[Tensor, ...]:
        """Summaries of ``samples`` as a tuple (see class docstring)."""
        if self.task == "classification":
            return classification_summaries(samples).as_tuple()
        return regression_summaries(samples).as_tuple()
