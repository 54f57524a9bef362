"""``dropwise convert SOURCE``: fold, convert to MC, export both ONNX graphs and verify parity into a package.

SOURCE is any source of ``dropwise.surgery.sources``: a package directory, a Hugging Face directory
(``config.json`` + ``model.safetensors``), a zoo name (with ``--weights``, or the latest package of that name in
the repository), a ``module:factory`` reference with ``--weights`` and either ``--dataset`` or
``--input-shape`` / ``--input-dtype`` (parity then runs on generated inputs of that spec), or an ``.onnx`` file
(surgery on its graph: ``dropwise/commands/convert_onnx.py``). Importing a module
outside ``dropwise.models.`` runs its code, so it needs ``--allow-module PREFIX``. Exit status: 0 when parity passed;
2 with one line on stderr for a usage error or a failed parity check (the report is still written into the
package, with ``passed: false``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from .model_options import MODEL_HELP, AllowModule, Dataset, InputDtype, InputShape, Kwargs, Task, Weights


def quiet_libraries() -> None:
    """Silence library chatter that is not about the user's model (the report says what matters)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors only; provider fallback is detected and reported by us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def convert(
    source: Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)],
    weights: Weights = None,
    repository: Annotated[
        Path | None,
        typer.Option("--repository", "-r", help="Repository for new packages (default: model_repository)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Package name (default from SOURCE).")] = None,
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold dropout into the deterministic graph.")] = True,
    mc: Annotated[bool, typer.Option("--mc/--no-mc", help="Export and verify the MC graph.")] = True,
    recalibrate_bn: Annotated[
        bool,
        typer.Option("--recalibrate-bn", help="Re-estimate BatchNorm statistics on the training split first."),
    ] = False,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Deterministic parity bound, relative to max(1, |output|).")
    ] = 1e-5,
    samples: Annotated[int, typer.Option("--samples", "-T", help="MC samples for the parity z-test.")] = 64,
    device: Annotated[str, typer.Option("--device", help="ONNX Runtime device: auto, cpu or cuda.")] = "cpu",
    dataset: Dataset = None,
    kwargs: Kwargs = None,
    input_shape: InputShape = None,
    input_dtype: InputDtype = None,
    task: Task = None,
    allow_module: AllowModule = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the parity report as JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Keep the exporter's and ONNX Runtime's own warnings.")
    ] = False,
    # --- ONNX file sources only (dropwise/commands/convert_onnx.py); --task above applies to them too ---
    add_dropout_before_head: Annotated[
        float | None,
        typer.Option("--add-dropout-before-head", help="ONNX source: insert Dropout(P) before the head."),
    ] = None,
    dropout_after: Annotated[
        str | None,
        typer.Option("--dropout-after", help="ONNX source: insert Dropout after NODE[,NODE] (with --p)."),
    ] = None,
    p: Annotated[float | None, typer.Option("--p", help="ONNX source: drop probability for --dropout-after.")] = None,
) -> None:
    """Convert a trained network (or an ONNX file) into a model package with verified ONNX graphs."""
    if not verbose:
        quiet_libraries()
    from dropwise.commands.convert_onnx import convert_onnx, is_onnx_source

    if is_onnx_source(source):
        convert_onnx(
            source,
            repository=repository,
            name=name,
            task=task or "classification",
            add_dropout_before_head=add_dropout_before_head,
            dropout_after=dropout_after,
            p=p,
            samples=samples,
            tolerance=tolerance,
            device=device,
            as_json=as_json,
        )
        return
    from dropwise.errors import UserError
    from dropwise.surgery.convert import ConvertOptions
    from dropwise.surgery.convert import convert as run_convert
    from dropwise.surgery.convert_report import report_json, report_summary

    options = ConvertOptions(
        fold=fold,
        mc=mc,
        recalibrate_bn=recalibrate_bn,
        tolerance=tolerance,
        samples=samples,
        device=device,
        progress=progress,
    )
    result = run_convert(
        source,
        weights=weights,
        repository=repository,
        name=name,
        options=options,
        allow_modules=list(allow_module or []),
        factory_kwargs=kwargs,
        dataset=dataset,
        input_shape=input_shape,
        input_dtype=input_dtype,
        task=task,
    )
    report = result.report
    if as_json:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        typer.echo(f"{report.name} v{report.version} -> {result.package_dir}")
        for line in report_summary(report):
            typer.echo(line)
    if not report.passed:
        raise UserError(
            f"parity failed for {report.name} v{report.version}: {report.failures()[0]} "
            f"(report: {result.package_dir / 'parity.json'})"
        )


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command to the ``dropwise`` app."""
    app.command("convert")(convert)
