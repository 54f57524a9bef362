"""The ``.onnx`` branch of ``dropwise convert``: surgery on an ONNX file's graph (`dropwise.surgery.onnx_convert`).

Kept apart from ``dropwise/commands/convert.py`` (which resolves torch model sources) so each stays small.
Exit status as for every convert: 0 when parity passed, 2 with one line on stderr otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def is_onnx_source(source: str) -> bool:
    """Whether SOURCE names an ONNX file (by its suffix)."""
    return source.lower().endswith(".onnx")


def convert_onnx(
    source: str,
    *,
    repository: Path | None,
    name: str | None,
    task: str,
    add_dropout_before_head: float | None,
    dropout_after: str | None,
    p: float | None,
    samples: int,
    tolerance: float,
    device: str,
    as_json: bool,
) -> None:
    """Convert an ONNX file into a package with a deterministic and an MC graph; print the report."""
    from dropwise.errors import UserError
    from dropwise.package import PackageError
    from dropwise.surgery.onnx_convert import OnnxConvertOptions, convert_onnx_file
    from dropwise.surgery.onnx_surgery import OnnxSurgeryError
    from dropwise.surgery.providers import ProviderError

    targets = tuple(t.strip() for t in (dropout_after or "").split(",") if t.strip())
    try:
        options = OnnxConvertOptions(
            task=task,
            add_dropout_before_head=add_dropout_before_head,
            dropout_after=targets,
            p=p,
            samples=samples,
            tolerance=tolerance,
            device=device,
        )
        result = convert_onnx_file(
            source, repository=repository or Path("model_repository"), name=name, options=options
        )
    except (OnnxSurgeryError, PackageError, ProviderError) as exc:
        raise UserError(" ".join(str(exc).split())) from exc
    report = result.report
    if as_json:
        typer.echo(json.dumps(json.loads(report.to_json()), indent=2))
    else:
        typer.echo(f"{report.name} v{report.version} -> {result.package_dir}")
        for line in report.summary():
            typer.echo(line)
    if not report.passed:
        raise UserError(
            f"parity failed for {report.name} v{report.version}: {report.failures()[0]} "
            f"(report: {result.package_dir / 'parity.json'})"
        )
