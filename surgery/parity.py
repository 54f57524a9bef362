"""Parity checks between torch and ONNX Runtime, and the report written as ``parity.json`` into a package.

Deterministic parity compares outputs element-wise: the maximum absolute difference divided by the output
scale, ``max(1, max |reference|)``, must not exceed the tolerance (1e-5 by default). This is the same bound as
a plain absolute tolerance for outputs of magnitude up to 1 and a relative one for larger outputs (logits).

Monte-Carlo parity compares two independent MC estimates (torch and the ONNX MC graph) with a two-sample
z-test per output element: ``z = (m_a - m_b) / sqrt(s_a^2 / T_a + s_b^2 / T_b)`` with the per-sample standard
deviations ``s``. The threshold is Bonferroni-corrected over all elements, so the whole test has a false-alarm
probability of at most ``alpha``. A small floor on the standard error keeps elements that are constant in both
estimates (saturated probabilities) from dividing by zero; they must then agree to that floor. The MC graph
must also be stochastic: non-zero spread within a run, and different results between runs and sessions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

PARITY_FILE = "parity.json"
DEFAULT_TOLERANCE = 1e-5
DEFAULT_ALPHA = 1e-3
DEFAULT_SE_FLOOR = 1e-5
SPREAD_RATIO = 3.0


@dataclass(frozen=True)
class Comparison:
    """One deterministic comparison (e.g. torch eval vs ONNX) over several batch sizes."""

    name: str
    max_abs: float
    scale: float
    relative: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    passed: bool


@dataclass(frozen=True)
class ZTest:
    """Bonferroni-corrected two-sample z-test of two MC estimates of the same means."""

    quantity: str
    z_max: float
    threshold: float
    n_tests: int
    alpha: float
    se_floor: float
    passed: bool


@dataclass(frozen=True)
class MCParity:
    """Torch MC vs ONNX MC: the z-test and the checks that the ONNX MC graph is stochastic."""

    samples: int
    batch: int
    z_test: ZTest
    std_within_run: float
    runs_differ: bool
    sessions_differ: bool
    mean_std_torch: float
    mean_std_onnx: float
    spread_ok: bool
    passed: bool


@dataclass
class ParityReport:
    """Everything measured while converting one package; serialised as ``parity.json``."""

    name: str
    version: int
    task: str
    tolerance: float
    deterministic: list[Comparison] = field(default_factory=list)
    mc: MCParity | None = None
    mc_error: str | None = None
    providers: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """Per step: ``seconds`` is wall time, ``cpu_seconds`` the process's CPU time (user + system)."""

    @property
    def passed(self) -> bool:
        """True when every deterministic comparison and the MC check (when run) passed."""
        return (
            all(c.passed for c in self.deterministic) and self.mc_error is None and (self.mc is None or self.mc.passed)
        )

    def failures(self) -> list[str]:
        """One short sentence per failed check (empty when everything passed)."""
        out = [
            f"{c.name}: max abs diff {c.max_abs:.3g} = {c.relative:.3g} of scale {c.scale:.3g} "
            f"> tolerance {c.tolerance:g}"
            for c in self.deterministic
            if not c.passed
        ]
        if self.mc_error is not None:
            out.append(self.mc_error)
        if self.mc is not None and not self.mc.passed:
            z = self.mc.z_test
            if not z.passed:
                out.append(
                    f"MC {z.quantity}: torch vs ONNX |z| = {z.z_max:.2f} > {z.threshold:.2f} "
                    f"(Bonferroni over {z.n_tests}, alpha {z.alpha:g})"
                )
            if self.mc.std_within_run <= 0.0:
                out.append("MC graph is deterministic: zero spread across samples")
            elif not self.mc.spread_ok:
                out.append(
                    f"MC spread differs: mean std torch {self.mc.mean_std_torch:.3g} vs ONNX "
                    f"{self.mc.mean_std_onnx:.3g} (allowed ratio 1/{SPREAD_RATIO:g} to {SPREAD_RATIO:g})"
                )
            if not self.mc.runs_differ:
                out.append("MC graph gives identical results on repeated runs")
            if not self.mc.sessions_differ:
                out.append("MC graph gives identical streams in two sessions")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, with ``passed`` and ``failures`` included."""
        data = asdict(self)
        data["passed"] = self.passed
        data["failures"] = self.failures()
        return data

    def to_json(self) -> str:
        """The report as indented JSON (non-finite numbers written as strings so the JSON stays valid)."""
        return json.dumps(_finite(self.to_dict()), indent=2) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def output_scale(reference: np.ndarray) -> float:
    """``max(1, max |reference|)``: the scale deterministic differences are measured against."""
    if reference.size == 0:
        return 1.0
    return max(1.0, float(np.max(np.abs(reference))))


def compare(
    name: str,
    references: list[np.ndarray],
    candidates: list[np.ndarray],
    tolerance: float = DEFAULT_TOLERANCE,
) -> Comparison:
    """Compare outputs batch by batch (lists of equal length, one array per batch size).

    Non-finite values never pass: a NaN in either output makes the difference infinite.
    """
    if len(references) != len(candidates) or not references:
        raise ValueError("compare needs one candidate per reference and at least one batch")
    max_abs = 0.0
    scale = 1.0
    batch_sizes = []
    for ref, cand in zip(references, candidates, strict=True):
        ref = np.asarray(ref, dtype=np.float64)
        cand = np.asarray(cand, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"{name}: output shapes differ: {ref.shape} vs {cand.shape}")
        diff = np.abs(ref - cand)
        if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cand))):
            diff = np.full_like(diff, np.inf)
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
        scale = max(scale, output_scale(ref))
        batch_sizes.append(int(ref.shape[0]) if ref.ndim else 1)
    relative = max_abs / scale
    return Comparison(
        name=name,
        max_abs=max_abs,
        scale=scale,
        relative=relative,
        tolerance=tolerance,
        batch_sizes=tuple(batch_sizes),
        passed=bool(relative <= tolerance),
    )


def bonferroni_threshold(n_tests: int, alpha: float = DEFAULT_ALPHA) -> float:
    """Two-sided normal critical value with family-wise error `alpha` over `n_tests` tests."""
    if n_tests < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("need n_tests >= 1 and 0 < alpha < 1")
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * n_tests))


def z_test(
    quantity: str,
    mean_a: np.ndarray,
    std_a: np.ndarray,
    samples_a: int,
    mean_b: np.ndarray,
    std_b: np.ndarray,
    samples_b: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    se_floor: float = DEFAULT_SE_FLOOR,
) -> ZTest:
    """Two-sample z-test of MC means with standard errors ``std / sqrt(T)``, Bonferroni-corrected."""
    mean_a, std_a, mean_b, std_b = (np.asarray(v, dtype=np.float64) for v in (mean_a, std_a, mean_b, std_b))
    if not (mean_a.shape == std_a.shape == mean_b.shape == std_b.shape):
        raise ValueError(f"z-test shapes differ: {mean_a.shape}, {std_a.shape}, {mean_b.shape}, {std_b.shape}")
    if samples_a < 2 or samples_b < 2:
        raise ValueError("the z-test needs at least 2 samples on each side")
    se = np.sqrt(std_a**2 / samples_a + std_b**2 / samples_b + se_floor**2)
    z = np.abs(mean_a - mean_b) / se
    finite = bool(np.all(np.isfinite(z)))
    z_max = float(z.max()) if finite and z.size else math.inf
    threshold = bonferroni_threshold(max(int(z.size), 1), alpha)
    return ZTest(
        quantity=quantity,
        z_max=z_max,
        threshold=threshold,
        n_tests=int(z.size),
        alpha=alpha,
        se_floor=se_floor,
        passed=bool(finite and z_max <= threshold),
    )


def spread_matches(std_a: np.ndarray, std_b: np.ndarray, ratio: float = SPREAD_RATIO, floor: float = 1e-6) -> bool:
    """Whether two MC estimates have a comparable average spread (mean std within a factor `ratio`).

    A coarse guard, not a test: the mean of the per-element standard deviations is noisy (a layer with one
    draw per mini-batch correlates all elements), so only gross differences are flagged, such as a graph
    whose samples barely vary or a drop probability far from the model's. Both below `floor` counts as equal.
    """
    a = float(np.mean(std_a)) if np.size(std_a) else 0.0
    b = float(np.mean(std_b)) if np.size(std_b) else 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    if a < floor and b < floor:
        return True
    if a < floor or b < floor:
        return False
    return 1.0 / ratio <= b / a <= ratio
