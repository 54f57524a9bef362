"""The convert-and-export pipeline: a trained network in, a verified model package with both ONNX graphs out.

Two entry points:

* :func:`convert_package` works on an existing package directory (``manifest.json`` + ``weights.safetensors``)
  in place: it folds the network, exports ``model.onnx`` (deterministic) and ``model.mc.onnx`` (MC), checks
  parity in ONNX Runtime, and adds both graphs and ``parity.json`` to the package (sha256 recorded in the
  manifest). ``dropwise train`` calls it for every network it writes.
* :func:`convert` resolves a user's SOURCE (a package directory, a zoo name, or a ``module:factory``
  reference plus safetensors weights), optionally recalibrates BatchNorm (a change of weights, so it writes a
  new package version), and then calls :func:`convert_package`.

The package's weights and architecture always describe the unfolded network, so it can be rebuilt and
converted again; folding and MC conversion are applied to the exported graphs only and recorded under the
manifest key ``export``. Parity never fails silently: a failed report is still written to ``parity.json``
(``passed: false``) and returned, and the CLI exits non-zero.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dropwise.package import (
    MANIFEST,
    LoadedPackage,
    Manifest,
    PackageError,
    add_file,
    load_package,
    package_path,
    resolve_factory,
    save_package,
    update_manifest,
    validate_name,
)
from dropwise.surgery.export import DEFAULT_OUTPUT_NAME, ExportError, export_deterministic
from dropwise.surgery.outputs import summary_names
from dropwise.surgery.parity import (
    DEFAULT_ALPHA,
    DEFAULT_TOLERANCE,
    PARITY_FILE,
    Comparison,
    MCParity,
    ParityReport,
    compare,
    spread_matches,
    z_test,
)
from dropwise.surgery.providers import create_session, resolve_providers
from dropwise.surgery.sites import site_records
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

DETERMINISTIC_FILE = "model.onnx"
MC_FILE = "model.mc.onnx"
DEFAULT_REPOSITORY = Path("model_repository")


class ConvertError(RuntimeError):
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
    def step(self, label: str, seconds: dict[str, float] | None = None) -> Iterator[None]:
        """Run one step; its wall time goes into `seconds[label]` when given."""
        self.bar.set_postfix_str(label)
        start = time.perf_counter()
        yield
        if seconds is not None:
            seconds[label] = round(time.perf_counter() - start, 3)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------- inputs


def _dataset_name(manifest: Manifest) -> str | None:
    """The dataset the package was trained on, from the manifest or the zoo entry of the same factory."""
    extra = manifest.model_extra or {}
    for value in (manifest.training.get("dataset"), extra.get("dataset")):
        if isinstance(value, str):
            return value
    from dropwise.models.zoo import ZOO

    spec = ZOO.get(manifest.name)
    if spec is not None and (spec.factory, spec.kwargs) == (
        manifest.architecture.factory,
        manifest.architecture.kwargs,
    ):
        return spec.dataset
    return None


def _parity_inputs(
    manifest: Manifest, count: int, dataset: str | None = None, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """`count` real inputs (test split of `dataset` or the package's); standard normal for float input."""
    name = dataset or _dataset_name(manifest)
    if name is not None:
        from dropwise.models.data import load_dataset

        x = load_dataset(name).test[0]
        if x.shape[0] < count:
            repeats = -(-count // x.shape[0])
            x = x.repeat(repeats, *([1] * (x.dim() - 1)))
        return x[:count].contiguous(), f"test split of {name}"
    if manifest.input.dtype != "float32":
        raise ConvertError(
            "the package names no dataset and its input is not float32: cannot invent parity inputs "
            "(record training.dataset in the manifest or pass --dataset)"
        )
    shape = (count, *manifest.input.shape[1:])
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), "standard normal"


# --------------------------------------------------------------------------------------------- torch side


def _eval_outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[np.ndarray]:
    model.eval()
    with torch.no_grad():
        return [model(x).detach().cpu().numpy() for x in batches]


def _onnx_outputs(session: Any, input_name: str, batches: Sequence[torch.Tensor]) -> list[np.ndarray]:
    out_names = [o.name for o in session.get_outputs()]
    if DEFAULT_OUTPUT_NAME not in out_names:
        raise ConvertError(f"deterministic graph has no output {DEFAULT_OUTPUT_NAME!r}: {out_names}")
    return [session.run([DEFAULT_OUTPUT_NAME], {input_name: x.numpy()})[0] for x in batches]


def _torch_mc_samples(mc_model: nn.Module, x: torch.Tensor, samples: int, task: str) -> np.ndarray:
    """T plain forward passes of the MC model: probabilities (classification) or outputs (regression)."""
    outs = []
    with torch.no_grad():
        for _ in range(samples):
            y = mc_model(x)
            outs.append(torch.softmax(y, dim=-1) if task == "classification" else y)
    return torch.stack(outs).double().numpy()


def _deterministic_parity(
    model: nn.Module,
    folded: nn.Module,
    session: Any,
    input_name: str,
    batches: Sequence[torch.Tensor],
    tolerance: float,
) -> list[Comparison]:
    reference = _eval_outputs(model, batches)
    folded_out = _eval_outputs(folded, batches)
    onnx_out = _onnx_outputs(session, input_name, batches)
    return [
        compare("torch eval vs folded", reference, folded_out, tolerance),
        compare("folded vs onnx", folded_out, onnx_out, tolerance),
        compare("torch eval vs onnx", reference, onnx_out, tolerance),
    ]


# --------------------------------------------------------------------------------------------- MC side


def _mc_feeds(session: Any, input_name: str, x: torch.Tensor, samples: int) -> dict[str, np.ndarray]:
    """Feeds for the MC graph: the input, T, and nothing else (an optional seed input is left unset)."""
    feeds: dict[str, np.ndarray] = {input_name: x.numpy()}
    for spec in session.get_inputs():
        if spec.name == input_name:
            continue
        if spec.name in ("samples", "T", "num_samples"):
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            feeds[spec.name] = np.full(shape, samples, dtype=np.int64)
    missing = [s.name for s in session.get_inputs() if s.name not in feeds and "seed" not in s.name]
    if missing:
        raise ConvertError(f"the MC graph has inputs this pipeline does not know how to feed: {missing}")
    return feeds


def _mc_mean_std(session: Any, feeds: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    mean_name = summary_names(task)[0]
    if mean_name not in names or "std" not in names:
        raise ConvertError(f"the MC graph lacks outputs {mean_name!r} and 'std': it has {names}")
    mean, std = session.run([mean_name, "std"], feeds)
    return mean.astype(np.float64), std.astype(np.float64)


def _export_mc(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, task: str) -> None:
    """`dropwise.surgery.mc_export.export_mc_onnx` with the per-sample outputs included; checks the graph's names."""
    from dropwise.surgery.mc_export import export_mc_onnx

    try:
        export_mc_onnx(model, example, path, input_name=input_name, task=task, return_samples=True)
    except Exception as exc:  # the exporter raises many types; report the first line
        raise ExportError(f"MC export failed for {type(model).__name__}: {_first_line(exc)}") from exc
    if not path.is_file():
        raise ExportError(f"MC export wrote no file at {path}")


def _mc_parity(
    mc_model: nn.Module,
    mc_path: Path,
    x: torch.Tensor,
    task: str,
    input_name: str,
    options: ConvertOptions,
) -> MCParity:
    torch_samples = _torch_mc_samples(mc_model, x, options.samples, task)
    t_mean, t_std = torch_samples.mean(axis=0), torch_samples.std(axis=0)
    # Default session options on purpose: the MC graph must stay stochastic in any ONNX Runtime user.
    first, _ = create_session(mc_path, options.device)
    second, _ = create_session(mc_path, options.device)
    o_mean, o_std = _mc_mean_std(first, _mc_feeds(first, input_name, x, options.samples), task)
    # Stochasticity across runs and sessions, checked on a small problem (the graph cost grows with T * B).
    small = _mc_feeds(first, input_name, x[:2], min(options.samples, 8))
    o_mean_small, _ = _mc_mean_std(first, small, task)
    o_mean_again, _ = _mc_mean_std(first, small, task)
    o_mean_other, _ = _mc_mean_std(second, small, task)
    if o_mean.shape != t_mean.shape:
        raise ConvertError(f"MC graph output shape {o_mean.shape} differs from torch MC {t_mean.shape}")
    test = z_test(
        summary_names(task)[0],
        t_mean,
        t_std,
        options.samples,
        o_mean,
        o_std,
        options.samples,
        alpha=options.alpha,
    )
    std_within = float(o_std.max()) if o_std.size else 0.0
    spread = spread_matches(t_std, o_std)
    runs_differ = not np.array_equal(o_mean_small, o_mean_again)
    sessions_differ = not np.array_equal(o_mean_small, o_mean_other)
    return MCParity(
        samples=options.samples,
        batch=int(x.shape[0]),
        z_test=test,
        std_within_run=std_within,
        runs_differ=runs_differ,
        sessions_differ=sessions_differ,
        mean_std_torch=float(t_std.mean()),
        mean_std_onnx=float(o_std.mean()),
        spread_ok=spread,
        passed=test.passed and std_within > 0.0 and spread and runs_differ and sessions_differ,
    )


# --------------------------------------------------------------------------------------------- pipeline


FoldFunction = Callable[[nn.Module, torch.Tensor], nn.Module]


def default_fold(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`dropwise.surgery.fold.fold`, with its self-check against the eval output, as a `ConvertError` on failure."""
    from dropwise.surgery.fold import FoldError, fold

    try:
        return fold(model, example)
    except FoldError as exc:
        raise ConvertError(f"folding failed: {_one_line(exc)}") from exc


_HEAD_DROPOUT = re.compile(r"^mc:head_dropout=([0-9]*\.?[0-9]+)$")


def head_dropout(surgery: Sequence[str]) -> float | None:
    """The drop probability of a head dropout added by ``dropwise mc`` (``mc:head_dropout=P``), if any."""
    for step in surgery:
        if match := _HEAD_DROPOUT.match(step):
            return float(match.group(1))
    return None


def _to_mc(model: nn.Module, example: torch.Tensor, head_p: float | None) -> nn.Module:
    from dropwise.surgery.mc import NoStochasticSiteError, to_mc

    try:
        return to_mc(model, example_input=example, add_dropout_before_head=head_p)
    except NoStochasticSiteError as exc:
        raise ConvertError(f"cannot build the MC graph: {_one_line(exc)} (convert with --no-mc)") from exc


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
    `fold_fn` replaces `dropwise.surgery.fold.fold` for networks that need their own folding; whatever it returns is
    checked against the unfolded network's eval output like the default. `dataset` (a `dropwise.models.data` name)
    supplies the parity inputs when the manifest names none.

    When the MC graph cannot be exported, the deterministic graph and the report are still written, the
    reason is in ``report.mc_error`` and the report does not pass.

    Returns:
        The parity report, also written as ``parity.json``; check ``report.passed``.

    Raises:
        ConvertError, PackageError, surgery.export.ExportError, surgery.providers.ProviderError.
    """
    options = options or ConvertOptions()
    if options.recalibrate_bn:
        raise ConvertError("convert_package never changes weights: recalibrate with convert(), a new version")
    resolve_providers(options.device)
    loaded = load_package(package_dir, allow_modules=["dropwise.models.", *(allow_modules or [])])
    manifest, model, path = loaded.manifest, loaded.model, loaded.path
    assert model is not None
    input_name = manifest.input.name
    steps = _Steps(f"convert {manifest.name}", 4 + (2 if options.mc else 0), options.progress)
    report = ParityReport(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        tolerance=options.tolerance,
        options=options.to_dict(),
    )
    try:
        count = max(max(options.batch_sizes), options.mc_batch)
        inputs, source = _parity_inputs(manifest, count, dataset)
        report.options["inputs"] = source
        batches = [inputs[:b] for b in options.batch_sizes]
        example = inputs[:2]
        with tempfile.TemporaryDirectory(prefix="dropwise-convert-") as tmp:
            with steps.step("fold", report.seconds):
                folded = fold_fn(model, example) if options.fold else copy.deepcopy(model).eval()
            with steps.step("export model.onnx", report.seconds):
                det_path = export_deterministic(folded, example, Path(tmp) / DETERMINISTIC_FILE, input_name=input_name)
            with steps.step("deterministic parity", report.seconds):
                session, provider = create_session(det_path, options.device)
                report.providers = provider.to_dict()
                report.deterministic = _deterministic_parity(
                    model, folded, session, input_name, batches, options.tolerance
                )
            mc_path: Path | None = None
            if options.mc:
                with steps.step("export model.mc.onnx", report.seconds):
                    head_p = head_dropout(manifest.surgery)
                    mc_model = _to_mc(model, example, head_p)
                    # A head dropout recorded by `dropwise mc` exists only in the MC model: export that one.
                    source = mc_model if head_p is not None else model
                    try:
                        mc_path = Path(tmp) / MC_FILE
                        _export_mc(source, example, mc_path, input_name, manifest.task)
                    except ExportError as exc:  # the deterministic graph is still written and usable
                        report.mc_error = " ".join(str(exc).split())
                        mc_path = None
                if mc_path is not None:
                    with steps.step("MC parity", report.seconds):
                        report.mc = _mc_parity(
                            mc_model, mc_path, inputs[: options.mc_batch], manifest.task, input_name, options
                        )
                    if report.providers.get("device") == "cuda":  # what the CUDA session leaves to the CPU
                        import onnx
                        from dropwise.surgery.onnx_cuda import cuda_compatible, placement

                        report.providers["mc_placement"] = placement(cuda_compatible(onnx.load(mc_path))).to_dict()
            with steps.step("write package", report.seconds):
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


# --------------------------------------------------------------------------------------------- sources

_FACTORY_REFERENCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SourceSpec:
    """What a ``module:factory`` source needs besides its weights (a zoo entry or a dataset fills it)."""

    factory: str
    kwargs: dict[str, Any]
    task: str
    input_shape: tuple[int, ...]
    input_dtype: str
    labels: list[str] | None = None
    preprocessing: str = ""
    dataset: str | None = None
    target: dict[str, float] | None = None


def _load_weights(model: nn.Module, weights: Path) -> None:
    if not weights.is_file():
        raise ConvertError(f"weights file not found: {weights}")
    if weights.suffix != ".safetensors":
        raise ConvertError(f"weights must be a .safetensors file (never pickle): {weights}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own types on malformed files
        raise ConvertError(f"{weights}: unreadable safetensors file: {_one_line(exc)}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConvertError(f"{weights}: weights do not fit the network: {_one_line(exc)}") from exc


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def spec_from_dataset(factory: str, kwargs: dict[str, Any], dataset: str) -> SourceSpec:
    """A `SourceSpec` for `factory` whose input, task and labels come from a `dropwise.models.data` dataset."""
    from dropwise.models.data import load_dataset

    try:
        ds = load_dataset(dataset)
    except (KeyError, ValueError) as exc:
        raise ConvertError(f"unknown dataset {dataset!r}: {_one_line(exc)}") from exc
    return SourceSpec(
        factory=factory,
        kwargs=kwargs,
        task=ds.task,
        input_shape=tuple(ds.input_shape),
        input_dtype=ds.input_dtype,
        labels=ds.labels,
        preprocessing=ds.preprocessing,
        dataset=dataset,
        target=ds.target,
    )


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


def _save(
    repository: Path,
    name: str,
    model: nn.Module,
    spec: SourceSpec,
    surgery: list[str],
    training: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a new package version described by `spec` (dataset recorded under training)."""
    return save_package(
        repository,
        name,
        model,
        task=spec.task,  # type: ignore[arg-type]
        input_shape=spec.input_shape,
        input_dtype=spec.input_dtype,  # type: ignore[arg-type]
        architecture={"factory": spec.factory, "kwargs": spec.kwargs},
        preprocessing=spec.preprocessing,
        labels=spec.labels,
        sites=site_records(model),
        surgery=surgery,
        training={**training, **({"dataset": spec.dataset} if spec.dataset else {})},
        metrics=metrics,
        target=spec.target,
    )


def _from_package(
    package: LoadedPackage,
    repository: Path | None,
    name: str | None,
    options: ConvertOptions,
    dataset: str | None,
) -> Path:
    """Converted in place, unless recalibration or another repository/name asks for a new version."""
    manifest = package.manifest
    target_repo = repository if repository is not None else package.path.parent.parent
    target_name = name or manifest.name
    same_place = target_repo.resolve() == package.path.parent.parent.resolve() and target_name == manifest.name
    if same_place and not options.recalibrate_bn:
        return package.path
    model = package.model
    assert model is not None
    spec = SourceSpec(
        factory=manifest.architecture.factory,
        kwargs=manifest.architecture.kwargs,
        task=manifest.task,
        input_shape=tuple(manifest.input.shape[1:]),
        input_dtype=manifest.input.dtype,
        labels=manifest.labels,
        preprocessing=manifest.input.preprocessing,
        dataset=dataset or _dataset_name(manifest),
        target=manifest.target.model_dump() if manifest.target else None,
    )
    surgery = list(manifest.surgery)
    if options.recalibrate_bn and _recalibrate(model, spec.dataset):
        surgery.append("recalibrate_bn")
    training = {**manifest.training, "converted_from": f"{manifest.name}/{manifest.version}"}
    return _save(target_repo, target_name, model, spec, surgery, training, manifest.metrics)


def _zoo_spec(zoo_name: str) -> SourceSpec:
    from dropwise.models.zoo import ZOO

    spec = ZOO[zoo_name]
    base = spec_from_dataset(spec.factory, dict(spec.kwargs), spec.dataset)
    return base


def convert(
    source: str,
    *,
    weights: str | Path | None = None,
    repository: str | Path | None = None,
    name: str | None = None,
    options: ConvertOptions | None = None,
    allow_modules: Sequence[str] | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    dataset: str | None = None,
    on_package: Callable[[Path], None] | None = None,
) -> ConvertResult:
    """Resolve SOURCE into a package and convert it (see the module docstring).

    Args:
        source: a package directory (version or model directory), a zoo name, or ``module:factory``.
        weights: safetensors weights for a zoo name or a factory (a zoo name without weights uses the latest
            package of that name in `repository`).
        repository: where new packages go (default ``model_repository``; for a package source, its own).
        name: package name (default: the zoo name, the source package's name, or the factory's name).
        options: what to apply and check.
        allow_modules: module prefixes a factory may be imported from besides ``dropwise.models.`` (code execution).
        factory_kwargs: keyword arguments for a ``module:factory`` source.
        dataset: a `dropwise.models.data` dataset giving a factory source its input spec, labels and parity inputs.
        on_package: called with the package directory before conversion starts (for progress messages).

    Raises:
        ConvertError, PackageError, surgery.export.ExportError, surgery.providers.ProviderError.
    """
    options = options or ConvertOptions()
    resolve_providers(options.device)  # a bad or unusable device fails before any work
    allow_modules = ["dropwise.models.", *(allow_modules or [])]
    if name is not None:
        validate_name(name)
    repo = Path(repository) if repository is not None else None
    weights_path = Path(weights) if weights is not None else None
    source_path = Path(source)

    if source_path.is_dir() or (source_path / MANIFEST).exists():
        if weights_path is not None:
            raise ConvertError("--weights cannot be combined with a package SOURCE (it has its own weights)")
        package = load_package(source_path, allow_modules=allow_modules)
        package_dir = _from_package(package, repo, name, options, dataset)
    elif _FACTORY_REFERENCE.match(source):
        if weights_path is None:
            raise ConvertError(f"a factory SOURCE needs --weights FILE.safetensors: {source}")
        factory = resolve_factory(source, allow_modules)
        kwargs = dict(factory_kwargs or {})
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise ConvertError(f"calling {source} with {kwargs} failed: {_one_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ConvertError(f"{source} returned {type(model).__name__}, not an nn.Module")
        if dataset is None:
            raise ConvertError("a factory SOURCE needs --dataset NAME for its input spec and parity inputs")
        spec = spec_from_dataset(source, kwargs, dataset)
        _load_weights(model, weights_path)
        model.eval()
        surgery = ["recalibrate_bn"] if options.recalibrate_bn and _recalibrate(model, spec.dataset) else []
        package_dir = _save(repo or DEFAULT_REPOSITORY, name or source.split(":")[1], model, spec, surgery, {})
    else:
        from dropwise.models.zoo import ZOO, build

        if source not in ZOO:
            raise ConvertError(
                f"SOURCE {source!r} is not a package directory, a zoo name ({', '.join(ZOO)}) "
                "or a module:factory reference"
            )
        if weights_path is None:
            try:
                existing = package_path(repo or DEFAULT_REPOSITORY, source)
            except PackageError as exc:
                raise ConvertError(
                    f"no weights for {source!r}: pass --weights FILE.safetensors or train it first "
                    f"(dropwise train {source})"
                ) from exc
            package = load_package(existing, allow_modules=allow_modules)
            package_dir = _from_package(package, repo, name, options, dataset)
        else:
            model = build(source)
            _load_weights(model, weights_path)
            model.eval()
            spec = _zoo_spec(source)
            surgery = ["recalibrate_bn"] if options.recalibrate_bn and _recalibrate(model, spec.dataset) else []
            package_dir = _save(repo or DEFAULT_REPOSITORY, name or source, model, spec, surgery, {})

    if on_package is not None:
        on_package(package_dir)
    in_place = dataclasses.replace(options, recalibrate_bn=False)
    report = convert_package(package_dir, in_place, allow_modules=allow_modules, dataset=dataset)
    return ConvertResult(package_dir=package_dir, report=report)


def report_summary(report: ParityReport) -> list[str]:
    """Human-readable lines for the CLI: one per comparison, one for MC, one verdict."""
    lines = [
        f"  {c.name:<22} max|diff| {c.max_abs:.2e}  scale {c.scale:.3g}  rel {c.relative:.2e}  "
        f"{'ok' if c.passed else 'FAIL'}  (batches {', '.join(map(str, c.batch_sizes))})"
        for c in report.deterministic
    ]
    if report.mc is not None:
        mc = report.mc
        lines.append(
            f"  {'torch MC vs onnx MC':<22} |z|max {mc.z_test.z_max:.2f} <= {mc.z_test.threshold:.2f} "
            f"(T={mc.samples}, B={mc.batch}, {mc.z_test.n_tests} tests)  "
            f"mean std torch {mc.mean_std_torch:.4f} onnx {mc.mean_std_onnx:.4f}  "
            f"stochastic: runs {mc.runs_differ}, sessions {mc.sessions_differ}  "
            f"{'ok' if mc.passed else 'FAIL'}"
        )
    provider = report.providers.get("provider", "?")
    if (placed := report.providers.get("mc_placement")) is not None:
        lines.append(f"  MC graph on CUDA: {placed['cpu_nodes']} of {placed['nodes']} nodes without a CUDA kernel")
    lines.append(f"  provider {provider}; parity {'PASSED' if report.passed else 'FAILED'}")
    return lines


def report_json(report: ParityReport) -> dict[str, Any]:
    """The report as a JSON-able dict (same content as ``parity.json``)."""
    return json.loads(report.to_json())
