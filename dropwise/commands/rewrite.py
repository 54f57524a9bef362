"""``dropwise fold MODEL --output DIR`` and ``dropwise mc MODEL --output DIR``.

Both write a model package (safetensors + sha256-verified manifest, ``dropwise.package``) whose manifest
records the rewrite in ``surgery`` (``"fold"``, ``"mc"``, ``"mc:head_dropout=P"``) and the rewritten model's
sites; MODEL is any source of ``dropwise.surgery.sources`` and the package is written by
``dropwise.surgery.writing.save_source`` (weights and architecture of the source, rewrite replayed on load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .model_options import (
    MODEL_HELP,
    AllowModule,
    Dataset,
    InputDtype,
    InputShape,
    Kwargs,
    Name,
    Task,
    Version,
    Weights,
    resolve,
)

Output = Annotated[Path, typer.Option("--output", "-o", help="Repository to write the package into.")]
PackageName = Annotated[
    str | None, typer.Option("--package-name", help="Name of the new package (default: the source's).")
]
Model = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]


def fold_command(
    model: Model,
    output: Output,
    package_name: PackageName = None,
    weights: Weights = None,
    name: Name = None,
    version: Version = None,
    kwargs: Kwargs = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    task: Task = None,
    dataset: Dataset = None,
    allow_module: AllowModule = None,
) -> None:
    """Fold MODEL for deterministic inference (checked against its eval output) and write a package."""
    from dropwise.surgery.fold import fold_with_report
    from dropwise.surgery.writing import save_source

    source, example = resolve(
        model,
        weights=weights,
        name=name,
        version=version,
        kwargs=kwargs,
        input_shape=input_shape,
        input_dtype=input_dtype,
        task=task,
        dataset=dataset,
        allow_module=allow_module,
    )
    result = fold_with_report(source.model, example)
    path = save_source(source, output, package_name, steps=["fold"], rewritten=result.model)
    typer.echo(str(result.report))
    typer.echo(f"folded package -> {path}")


def mc_command(
    model: Model,
    output: Output,
    package_name: PackageName = None,
    head_dropout: Annotated[
        float | None,
        typer.Option("--add-dropout-before-head", help="If MODEL has no site: add dropout (needs fine-tuning)."),
    ] = None,
    weights: Weights = None,
    name: Name = None,
    version: Version = None,
    kwargs: Kwargs = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    task: Task = None,
    dataset: Dataset = None,
    allow_module: AllowModule = None,
) -> None:
    """Convert MODEL for MC dropout (sites stochastic, everything else eval) and write a package."""
    from dropwise.surgery.mc import to_mc
    from dropwise.surgery.writing import save_source

    source, example = resolve(
        model,
        weights=weights,
        name=name,
        version=version,
        kwargs=kwargs,
        input_shape=input_shape,
        input_dtype=input_dtype,
        task=task,
        dataset=dataset,
        allow_module=allow_module,
    )
    mc = to_mc(source.model, example_input=example, add_dropout_before_head=head_dropout)
    step = f"mc:head_dropout={head_dropout}" if mc.head_dropout_added else "mc"
    path = save_source(source, output, package_name, steps=[step], rewritten=mc)
    for site in mc.mc_sites:
        typer.echo(f"{site.key:<48} {site.kind:<26} p={site.p:.4g}")
    typer.echo(f"MC package ({len(mc.mc_sites)} stochastic site(s)) -> {path}")


def register(app: typer.Typer) -> None:
    """Add the ``fold`` and ``mc`` commands to the ``dropwise`` app."""
    app.command("fold")(fold_command)
    app.command("mc")(mc_command)
