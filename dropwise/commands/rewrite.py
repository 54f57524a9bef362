"""``dropwise fold MODEL --output DIR`` and ``dropwise mc MODEL --output DIR``.

Both write a model package (safetensors + sha256-verified manifest, ``dropwise.package``) whose manifest
records the rewrite in ``surgery`` (``"fold"``, ``"mc"``) and the rewritten model's sites; see
``dropwise.surgery.loading`` for MODEL and for how the rewrite is stored and replayed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


class ModelOptions:
    """Shared Typer option types for a MODEL argument."""

    weights = Annotated[
        Path | None, typer.Option("--weights", "-w", help="Safetensors weights for a zoo name or factory.")
    ]
    name = Annotated[str | None, typer.Option("--name", help="Model name inside a repository directory.")]
    version = Annotated[int | None, typer.Option("--version", help="Package version (default: latest).")]
    kwargs = Annotated[str | None, typer.Option("--kwargs", help="JSON keyword arguments for a factory.")]
    input_shape = Annotated[
        str | None, typer.Option("--input-shape", help="Input shape without the batch, e.g. 1,28,28.")
    ]
    input_dtype = Annotated[str | None, typer.Option("--input-dtype", help="float32 or int64.")]
    allow_module = Annotated[
        list[str] | None,
        typer.Option("--allow-module", help="Trust a factory module prefix for a package (runs its code)."),
    ]


def resolve(
    model: str,
    weights: Path | None,
    name: str | None,
    version: int | None,
    kwargs: str | None,
    input_shape: str | None,
    input_dtype: str | None,
    allow_module: list[str] | None,
    *,
    require_weights: bool = True,
) -> tuple[Any, Any]:
    """``dropwise.surgery.loading.resolve_model``, errors as ``UserError``; returns (resolved, example input)."""
    from dropwise.errors import UserError
    from dropwise.surgery.loading import LoadingError, example_input, resolve_model

    try:
        resolved = resolve_model(
            model,
            weights=weights,
            name=name,
            version=version,
            factory_kwargs=kwargs,
            input_shape=input_shape,
            input_dtype=input_dtype,
            allow_modules=allow_module,
            require_weights=require_weights,
        )
    except LoadingError as exc:
        raise UserError(str(exc)) from exc
    return resolved, example_input(resolved)


Output = Annotated[Path, typer.Option("--output", "-o", help="Repository to write the package into.")]
PackageName = Annotated[
    str | None, typer.Option("--package-name", help="Name of the new package (default: the source's).")
]


def fold_command(
    model: Annotated[str, typer.Argument(help="Package dir, zoo name, or module:factory.", show_default=False)],
    output: Output,
    package_name: PackageName = None,
    weights: ModelOptions.weights = None,
    name: ModelOptions.name = None,
    version: ModelOptions.version = None,
    kwargs: ModelOptions.kwargs = None,
    input_shape: ModelOptions.input_shape = None,
    input_dtype: ModelOptions.input_dtype = None,
    allow_module: ModelOptions.allow_module = None,
) -> None:
    """Fold MODEL for deterministic inference (checked against its eval output) and write a package."""
    from dropwise.errors import UserError
    from dropwise.surgery.fold import FoldError, fold_with_report
    from dropwise.surgery.loading import LoadingError, save_rewritten

    resolved, example = resolve(model, weights, name, version, kwargs, input_shape, input_dtype, allow_module)
    try:
        result = fold_with_report(resolved.model, example)
        path = save_rewritten(resolved, result.model, "fold", output, package_name, example)
    except (FoldError, LoadingError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    typer.echo(str(result.report))
    typer.echo(f"folded package -> {path}")


def mc_command(
    model: Annotated[str, typer.Argument(help="Package dir, zoo name, or module:factory.", show_default=False)],
    output: Output,
    package_name: PackageName = None,
    head_dropout: Annotated[
        float | None,
        typer.Option("--add-dropout-before-head", help="If MODEL has no site: add dropout (needs fine-tuning)."),
    ] = None,
    weights: ModelOptions.weights = None,
    name: ModelOptions.name = None,
    version: ModelOptions.version = None,
    kwargs: ModelOptions.kwargs = None,
    input_shape: ModelOptions.input_shape = None,
    input_dtype: ModelOptions.input_dtype = None,
    allow_module: ModelOptions.allow_module = None,
) -> None:
    """Convert MODEL for MC dropout (sites stochastic, everything else eval) and write a package."""
    from dropwise.errors import UserError
    from dropwise.surgery.loading import LoadingError, save_rewritten
    from dropwise.surgery.mc import to_mc

    resolved, example = resolve(model, weights, name, version, kwargs, input_shape, input_dtype, allow_module)
    try:
        mc = to_mc(resolved.model, example_input=example, add_dropout_before_head=head_dropout)
        step = f"mc:head_dropout={head_dropout}" if mc.head_dropout_added else "mc"
        path = save_rewritten(resolved, mc, step, output, package_name, example)
    except (LoadingError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    for site in mc.mc_sites:
        typer.echo(f"{site.key:<48} {site.kind:<26} p={site.p:.4g}")
    typer.echo(f"MC package ({len(mc.mc_sites)} stochastic site(s)) -> {path}")


def register(app: typer.Typer) -> None:
    """Add the ``fold`` and ``mc`` commands to the ``dropwise`` app."""
    app.command("fold")(fold_command)
    app.command("mc")(mc_command)
