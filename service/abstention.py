"""Acting on uncertainty: per-row abstention flags from an MC answer and a rule (score, threshold).

A request asks with ``abstain``: ``"auto"`` uses the rule `dropwise evaluate` stored in the package manifest
(``abstention``: the uncertainty score that separated OOD inputs best on the validation split, and the
threshold that keeps 95% of in-distribution validation inputs at T = ``num_samples``), a number is a
threshold on that stored score (on predictive entropy when the package was never evaluated). A row is
flagged when its score is above the threshold (selective prediction, Geifman & El-Yaniv 2017). The stored
threshold was set at the stored T; other T values shift the scores (mutual information most, see the
evaluation's convergence table).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dropwise.service.errors import InvalidInput
from dropwise.service.runtimes.base import PackageSpec

__all__ = ["DEFAULT_SCORE", "abstain_flags", "resolve_rule"]

DEFAULT_SCORE = "predictive_entropy"
_SCORES = ("max_probability", "predictive_entropy", "mutual_information", "variation_ratio")


def resolve_rule(spec: PackageSpec, abstain: Any, mode: str) -> tuple[str, float]:
    """(score, threshold) for a request's ``abstain`` value; raises `InvalidInput` naming ``abstain``."""
    if spec.task != "classification":
        raise InvalidInput("abstain applies to classification models only", field="abstain")
    if mode != "mc":
        raise InvalidInput("abstain needs MC dropout: add mode 'mc'", field="abstain")
    stored = spec.manifest.get("abstention") if isinstance(spec.manifest, dict) else None
    score = stored["score"] if isinstance(stored, dict) and stored.get("score") in _SCORES else DEFAULT_SCORE
    if isinstance(abstain, str):
        if abstain != "auto":
            raise InvalidInput(f"abstain must be 'auto' or a number, got {abstain!r}", field="abstain")
        if not isinstance(stored, dict) or not isinstance(stored.get("threshold"), int | float):
            raise InvalidInput(
                f"model {spec.name!r} has no stored abstention rule: run `dropwise evaluate` on its package, "
                "or give a threshold",
                field="abstain",
            )
        return score, float(stored["threshold"])
    if isinstance(abstain, bool) or not isinstance(abstain, int | float) or not np.isfinite(abstain):
        raise InvalidInput(f"abstain must be 'auto' or a finite number, got {abstain!r}", field="abstain")
    return score, float(abstain)


def abstain_flags(outputs: dict[str, np.ndarray], score: str, threshold: float) -> np.ndarray:
    """Bool ``[B]``: True where the row's ``score`` exceeds ``threshold``."""
    if score == "max_probability":
        values = 1.0 - np.asarray(outputs["probabilities"]).max(axis=1)
    else:
        values = np.asarray(outputs[score])
    return values > threshold
