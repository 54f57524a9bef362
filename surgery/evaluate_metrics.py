"""Scores of predictive uncertainty: calibration, proper scoring rules, OOD detection, selective prediction.

Pure numpy (and scikit-learn's ROC routines) over arrays of predictions; `dropwise.surgery.evaluate` runs the
model and calls these.

* NLL and the Brier score are proper scoring rules (Gneiting & Raftery 2007); the Brier score here is the
  multi-class form ``mean_i sum_k (p_ik - y_ik)^2`` (Brier 1950).
* ECE: expected calibration error with equal-width confidence bins (15 by default, Guo et al. 2017,
  "On Calibration of Modern Neural Networks"): ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.
* Temperature scaling (Guo et al. 2017): one scalar ``tau > 0`` dividing the logits, fitted by minimising
  the validation NLL (it never changes the argmax, so accuracy is unchanged).
* OOD detection: AUROC and the false-positive rate at 95% true-positive rate (Hendrycks & Gimpel 2017),
  OOD = positive class, larger score = more uncertain.
* Risk-coverage (Geifman & El-Yaniv 2017): accuracy on the most confident fraction of inputs when the most
  uncertain ones are abstained on; AURC = the mean risk (error rate) over the coverage levels.
* Regression: RMSE, Gaussian NLL of ``N(mean, var)``, and the coverage of central Gaussian intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "accuracy",
    "brier",
    "ece",
    "fit_temperature",
    "gaussian_interval_coverage",
    "gaussian_nll",
    "nll",
    "ood_scores",
    "reliability",
    "risk_coverage",
]

_EPS = 1e-12


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose most probable class is ``y``."""
    return float((probs.argmax(axis=1) == y).mean())


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (nats), probabilities floored at 1e-12."""
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], _EPS, None)).mean())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - 1[y_i = k])^2`` (0 best, 2 worst)."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(float(n))
        out["confidence"].append(float(conf[mask].mean()) if n else float("nan"))
        out["accuracy"].append(float(correct[mask].mean()) if n else float("nan"))
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins (Guo et al. 2017)."""
    table = reliability(probs, y, bins)
    total = float(len(y))
    gap = 0.0
    for conf, acc, n in zip(table["confidence"], table["accuracy"], table["count"], strict=True):
        if n:
            gap += n / total * abs(acc - conf)
    return float(gap)


def fit_temperature(log_probs_of: Callable[[float], np.ndarray], y: np.ndarray) -> float:
    """The temperature minimising the NLL of ``log_probs_of(tau)`` (log-probabilities [N, K]) on labels ``y``.

    Searched over log tau in [log 0.05, log 20] (bounded Brent), so the fit cannot run away.
    """

    def loss(log_tau: float) -> float:
        logp = log_probs_of(math.exp(log_tau))
        return float(-logp[np.arange(len(y)), y].mean())

    result = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def tempered_softmax(logits: np.ndarray, tau: float) -> np.ndarray:
    """``log softmax(z / tau)`` over the last axis."""
    return log_softmax(logits / tau, axis=-1)


def tempered_mc_logits(sample_logits: np.ndarray, tau: float) -> np.ndarray:
    """Per-sample scaling: ``log mean_t softmax(z_t / tau)`` for per-sample logits ``[T, N, K]``."""
    return logsumexp(log_softmax(sample_logits / tau, axis=-1), axis=0) - math.log(sample_logits.shape[0])


def tempered_mc_mean(mean_probs: np.ndarray, tau: float) -> np.ndarray:
    """Scaling of the MC mean: ``log softmax(log p_bar / tau)`` for MC mean probabilities ``[N, K]``."""
    return log_softmax(np.log(np.clip(mean_probs, _EPS, None)) / tau, axis=-1)


def ood_scores(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """AUROC and FPR at 95% TPR of separating OOD (positive) from in-distribution by an uncertainty score."""
    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    auroc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr95 = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    return {"auroc": auroc, "fpr_at_95_tpr": fpr95}


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray, points: int = 20) -> dict[str, object]:
    """Accuracy when keeping the ``c`` least uncertain fraction, for c on a grid, and the AURC.

    AURC is the mean error rate over every coverage level 1/N, 2/N, ..., 1 (lower is better).
    """
    order = np.argsort(uncertainty, kind="stable")
    hits = correct[order].astype(np.float64)
    kept = np.arange(1, len(hits) + 1)
    acc_at = np.cumsum(hits) / kept
    aurc = float((1.0 - acc_at).mean())
    grid = np.linspace(1.0 / points, 1.0, points)
    idx = np.clip(np.ceil(grid * len(hits)).astype(int) - 1, 0, len(hits) - 1)
    return {"coverage": grid.tolist(), "accuracy": acc_at[idx].tolist(), "aurc": aurc}


def gaussian_nll(mean: np.ndarray, var: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of ``y`` under ``N(mean, var)`` (per output, averaged)."""
    var = np.clip(var, _EPS, None)
    return float((0.5 * np.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var).mean())


def gaussian_interval_coverage(mean: np.ndarray, std: np.ndarray, y: np.ndarray, level: float) -> float:
    """Fraction of ``y`` inside the central ``level`` interval of ``N(mean, std^2)``."""
    half = norm.ppf(0.5 + level / 2.0) * std
    return float((np.abs(y - mean) <= half).mean())
