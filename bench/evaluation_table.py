"""README tables from the ``evaluation.json`` files that ``dropwise evaluate`` wrote into a model repository.

Prints two markdown tables (test split, T = 32 unless the evaluation stored another calibration T):

1. one row per package: deterministic vs MC accuracy (classification) or RMSE in target units (regression),
   NLL, ECE, temperature-scaled NLL (deterministic, MC log-of-the-mean fit), the MC score with the best mean
   test AUROC over the package's OOD sets and that AUROC, the stored abstention rule with the fraction of
   test inputs it keeps, and the wall / CPU seconds of the evaluation;
2. one row per package and OOD set: AUROC (FPR at 95% TPR) of the deterministic max probability and of each
   MC score, and what the network answers on the set (most frequent class, its share, MC mean confidence).

Reads files only; asserts nothing. Run after ``dropwise evaluate`` on each package:
``python -m bench.evaluation_table REPO`` (optionally ``--networks a,b,c`` to choose and order the rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SCORES = ("max_probability", "predictive_entropy", "mutual_information", "variation_ratio")


def latest_report(repository: Path, name: str) -> dict[str, Any]:
    """The ``evaluation.json`` of the latest version of ``name``."""
    versions = sorted((int(p.name) for p in (repository / name).iterdir() if p.name.isdigit()), reverse=True)
    for version in versions:
        path = repository / name / str(version) / "evaluation.json"
        if path.is_file():
            report: dict[str, Any] = json.loads(path.read_text())
            return report
    raise SystemExit(f"{repository / name}: no evaluated version (run dropwise evaluate first)")


def _mean_auroc(report: dict[str, Any], t: str) -> dict[str, float]:
    by_score: dict[str, list[float]] = {}
    for entry in report["ood"].values():
        for score, block in entry["mc"][t].items():
            by_score.setdefault(score, []).append(block["auroc"])
    return {score: sum(v) / len(v) for score, v in by_score.items()}


def summary_row(report: dict[str, Any]) -> str:
    """One row of table 1."""
    t = str(report["summary"]["num_samples"])
    det, mc = report["deterministic"], report["mc"][t]
    seconds = report.get("seconds", {})
    time = f"{seconds['wall']:.3g} / {seconds['cpu']:.3g}" if seconds else "n/a"
    aurocs = _mean_auroc(report, t)
    best = max(aurocs, key=lambda s: aurocs[s])
    ood = f"{best} {aurocs[best]:.3f}"
    if report["summary"]["task"] == "regression":
        cov = mc["coverage"]
        return (
            f"| {report['model']} | RMSE {det['rmse']:.1f} / {mc['rmse']:.1f} | {det['nll']:.3f} / {mc['nll']:.3f} "
            f"| 90% interval covers {cov['0.9']:.2f} (MC) | n/a | {ood} | n/a | {time} |"
        )
    cal = report["calibration"]["after"]
    rule = report["abstention"]
    return (
        f"| {report['model']} | {100 * det['accuracy']:.2f} / {100 * mc['accuracy']:.2f} "
        f"| {det['nll']:.3f} / {mc['nll']:.3f} | {det['ece']:.3f} / {mc['ece']:.3f} "
        f"| {cal['deterministic']['nll']:.3f} / {cal['mc_log_mean']['nll']:.3f} | {ood} "
        f"| {rule['score']} > {rule['threshold']:.3g}, keeps {rule['test_kept']:.3f} | {time} |"
    )


def ood_rows(report: dict[str, Any]) -> list[str]:
    """Rows of table 2 for one package."""
    t = str(report["summary"]["num_samples"])
    rows = []
    for name, entry in report["ood"].items():
        mc = entry["mc"][t]

        def cell(block: dict[str, float], best: float) -> str:
            text = f"{block['auroc']:.3f} ({block['fpr_at_95_tpr']:.2f})"
            return f"**{text}**" if block["auroc"] == best else text

        if "std" in mc:  # regression: one score
            rows.append(f"| {report['model']} | {name} | n/a | MC std {cell(mc['std'], -1.0)} |  |  |  | n/a |")
            continue
        det = entry["deterministic"]["max_probability"]
        best = max([det["auroc"], *(mc[s]["auroc"] for s in SCORES)])
        pred = entry["predictions"]
        answers = f"{pred['top_class']} ({pred['top_class_share']:.2f}), {pred['mc_mean_max_probability']:.2f}"
        cells = " | ".join(cell(mc[s], best) for s in SCORES)
        rows.append(f"| {report['model']} | {name} | {cell(det, best)} | {cells} | {answers} |")
    return rows


def main() -> None:
    """Print both tables for the evaluated packages of a repository."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--networks", default=None, help="comma-separated package names (default: all evaluated)")
    args = parser.parse_args()
    names = (
        args.networks.split(",")
        if args.networks
        else sorted(p.name for p in args.repository.iterdir() if p.is_dir() and any(p.glob("*/evaluation.json")))
    )
    reports = [latest_report(args.repository, name) for name in names]
    print(
        "| network | accuracy % (RMSE) det / MC | NLL det / MC | ECE det / MC | temperature-scaled NLL det / MC "
        "| best MC OOD score, mean AUROC | abstention rule, test kept | seconds wall / CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for report in reports:
        print(summary_row(report))
    print()
    print(
        "| network | OOD set | deterministic max prob | MC max prob | MC predictive entropy | MC mutual information "
        "| MC variation ratio | answers: top class (share), MC confidence |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for report in reports:
        for row in ood_rows(report):
            print(row)


if __name__ == "__main__":
    main()
