"""``dropwise evaluate PACKAGE``: how trustworthy are a package's deterministic and MC-dropout predictions?

Runs `dropwise.surgery.evaluate.evaluate_package` (accuracy / NLL / Brier / ECE, calibration by temperature
scaling, OOD detection by each uncertainty score, convergence with T, risk-coverage, the abstention rule;
regression: RMSE, Gaussian NLL, interval coverage) and writes ``evaluation.json`` plus PNG plots into the
package (checksummed), with a short summary in the manifest that ``GET /v1/models/{name}`` shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def _line(label: str, block: dict[str, Any]) -> str:
    return f"  {label:<44}" + "  ".join(f"{k} {v:.4f}" for k, v in block.items() if isinstance(v, float))


def evaluate_command(
    package: Annotated[Path, typer.Argument(help="Package directory (a version, or a model directory: latest).")],
    data: Annotated[
        Path | None, typer.Option("--data", help="file.npz with x, y (half calibrates, half tests).")
    ] = None,
    ood: Annotated[Path | None, typer.Option("--ood", help="file.npz with x: an extra OOD set.")] = None,
    num_samples: Annotated[
        list[int] | None, typer.Option("--num-samples", "-T", help="MC sample counts (default 8, 32, 100).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the MC masks and the OOD noise.")] = 0,
    allow_module: Annotated[
        list[str] | None, typer.Option("--allow-module", help="Module prefix the factory may come from.")
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option("--max-rows", help="Use only the first N rows of each split and OOD set (a quick look)."),
    ] = None,
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store the results in the package.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Evaluate PACKAGE's uncertainty and store evaluation.json + plots in it."""
    from dropwise.package import PackageError
    from dropwise.surgery.evaluate import DEFAULT_T, evaluate_package, write_evaluation

    try:
        result = evaluate_package(
            package,
            data=data,
            ood=ood,
            num_samples=num_samples or DEFAULT_T,
            seed=seed,
            allow_modules=allow_module,
            progress=progress,
            max_rows=max_rows,
        )
    except PackageError as exc:
        from dropwise.errors import UserError

        raise UserError(str(exc)) from None
    summary = result.summary()
    typer.echo(f"{result.report['model']} v{result.report['version']} on {result.report['dataset']} (test split)")
    typer.echo(_line("deterministic", summary["deterministic"]))
    typer.echo(_line(f"MC T={summary['num_samples']}", summary["mc"]))
    for name, block in summary.get("calibrated", {}).items():
        typer.echo(_line(f"{name} (temperature-scaled)", block))
    for name, best in summary.get("ood_auroc", {}).items():
        typer.echo(f"  OOD {name:<30}best {best['best']} AUROC {best['auroc']:.4f}")
    if "abstention" in summary:
        a = summary["abstention"]
        typer.echo(
            f"  abstain when {a['score']} > {a['threshold']:.4g} (T={a['num_samples']}, keeps 95% of validation)"
        )
    if write:
        target = _version_dir(package)
        names = write_evaluation(target, result)
        typer.echo(f"wrote {', '.join(names)} into {target}")


def _version_dir(path: Path) -> Path:
    """A version directory, or a model directory's latest version."""
    from dropwise.package import MANIFEST, list_versions

    if (path / MANIFEST).is_file():
        return path
    versions = list_versions(path)
    return path / str(max(versions)) if versions else path


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to the ``dropwise`` app."""
    app.command("evaluate")(evaluate_command)
