"""Formatting of a conversion's parity report: one line per comparison for people, a dict for machines."""

from __future__ import annotations

import json
from typing import Any

from dropwise.surgery.parity import ParityReport


def report_summary(report: ParityReport) -> list[str]:
    """Human-readable lines for the CLI: one per comparison, one for MC, one verdict."""
    lines = [
        f"  {c.name:<22} max|diff| {c.max_abs:.2e}  scale {c.scale:.3g}  rel {c.relative:.2e}  "
        f"{'ok' if c.passed else 'FAIL'}  (batches {', '.join(map(str, c.batch_sizes))})"
        for c in report.deterministic
    ]
    if report.mc is not None:
        mc = report.mc
        lines.append(
            f"  {'torch MC vs onnx MC':<22} |z|max {mc.z_test.z_max:.2f} <= {mc.z_test.threshold:.2f} "
            f"(T={mc.samples}, B={mc.batch}, {mc.z_test.n_tests} tests)  "
            f"mean std torch {mc.mean_std_torch:.4f} onnx {mc.mean_std_onnx:.4f}  "
            f"stochastic: runs {mc.runs_differ}, sessions {mc.sessions_differ}  "
            f"{'ok' if mc.passed else 'FAIL'}"
        )
    elif report.mc_error:
        lines.append(f"  {'MC graph':<22} not exported: {report.mc_error}")
    provider = report.providers.get("provider", "?")
    if (placed := report.providers.get("mc_placement")) is not None:
        lines.append(f"  MC graph on CUDA: {placed['cpu_nodes']} of {placed['nodes']} nodes without a CUDA kernel")
    lines.append(f"  provider {provider}; parity {'PASSED' if report.passed else 'FAILED'}")
    return lines


def report_json(report: ParityReport) -> dict[str, Any]:
    """The report as a JSON-able dict (same content as ``parity.json``)."""
    return json.loads(report.to_json())
