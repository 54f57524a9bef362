"""``dropwise convert model.onnx``: an ONNX file in, a package with a deterministic and an MC graph out.

The graph is rewritten by `dropwise.surgery.onnx_surgery` (no torch module is involved): Dropout nodes are
found with their ratios, optionally one is inserted before the head (``add_dropout_before_head``) or after
named nodes (``dropout_after`` + ``p``), the deterministic graph has them removed and the MC graph has them
replaced by the project's counter-hash masks and in-graph summaries (MC dropout, Gal & Ghahramani 2016).

Parity, recorded in ``parity.json`` (`OnnxParityReport`):

* deterministic: the deterministic graph against the SOURCE graph run in inference mode (its Dropout
  nodes' ``training_mode`` removed), at several batch sizes, within ``tolerance`` of ``max(1, |output|)``;
* MC: a seeded run reproduces exactly; two unseeded runs and two sessions differ (stochastic under default
  ONNX Runtime options); the samples spread; and, when every Dropout feeds only linear ops up to the output
  (``head_only``: a dropout before the head), the MC mean of the outputs matches the deterministic output
  within MC error (two-sided z-test, Bonferroni over all outputs, the same test as `dropwise.surgery.parity`).
  With a nonlinearity after a Dropout the MC mean legitimately differs from the deterministic output, so
  that test is then reported but does not decide ``passed``.

The package (`dropwise.package.save_graph_package`) holds ``model.onnx``, ``model.mc.onnx``, ``parity.json``
and a manifest whose input (name, shape, dtype) comes from the graph; it has no weights, so only the
onnxruntime backend serves it (`dropwise.package.load_package` says so to the torch backend). The source
file is read with ``onnx.load`` (protobuf, nothing unpickled) and must hold its tensors inline.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .onnx_cuda import cuda_compatible, placement
from .onnx_surgery import (
    McGraphInfo,
    OnnxSurgeryError,
    deterministic_graph,
    find_dropouts,
    head_input,
    inference_reference,
    insert_dropouts,
    mc_graph,
)
from .outputs import NUM_SAMPLES, SAMPLE_LOGITS, SAMPLES, SEED_USED
from .parity import Comparison, ZTest, compare, z_test

__all__ = [
    "GRAPH_ONLY_FACTORY",
    "OnnxConvertOptions",
    "OnnxConvertResult",
    "OnnxParityReport",
    "convert_onnx_file",
    "graph_only",
    "prepare_graphs",
]

GRAPH_ONLY_FACTORY = "dropwise.surgery.onnx_convert:graph_only"
_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}
_MAX_BYTES = 2**31 - 1  # protobuf's own limit for one file
_MIN_TEST_SAMPLES = 512


def graph_only() -> None:
    """The manifest's architecture for graph-only packages: there is no torch network to build."""
    raise OnnxSurgeryError("this package was converted from an ONNX file: it has no torch network")


@dataclass(frozen=True)
class OnnxConvertOptions:
    """What to insert and check (see the module docstring)."""

    task: str = "classification"
    add_dropout_before_head: float | None = None
    dropout_after: tuple[str, ...] = ()
    p: float | None = None
    samples: int = 64
    batch_sizes: tuple[int, ...] = (1, 7, 64)
    tolerance: float = 1e-5
    alpha: float = 1e-3
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in ("classification", "regression"):
            raise OnnxSurgeryError(f"--task must be classification or regression, not {self.task!r}")
        if self.dropout_after and self.p is None:
            raise OnnxSurgeryError("--dropout-after needs --p P (the drop probability)")
        if self.p is not None and not self.dropout_after:
            raise OnnxSurgeryError("--p is the probability of --dropout-after; give the nodes too")
        if self.samples < 2:
            raise OnnxSurgeryError("--samples must be at least 2")


@dataclass
class OnnxParityReport:
    """Checks of one ONNX conversion (``parity.json``)."""

    name: str
    version: int
    task: str
    source: str
    sites: list[dict[str, Any]]
    inserted: list[str]
    graph: dict[str, Any]
    deterministic: list[Comparison] = field(default_factory=list)
    seeded_reproduces: bool = False
    runs_differ: bool = False
    sessions_differ: bool = False
    std_within_run: float = 0.0
    mean_test: ZTest | None = None
    mean_test_decides: bool = False
    providers: dict[str, Any] = field(default_factory=dict)
    samples: int = 0

    @property
    def passed(self) -> bool:
        """Every deterministic comparison and every MC check that applies passed."""
        mean_ok = self.mean_test is None or self.mean_test.passed or not self.mean_test_decides
        return (
            all(c.passed for c in self.deterministic)
            and self.seeded_reproduces
            and self.runs_differ
            and self.sessions_differ
            and self.std_within_run > 0.0
            and mean_ok
        )

    def failures(self) -> list[str]:
        """One sentence per failed check."""
        out = [
            f"{c.name}: max abs diff {c.max_abs:.3g} = {c.relative:.3g} of scale {c.scale:.3g} > {c.tolerance:g}"
            for c in self.deterministic
            if not c.passed
        ]
        if not self.seeded_reproduces:
            out.append("MC graph: the same seed gave different outputs")
        if not self.runs_differ:
            out.append("MC graph gives identical results on repeated unseeded runs")
        if not self.sessions_differ:
            out.append("MC graph gives identical streams in two sessions")
        if self.std_within_run <= 0.0:
            out.append("MC graph is deterministic: zero spread across samples")
        z = self.mean_test
        if z is not None and self.mean_test_decides and not z.passed:
            out.append(
                f"MC mean vs deterministic output: |z| = {z.z_max:.2f} > {z.threshold:.2f} "
                f"(Bonferroni over {z.n_tests}, alpha {z.alpha:g})"
            )
        return out

    def to_json(self) -> str:
        """Indented JSON with ``passed`` and ``failures``."""
        data = asdict(self)
        data["passed"] = self.passed
        data["failures"] = self.failures()

        def finite(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: finite(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [finite(v) for v in value]
            return value

        return json.dumps(finite(data), indent=2) + "\n"

    def summary(self) -> list[str]:
        """Short lines for the command line."""
        sites = ", ".join(f"{site['name']} (p={site['p']:.3g})" for site in self.sites)
        lines = [
            f"sites: {sites}" + (f"; inserted after {', '.join(self.inserted)}" if self.inserted else ""),
            f"MC graph: {self.graph.get('reason', '')}",
        ]
        lines += [
            f"{c.name}: max abs diff {c.max_abs:.2e} ({'ok' if c.passed else 'FAIL'})" for c in self.deterministic
        ]
        if self.mean_test is not None:
            verdict = (
                "ok" if self.mean_test.passed else ("FAIL" if self.mean_test_decides else "differs (nonlinear tail)")
            )
            lines.append(
                f"MC mean vs deterministic (T={self.samples}): |z| max {self.mean_test.z_max:.2f} "
                f"(threshold {self.mean_test.threshold:.2f}): {verdict}"
            )
        lines.append(
            f"MC seeded reproduces: {self.seeded_reproduces}; runs differ: {self.runs_differ}; "
            f"sessions differ: {self.sessions_differ}"
        )
        lines.append(f"provider: {self.providers.get('provider', '?')}")
        lines.append("parity passed" if self.passed else f"parity FAILED: {self.failures()[0]}")
        return lines


@dataclass(frozen=True)
class OnnxConvertResult:
    """Where the package went and what was checked."""

    package_dir: Path
    report: OnnxParityReport


def _load_source(path: Path) -> tuple[onnx.ModelProto, bytes]:
    if path.suffix != ".onnx" or not path.is_file():
        raise OnnxSurgeryError(f"{path}: not an .onnx file")
    data = path.read_bytes()
    if len(data) > _MAX_BYTES:
        raise OnnxSurgeryError(f"{path}: larger than 2 GiB (external data is not supported)")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxSurgeryError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    if any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer):
        raise OnnxSurgeryError(
            f"{path}: tensors stored as external data are not supported; save the model with its tensors "
            "inside (onnx.save_model(model, path, save_as_external_data=False))"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxSurgeryError(f"{path}: onnx.checker rejects it: {str(exc).splitlines()[0]}") from exc
    return model, data


def _input_spec(model: onnx.ModelProto) -> tuple[str, list[int], str]:
    """(name, shape without batch, dtype) of the graph's single input."""
    inits = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxSurgeryError(
            f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); packages made from "
            "ONNX files take one input"
        )
    value = inputs[0]
    tensor = value.type.tensor_type
    if tensor.elem_type not in _DTYPES:
        raise OnnxSurgeryError(
            f"input {value.name!r} is {TensorProto.DataType.Name(tensor.elem_type)}; float32 or int64 only"
        )
    dims = list(tensor.shape.dim)
    if not dims:
        raise OnnxSurgeryError(f"input {value.name!r} has no batch dimension")
    inner = []
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise OnnxSurgeryError(
                f"input {value.name!r} has a dynamic dimension after the batch ({d.dim_param or '?'}); "
                "re-export it with fixed sizes after the batch"
            )
        inner.append(int(d.dim_value))
    return value.name, inner, _DTYPES[tensor.elem_type]


def _inputs(shape: Sequence[int], dtype: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    if dtype == "int64":
        return rng.integers(0, 2, size=(batch, *shape), dtype=np.int64)
    return rng.standard_normal((batch, *shape)).astype(np.float32)


def prepare_graphs(
    source: onnx.ModelProto, options: OnnxConvertOptions
) -> tuple[onnx.ModelProto, onnx.ModelProto, McGraphInfo, list[str]]:
    """(deterministic graph, MC graph, how the MC graph was built, tensors a Dropout was inserted after)."""
    work = source
    inserted: list[str] = []
    if options.add_dropout_before_head is not None:
        target = head_input(work)
        work = insert_dropouts(work, [target], options.add_dropout_before_head)
        inserted.append(target)
    if options.dropout_after:
        assert options.p is not None
        work = insert_dropouts(work, options.dropout_after, options.p)
        inserted.extend(options.dropout_after)
    if not find_dropouts(work):
        raise OnnxSurgeryError(
            "the graph has no Dropout node (exported in eval mode?): add one with "
            "--add-dropout-before-head P or --dropout-after NODE --p P"
        )
    deterministic = deterministic_graph(work)
    mc, info = mc_graph(work, task=options.task, return_samples=True)
    return deterministic, mc, info, inserted


def _check(
    source: onnx.ModelProto,
    deterministic: onnx.ModelProto,
    mc: onnx.ModelProto,
    info: McGraphInfo,
    report: OnnxParityReport,
    spec: tuple[str, list[int], str],
    options: OnnxConvertOptions,
) -> None:
    from .providers import create_session

    name, shape, dtype = spec
    rng = np.random.default_rng(options.seed)
    reference, _ = create_session(inference_reference(source).SerializeToString(), options.device)
    det, provider = create_session(deterministic.SerializeToString(), options.device)
    report.providers = provider.to_dict()
    batches = [_inputs(shape, dtype, b, rng) for b in options.batch_sizes]
    refs = [np.asarray(reference.run(None, {name: x})[0]) for x in batches]
    outs = [np.asarray(det.run(None, {name: x})[0]) for x in batches]
    report.deterministic.append(compare("source (inference) vs deterministic graph", refs, outs, options.tolerance))

    session_a, _ = create_session(mc.SerializeToString(), options.device)
    session_b, _ = create_session(mc.SerializeToString(), options.device)
    x = batches[-1][: min(32, len(batches[-1]))]
    # the z-test's normal approximation of the sample std needs more than a few dozen samples: at least 512
    # (an ONNX Runtime MC call on <= 32 rows is cheap)
    n_samples = max(options.samples, _MIN_TEST_SAMPLES)
    samples = np.array(n_samples, dtype=np.int64)
    # the raw per-sample outputs: logits for classification (their mean is the deterministic output when the
    # tail is linear), values for regression
    want = [SAMPLE_LOGITS if options.task == "classification" else SAMPLES, SEED_USED]
    seeded = [
        session_a.run(want, {name: x, NUM_SAMPLES: samples, "seed": np.array(7, dtype=np.int64)})[0] for _ in range(2)
    ]
    report.seeded_reproduces = bool(np.array_equal(seeded[0], seeded[1]))
    first, second = (session_a.run(want, {name: x, NUM_SAMPLES: samples})[0] for _ in range(2))
    other = session_b.run(want, {name: x, NUM_SAMPLES: samples})[0]
    report.runs_differ = not np.array_equal(first, second)
    report.sessions_differ = not np.array_equal(first, other)
    per_sample = np.asarray(first, dtype=np.float64)  # [T, B, K]
    report.std_within_run = float(per_sample.std(axis=0).mean())
    target = np.asarray(det.run(None, {name: x})[0], dtype=np.float64).reshape(per_sample.shape[1:])
    report.mean_test = z_test(
        "mean output",
        per_sample.mean(axis=0),
        per_sample.std(axis=0),
        n_samples,
        target,
        np.zeros_like(target),
        n_samples,
        alpha=options.alpha,
    )
    report.mean_test_decides = info.head_only
    report.samples = n_samples


def convert_onnx_file(
    path: str | Path,
    *,
    repository: str | Path,
    name: str | None = None,
    options: OnnxConvertOptions | None = None,
) -> OnnxConvertResult:
    """Convert an ONNX file into a new package version (see the module docstring).

    Raises:
        OnnxSurgeryError: unreadable or unsupported graph; `dropwise.package.PackageError`: bad name;
        `dropwise.surgery.providers.ProviderError`: unusable device.
    """
    from dropwise.package import save_graph_package, validate_name

    from .mc_export import output_names

    options = options or OnnxConvertOptions()
    path = Path(path)
    package_name = validate_name(name or path.stem)
    source, data = _load_source(path)
    spec = _input_spec(source)
    deterministic, mc, info, inserted = prepare_graphs(source, options)
    report = OnnxParityReport(
        name=package_name,
        version=0,
        task=options.task,
        source=path.name,
        sites=[s.to_dict() for s in info.sites],
        inserted=inserted,
        graph=info.to_dict(),
    )
    _check(source, deterministic, mc, info, report, spec, options)
    # where ONNX Runtime's CUDA provider would put the MC graph's nodes (static count, no GPU needed)
    report.graph["cuda_placement"] = {
        "as_written": placement(mc).to_dict()["cpu_nodes"],
        "after_cuda_rewrite": placement(cuda_compatible(mc)).to_dict()["cpu_nodes"],
    }
    surgery = ["onnx"]
    if options.add_dropout_before_head is not None:
        surgery.append(f"mc:head_dropout={options.add_dropout_before_head}")
    if options.dropout_after:
        surgery.append(f"mc:dropout_after={','.join(options.dropout_after)}:p={options.p}")
    export = {
        "model.onnx": {"flavour": "deterministic", "folded": True, "output": deterministic.graph.output[0].name},
        "model.mc.onnx": {
            "flavour": "mc",
            "default_samples": options.samples,
            "outputs": output_names(options.task, True),
            **info.to_dict(),
        },
        "parity": {"passed": report.passed, "tolerance": options.tolerance, "file": "parity.json"},
    }
    record = {
        "format": "onnx",
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "opset": next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{source.producer_name} {source.producer_version}".strip(),
    }
    input_name, shape, dtype = spec
    package_dir = save_graph_package(
        repository,
        package_name,
        {
            "model.onnx": deterministic.SerializeToString(),
            "model.mc.onnx": mc.SerializeToString(),
            "parity.json": b"",
        },
        task=options.task,  # type: ignore[arg-type]
        input_shape=shape,
        input_dtype=dtype,  # type: ignore[arg-type]
        input_name=input_name,
        architecture={"factory": GRAPH_ONLY_FACTORY, "kwargs": {}},
        sites=report.sites,
        surgery=surgery,
        extra={"export": export, "source": record},
    )
    from dropwise.package import add_file

    report.version = int(package_dir.name)
    add_file(package_dir, "parity.json", report.to_json().encode())
    return OnnxConvertResult(package_dir=package_dir, report=report)
