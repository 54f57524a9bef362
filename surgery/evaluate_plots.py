"""PNG plots of an evaluation report: reliability diagram, risk-coverage curve, score convergence with T.

matplotlib with the non-interactive Agg backend; each function returns PNG bytes.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["render_plots"]


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _reliability(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    tc = str(report["calibration"]["num_samples"])
    curves = {
        "deterministic": report["deterministic"]["reliability"],
        f"MC T={tc}": report["mc"].get(tc, report["mc"][max(report["mc"], key=int)])["reliability"],
        "deterministic, temperature-scaled": report["calibration"]["reliability_after"]["deterministic"],
        f"MC T={tc}, temperature-scaled": report["calibration"]["reliability_after"][
            "mc_" + report["calibration"]["mc"]["method"]
        ],
    }
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for label, table in curves.items():
        pairs = [(c, a) for c, a, n in zip(table["confidence"], table["accuracy"], table["count"], strict=True) if n]
        ax.plot([c for c, _ in pairs], [a for _, a in pairs], marker="o", markersize=3, label=label)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report['model']} v{report['version']}: reliability (15 bins, test)")
    ax.legend(fontsize=7)
    return _png(fig)


def _risk_coverage(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    rc = report["risk_coverage"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for score, curve in rc["mc"].items():
        ax.plot(curve["coverage"], curve["accuracy"], label=f"MC {score} (AURC {curve['aurc']:.4f})")
    det = rc["deterministic_max_probability"]
    ax.plot(det["coverage"], det["accuracy"], linestyle="--", label=f"deterministic max prob (AURC {det['aurc']:.4f})")
    ax.set_xlabel("coverage (fraction of test inputs answered)")
    ax.set_ylabel("accuracy on the answered inputs")
    ax.set_title(f"{report['model']}: risk-coverage, T={rc['num_samples']}")
    ax.legend(fontsize=7)
    return _png(fig)


def _convergence(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for score, by_t in report["convergence"].items():
        ts = sorted(by_t, key=int)[:-1]
        ax.plot([int(t) for t in ts], [by_t[t] for t in ts], marker="o", label=score)
    ax.set_xscale("log")
    ax.set_xlabel("T (MC samples)")
    ax.set_ylabel(f"mean |s_T - s_{max(report['num_samples'])}| / mean s")
    ax.set_title(f"{report['model']}: per-input score deviation from T={max(report['num_samples'])}")
    ax.legend(fontsize=7)
    return _png(fig)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """The plots a report supports, by package file name (classification only)."""
    import matplotlib

    matplotlib.use("Agg")
    if "calibration" not in report:
        return {}
    return {
        "evaluation_reliability.png": _reliability(report),
        "evaluation_risk_coverage.png": _risk_coverage(report),
        "evaluation_convergence.png": _convergence(report),
    }
