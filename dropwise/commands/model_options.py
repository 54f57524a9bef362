"""The options every command that takes a MODEL / SOURCE argument shares, and the one call that resolves it.

``inspect``, ``fold``, ``mc`` and ``convert`` take the same sources with the same options and the same trust
rule, all through ``dropwise.surgery.sources.resolve_source`` (see its module docstring for the table of
source kinds). Errors are ``dropwise.errors.DropwiseError`` subclasses: the CLI prints them as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from dropwise.surgery.sources import ModelSource

MODEL_HELP = "Package dir, Hugging Face dir, zoo name, or module:factory."

Weights = Annotated[
    Path | None,
    typer.Option("--weights", "-w", help="Weights for a zoo name or factory: .safetensors or a .pt/.pth state_dict."),
]
Name = Annotated[str | None, typer.Option("--name", help="Model name inside a repository directory.")]
Version = Annotated[int | None, typer.Option("--version", help="Package version (default: latest).")]
Kwargs = Annotated[str | None, typer.Option("--kwargs", help="JSON keyword arguments for a factory.")]
InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape", help="Input shape without the batch: 1,28,28, or NAME=DIMS per named input (repeat)."
    ),
]
InputDtype = Annotated[
    list[str] | None, typer.Option("--input-dtype", help="float32 or int64, or NAME=DTYPE per named input.")
]
Task = Annotated[
    str | None,
    typer.Option("--task", help="classification or regression (a factory's default: classification)."),
]
Dataset = Annotated[
    str | None,
    typer.Option("--dataset", help="Dataset (dropwise.models.data) giving a factory its inputs, task and data."),
]
AllowModule = Annotated[
    list[str] | None,
    typer.Option("--allow-module", help="Trust a factory module prefix outside dropwise.models. (runs its code)."),
]


def resolve(
    model: str,
    *,
    weights: Path | None = None,
    name: str | None = None,
    version: int | None = None,
    kwargs: str | None = None,
    input_shape: list[str] | None = None,
    input_dtype: list[str] | None = None,
    task: str | None = None,
    dataset: str | None = None,
    allow_module: list[str] | None = None,
    require_weights: bool = True,
) -> tuple[ModelSource, Any]:
    """``dropwise.surgery.sources.resolve_source`` on the command's options; returns (source, example input)."""
    from dropwise.surgery.sources import resolve_source

    source = resolve_source(
        model,
        weights=weights,
        name=name,
        version=version,
        factory_kwargs=kwargs,
        input_shape=input_shape,
        input_dtype=input_dtype,
        task=task,
        dataset=dataset,
        allow_modules=allow_module,
        require_weights=require_weights,
    )
    return source, source.example()
