"""``dropwise train [NAME ...]``: train reference networks and write them as model packages.

Each network trains with its recipe from ``dropwise.models.zoo.ZOO`` (seeded, early stopping, progress bar) and is
written through ``dropwise.package.save_package`` as ``<repository>/<name>/<version>/`` (safetensors weights
and a manifest with architecture, hyper-parameters, split and metrics). A summary line per network follows.
Unless ``--no-export`` is given, each package then goes through the same pipeline as ``dropwise convert``
(fold, deterministic and MC ONNX graphs, parity report); a parity failure exits non-zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_REPOSITORY = Path("model_repository")


def _summary(path: Path) -> str:
    from dropwise.package import load_package

    manifest = load_package(path, build=False).manifest
    m = manifest.metrics
    if manifest.task == "classification":
        score = f"test accuracy {100 * m['test_accuracy']:.2f}%"
    else:
        score = (
            f"test RMSE {m['test_rmse_original_units']:.2f} (standardised {m['test_rmse']:.3f}), "
            f"NLL {m['test_nll']:.3f}"
        )
    run = f"{int(m['epochs'])} epochs, {m['seconds']:.1f} s"
    return f"{manifest.name} v{manifest.version}: {score}, {run} -> {path}"


def train(
    names: Annotated[
        list[str] | None, typer.Argument(help="Zoo networks to train (default: all).", show_default=False)
    ] = None,
    repository: Annotated[
        Path, typer.Option("--repository", "-r", help="Model repository to write packages into.")
    ] = DEFAULT_REPOSITORY,
    quick: Annotated[
        bool, typer.Option("--quick", help="One epoch of a few batches (for tests; metrics meaningless).")
    ] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Override every network's training seed.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    export: Annotated[
        bool,
        typer.Option(
            "--export/--no-export",
            help="Also export model.onnx and model.mc.onnx and verify parity (dropwise convert's pipeline).",
        ),
    ] = True,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", help="Deterministic parity bound of the export, relative to max(1, |output|)."),
    ] = 1e-5,
) -> None:
    """Train reference networks (all by default) and write them as model packages."""
    from dropwise.errors import UserError
    from dropwise.models.zoo import ZOO
    from dropwise.zoo_training import train_zoo

    unknown = [n for n in names or [] if n not in ZOO]
    if unknown:
        raise UserError(f"unknown network {', '.join(unknown)}; choose from: {', '.join(ZOO)}")
    if repository.exists() and not repository.is_dir():
        raise UserError(f"repository {repository} exists and is not a directory")
    failed: list[str] = []

    def written(path: Path) -> None:
        typer.echo(_summary(path))
        if export:
            failed.extend(_export(path, progress=progress, tolerance=tolerance))

    if export:
        from dropwise.commands.convert import quiet_libraries

        quiet_libraries()
    train_zoo(list(names or []) or None, repository, quick=quick, seed=seed, progress=progress, on_package=written)
    if failed:
        raise UserError(f"parity failed for {'; '.join(failed)} (packages written; see their parity.json)")


def _export(path: Path, *, progress: bool, tolerance: float) -> list[str]:
    """Run the convert pipeline on a freshly written package; the failures as `name: reason` lines."""
    from dropwise.surgery.convert import ConvertOptions, convert_package

    report = convert_package(path, ConvertOptions(progress=progress, tolerance=tolerance))
    if report.passed:
        typer.echo(f"  {path.parent.name}: model.onnx and model.mc.onnx written, parity passed")
        return []
    return [f"{path.parent.name}: {'; '.join(report.failures()) or 'see parity.json'}"]


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the ``dropwise`` app."""
    app.command("train")(train)
