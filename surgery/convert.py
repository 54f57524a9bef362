"""The convert-and-export pipeline: a trained network in, a verified model package with both ONNX graphs out.

Two entry points:

* :func:`convert_package` works on an existing package directory (``manifest.json`` + ``weights.safetensors``)
  in place: it folds the network, exports ``model.onnx`` (deterministic) and ``model.mc.onnx`` (MC), checks
  parity in ONNX Runtime, and adds both graphs and ``parity.json`` to the package (sha256 recorded in the
  manifest). ``dropwise train`` calls it for every network it writes.
* :func:`convert` resolves a user's SOURCE through ``dropwise.surgery.sources`` (a package, a Hugging Face
  directory, a zoo name, or a ``module:factory`` reference with weights and a dataset or ``--input-shape``),
  writes it as a package (``dropwise.surgery.writing``), optionally recalibrating BatchNorm first (a change of
  weights, recorded in ``surgery``), and then calls :func:`convert_package`.

The parity measurements live in ``dropwise.surgery.parity_runs``, their statistics and the report in
``dropwise.surgery.parity``, the report's formatting in ``dropwise.surgery.convert_report``.

The package's weights and architecture always describe the unfolded network, so it can be rebuilt and
converted again; folding and MC conversion are applied to the exported graphs only and recorded under the
manifest key ``export``. Parity never fails silently: a failed report is still written to ``parity.json``
(``passed: false``) and returned, and the CLI exits non-zero.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropwise.package import add_file, update_manifest, validate_name
from dropwise.surgery.export import DEFAULT_OUTPUT_NAME, ExportError, export_deterministic
from dropwise.surgery.parity import DEFAULT_ALPHA, DEFAULT_TOLERANCE, PARITY_FILE, ParityReport
from dropwise.surgery.parity_runs import Batch, deterministic_parity, mc_parity, parity_inputs, rows
from dropwise.surgery.providers import create_session, resolve_providers
from dropwise.surgery.sources import head_dropout, one_line, resolve_source
from dropwise.surgery.writing import save_source
from torch import nn
from tqdm import tqdm

from dropwise.errors import DropwiseError

DETERMINISTIC_FILE = "model.onnx"
MC_FILE = "model.mc.onnx"
DEFAULT_REPOSITORY = Path("model_repository")


class ConvertError(DropwiseError, RuntimeError):
    """A conversion cannot proceed (bad source, missing weights or data, a model with no site for MC...)."""


@dataclass(frozen=True)
class ConvertOptions:
    """What to apply and how strictly to check it."""

    fold: bool = True
    mc: bool = True
    recalibrate_bn: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    samples: int = 64
    mc_batch: int = 32
    alpha: float = DEFAULT_ALPHA
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.tolerance < 1.0:
            raise ConvertError(f"tolerance must lie in (0, 1), got {self.tolerance}")
        if self.samples < 2:
            raise ConvertError(f"--samples must be at least 2 for the MC z-test, got {self.samples}")
        if self.mc_batch < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConvertError("batch sizes must be positive")
        if not 0.0 < self.alpha < 1.0:
            raise ConvertError(f"alpha must lie in (0, 1), got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the options (stored in the parity report)."""
        return {
            "fold": self.fold,
            "mc": self.mc,
            "recalibrate_bn": self.recalibrate_bn,
            "tolerance": self.tolerance,
            "samples": self.samples,
            "mc_batch": self.mc_batch,
            "alpha": self.alpha,
            "batch_sizes": list(self.batch_sizes),
            "device": self.device,
        }


@dataclass(frozen=True)
class ConvertResult:
    """The package written (or converted in place) and its parity report."""

    package_dir: Path
    report: ParityReport


@dataclass
class _Steps:
    """A progress bar over the named steps of one conversion (silent when disabled)."""

    name: str
    total: int
    enabled: bool
    bar: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, desc=self.name, unit="step", disable=not self.enabled, leave=False)

    @contextmanager
    def step(self, label: str, report: ParityReport | None = None) -> Iterator[None]:
        """Run one step; its wall and CPU times go into ``report.seconds`` and ``report.cpu_seconds``."""
        self.bar.set_postfix_str(label)
        start, cpu = time.perf_counter(), time.process_time()
        yield
        if report is not None:
            report.seconds[label] = round(time.perf_counter() - start, 3)
            report.cpu_seconds[label] = round(time.process_time() - cpu, 3)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------- pipeline


FoldFunction = Callable[[nn.Module, Any], nn.Module]


def default_fold(model: nn.Module, example: Any) -> nn.Module:
    """`dropwise.surgery.fold.fold` with its self-check against the eval output (`FoldError` on failure)."""
    from dropwise.surgery.fold import fold

    return fold(model, example)


def _to_mc(model: nn.Module, example: Any, head_p: float | None) -> nn.Module:
    from dropwise.surgery.mc import NoStochasticSiteError, to_mc

    try:
        return to_mc(model, example_input=example, add_dropout_before_head=head_p)
    except NoStochasticSiteError as exc:
        raise ConvertError(f"cannot build the MC graph: {one_line(exc)} (convert with --no-mc)") from exc


def _first_line(exc: BaseException) -> str:
    """`exc`'s first line; for an exporter exception, that of its ROOT cause (where the useful message is)."""
    root = exc
    library = type(exc).__module__.split(".")[0] in ("torch", "onnx", "onnxscript")
    while library and root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip()
    line = text.splitlines()[0] if text else type(root).__name__
    line = line[:400] + ("..." if len(line) > 400 else "")
    return f"{type(exc).__name__}: {line}" if root is exc else f"{type(exc).__name__} ({line})"


def _export_mc(model: nn.Module, example: Batch, path: Path, names: list[str], task: str) -> None:
    """`dropwise.surgery.mc_export.export_mc_onnx` with the per-sample outputs included."""
    from dropwise.surgery.mc_export import export_mc_onnx

    inputs = example[0] if len(example) == 1 else example
    try:
        export_mc_onnx(model, inputs, path, input_names=names, task=task, return_samples=True)
    except Exception as exc:  # the exporter raises many types; report the first line
        raise ExportError(f"MC export failed for {type(model).__name__}: {_first_line(exc)}") from exc
    if not path.is_file():
        raise ExportError(f"MC export wrote no file at {path}")


def convert_package(
    package_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    allow_modules: Sequence[str] | None = None,
    fold_fn: FoldFunction = default_fold,
    dataset: str | None = None,
) -> ParityReport:
    """Export both ONNX flavours of a package, verify parity and add the graphs and ``parity.json`` to it.

    The package is converted in place (existing ONNX files and report are replaced) and its weights are not
    changed; ``options.recalibrate_bn`` is refused here because it changes the weights (use :func:`convert`).
    The package is read through ``dropwise.surgery.sources`` (one trust rule: `allow_modules` adds factory
    prefixes to ``dropwise.models.``). `fold_fn` replaces `dropwise.surgery.fold.fold` for networks that need
    their own folding; whatever it returns is checked against the unfolded network's eval output like the
    default. Parity inputs: the test split of `dataset` or of the package's recorded dataset, else inputs
    generated from the manifest's input specs.

    When the MC graph cannot be exported, the deterministic graph and the report are still written, the
    reason is in ``report.mc_error`` and the report does not pass.

    Returns:
        The parity report, also written as ``parity.json``; check ``report.passed``.

    Raises:
        DropwiseError subclasses: ConvertError, SourceError, PackageError, ExportError, ProviderError,
        FoldError, ParityRunError.
    """
    options = options or ConvertOptions()
    if options.recalibrate_bn:
        raise ConvertError("convert_package never changes weights: recalibrate with convert(), a new version")
    resolve_providers(options.device)
    source = resolve_source(str(package_dir), allow_modules=allow_modules)
    model, path = source.base, source.path
    assert path is not None
    names = [spec.name for spec in source.inputs]
    steps = _Steps(f"convert {source.name}", 4 + (2 if options.mc else 0), options.progress)
    version = int(path.name)
    report = ParityReport(
        name=source.name or path.parent.name,
        version=version,
        task=source.task,
        tolerance=options.tolerance,
        options=options.to_dict(),
    )
    try:
        count = max(max(options.batch_sizes), options.mc_batch)
        inputs, described = parity_inputs(source.inputs, count, dataset or source.dataset)
        report.options["inputs"] = described
        batches = [rows(inputs, b) for b in options.batch_sizes]
        example = rows(inputs, 2)
        call_example: Any = example[0] if len(example) == 1 else example
        with tempfile.TemporaryDirectory(prefix="dropwise-convert-") as tmp:
            with steps.step("fold", report):
                folded = fold_fn(model, call_example) if options.fold else copy.deepcopy(model).eval()
            with steps.step("export model.onnx", report):
                det_path = export_deterministic(folded, call_example, Path(tmp) / DETERMINISTIC_FILE, input_names=names)
            with steps.step("deterministic parity", report):
                session, provider = create_session(det_path, options.device)
                report.providers = provider.to_dict()
                report.deterministic = deterministic_parity(model, folded, session, names, batches, options.tolerance)
            mc_path: Path | None = None
            if options.mc:
                with steps.step("export model.mc.onnx", report):
                    head_p = head_dropout(source.surgery)
                    mc_model = _to_mc(model, call_example, head_p)
                    # A head dropout recorded by `dropwise mc` exists only in the MC model: export that one.
                    exported = mc_model if head_p is not None else model
                    try:
                        mc_path = Path(tmp) / MC_FILE
                        _export_mc(exported, example, mc_path, names, source.task)
                    except ExportError as exc:  # the deterministic graph is still written and usable
                        report.mc_error = " ".join(str(exc).split())
                        mc_path = None
                if mc_path is not None:
                    with steps.step("MC parity", report):
                        report.mc = mc_parity(
                            mc_model,
                            mc_path,
                            rows(inputs, options.mc_batch),
                            source.task,
                            names,
                            samples=options.samples,
                            alpha=options.alpha,
                            device=options.device,
                        )
                    if report.providers.get("device") == "cuda":  # what the CUDA session leaves to the CPU
                        import onnx
                        from dropwise.surgery.onnx_cuda import cuda_compatible, placement

                        report.providers["mc_placement"] = placement(cuda_compatible(onnx.load(mc_path))).to_dict()
            with steps.step("write package", report):
                add_file(path, DETERMINISTIC_FILE, det_path)
                if mc_path is not None:
                    add_file(path, MC_FILE, mc_path)
                add_file(path, PARITY_FILE, report.to_json().encode("utf-8"))
                update_manifest(path, export=_export_record(options, report))
    finally:
        steps.close()
    return report


def _export_record(options: ConvertOptions, report: ParityReport) -> dict[str, Any]:
    """The manifest's ``export`` entry: what each graph file is and whether parity passed."""
    record: dict[str, Any] = {
        DETERMINISTIC_FILE: {
            "flavour": "deterministic",
            "folded": options.fold,
            "output": DEFAULT_OUTPUT_NAME,
        },
        "parity": {"passed": report.passed, "tolerance": options.tolerance, "file": PARITY_FILE},
    }
    if report.mc is not None:
        record[MC_FILE] = {"flavour": "mc", "default_samples": options.samples}
    return record


def _recalibrate(model: nn.Module, dataset: str | None) -> bool:
    """Re-estimate BatchNorm statistics on the training split; False when the model has no BatchNorm."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    if dataset is None:
        raise ConvertError("--recalibrate-bn needs the training data: the dataset of this model is unknown")
    from dropwise.models.data import load_dataset
    from dropwise.surgery.batchnorm import recalibrate_batchnorm

    recalibrate_batchnorm(model, load_dataset(dataset).train[0])
    model.eval()
    return True


def convert(
    source: str,
    *,
    weights: str | Path | None = None,
    repository: str | Path | None = None,
    name: str | None = None,
    options: ConvertOptions | None = None,
    allow_modules: Sequence[str] | None = None,
    factory_kwargs: str | dict[str, Any] | None = None,
    dataset: str | None = None,
    input_shape: Sequence[str] | str | None = None,
    input_dtype: Sequence[str] | str | None = None,
    task: str | None = None,
    on_package: Callable[[Path], None] | None = None,
) -> ConvertResult:
    """Resolve SOURCE into a package and convert it (see the module docstring).

    Args:
        source: any source ``dropwise.surgery.sources.resolve_source`` takes (package, Hugging Face
            directory, zoo name, ``module:factory``).
        weights: weights for a zoo name or a factory (a zoo name without weights uses the latest package of
            that name in `repository`).
        repository: where new packages go (default ``model_repository``; for a package source, its own).
        name: package name (default: the zoo name, the source package's name, or the factory's name).
        options: what to apply and check.
        allow_modules: module prefixes a factory may be imported from besides ``dropwise.models.``.
        factory_kwargs: keyword arguments for a ``module:factory`` source (JSON text or a dict).
        dataset: a `dropwise.models.data` dataset giving a factory source its input spec, labels and parity
            inputs.
        input_shape, input_dtype, task: a factory's input specs and task when no dataset describes them
            (parity then runs on generated inputs of that spec).
        on_package: called with the package directory before conversion starts (for progress messages).

    Raises:
        DropwiseError subclasses (see :func:`convert_package`).
    """
    options = options or ConvertOptions()
    resolve_providers(options.device)  # a bad or unusable device fails before any work
    if name is not None:
        validate_name(name)
    repo = Path(repository) if repository is not None else None
    resolved = resolve_source(
        source,
        weights=weights,
        factory_kwargs=factory_kwargs,
        input_shape=input_shape,
        input_dtype=input_dtype,
        task=task,
        dataset=dataset,
        allow_modules=allow_modules,
        repository=repo or DEFAULT_REPOSITORY,
    )
    if dataset is not None:
        resolved.dataset = dataset
    steps: list[str] = []
    if options.recalibrate_bn and _recalibrate(resolved.base, resolved.dataset):
        steps.append("recalibrate_bn")
    if resolved.kind == "package":
        assert resolved.path is not None
        home = resolved.path.parent.parent
        target_repo = repo if repo is not None else home
        target_name = name or resolved.name
        same_place = target_repo.resolve() == home.resolve() and target_name == resolved.name
        if same_place and not steps:
            package_dir = resolved.path
        else:
            origin = f"{resolved.name}/{resolved.path.name}"
            package_dir = save_source(
                resolved, target_repo, target_name, steps=steps, training={"converted_from": origin}
            )
    else:
        package_dir = save_source(resolved, repo or DEFAULT_REPOSITORY, name, steps=steps)
    if on_package is not None:
        on_package(package_dir)
    in_place = dataclasses.replace(options, recalibrate_bn=False)
    report = convert_package(package_dir, in_place, allow_modules=allow_modules, dataset=dataset)
    return ConvertResult(package_dir=package_dir, report=report)
