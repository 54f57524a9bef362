"""``dropwise inspect MODEL``: list a model's stochastic sites as a table (``--json`` for machines).

MODEL: any source of ``dropwise.surgery.sources`` (a package directory or repository with ``--name``, a
Hugging Face directory, a zoo name, or ``module:factory``; a module outside ``dropwise.models.`` needs
``--allow-module``). Functional and attention dropout inside ``forward`` are found by running one example
batch (shape from the package manifest or ``--input-shape``).
"""

from __future__ import annotations

import json
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


def _table(rows: list[dict[str, object]]) -> str:
    columns = ["key", "kind", "p", "switch", "foldable", "fold_rule", "module_class"]
    cells = [
        [
            str(r["key"]),
            str(r["kind"]),
            f"{r['p']:.4g}",
            str(r["switch"]),
            "yes" if r["foldable"] else "no",
            str(r["fold_rule"]).split(":")[0],
            str(r["module_class"]),
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def inspect_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    weights: Weights = None,
    name: Name = None,
    version: Version = None,
    kwargs: Kwargs = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    task: Task = None,
    dataset: Dataset = None,
    allow_module: AllowModule = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sites as JSON.")] = False,
) -> None:
    """List the stochastic sites of MODEL (kind, p, how each is switched on, how it folds)."""
    from dropwise.surgery.sites import find_sites

    resolved, example = resolve(
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
        require_weights=False,
    )
    rows = [s.to_dict() for s in find_sites(resolved.model, example)]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": resolved.source,
                    "kind": resolved.kind,
                    "inputs": [spec.model_dump(mode="json") for spec in resolved.inputs],
                    "surgery": resolved.surgery,
                    "sites": rows,
                },
                indent=2,
            )
        )
        return
    typer.echo(
        f"{resolved.source} ({resolved.kind}): {len(rows)} site(s)"
        + (f", surgery {resolved.surgery}" if resolved.surgery else "")
    )
    if example is None:
        typer.echo("(no input shape: functional dropout inside forward not searched; pass --input-shape)")
    if rows:
        typer.echo(_table(rows))


def register(app: typer.Typer) -> None:
    """Add the ``inspect`` command to the ``dropwise`` app."""
    app.command("inspect")(inspect_command)
