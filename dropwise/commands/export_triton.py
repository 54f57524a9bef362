"""``dropwise export-triton REPOSITORY OUT``: write a Triton Inference Server model repository.

Each model becomes ``<name>`` (deterministic ONNX graph, dynamic batching) and ``<name>_mc`` (MC-dropout
ONNX graph taking ``samples`` and an optional ``seed``), each with its ``config.pbtxt``; see
`dropwise.triton_repository`. Exit status 0 when something was written, 2 with one line on stderr otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def export_triton(
    repository: Annotated[Path, typer.Argument(help="dropwise model repository to read.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="New Triton model repository (must not exist or be empty).")],
) -> None:
    """Write a Triton model repository (<name> and <name>_mc ONNX models with config.pbtxt) from packages."""
    from dropwise.triton_repository import export_triton as run

    result = run(repository, out)
    for model in result.models:
        versions = ", ".join(map(str, model.versions))
        print(f"{model.name}: {model.flavour}, versions {versions} -> {model.config_path.parent}")
    for key, reason in sorted(result.skipped.items()):
        print(f"dropwise: skipped {key}: {reason}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the `export-triton` command to the `dropwise` command line."""
    app.command("export-triton")(export_triton)
