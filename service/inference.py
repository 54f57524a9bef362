"""`InferenceService`: the one object every route talks to (held on `app.state.inference`).

It owns the loaded runtimes (one per model version) and their dynamic batchers, validates requests
(shape, dtype, NaN/Inf, T limit) and turns them into batched work. Routes only translate HTTP to an
`InferenceRequest` and an `InferenceResult` back to HTTP; the native and V2 APIs share everything here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dropwise.package import InputSpec
from dropwise.service.abstention import abstain_flags, resolve_rule
from dropwise.service.batcher import Job
from dropwise.service.body_parsing import as_numeric_array
from dropwise.service.errors import InvalidInput, ModelNotFound, ModelNotReady, PayloadTooLarge, ServiceError
from dropwise.service.metrics import ServiceMetrics
from dropwise.service.model_control import LoadedVersion, ModelControl
from dropwise.service.model_inputs import ModelInputs, batch_rows
from dropwise.service.repository import ModelRepository
from dropwise.service.runtimes.base import MCGroup, PackageSpec
from dropwise.service.settings import Settings
from dropwise.service.tracing import Trace
from dropwise.surgery.outputs import ABSTAIN, NUM_SAMPLES, output_names

log = logging.getLogger("dropwise.service")

MODES: tuple[str, ...] = ("deterministic", "mc")
MAX_SEED = 2**63 - 1
#: draws the seed of a request that names none: a fast generator seeded once from the OS (a seed must
#: differ between requests, not be secret), instead of one `os.urandom` call per request
_SEEDS = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _SEEDS.seed(secrets.randbits(128)))  # a forked worker: its own seeds

__all__ = ["InferenceRequest", "InferenceResult", "InferenceService", "ModelInfo"]


@dataclass
class InferenceRequest:
    """One prediction request, already decoded from HTTP.

    `num_samples` (T) None means the configured default T; `seed` None draws a fresh seed (reported back);
    `deadline_s` is a timeout in seconds counted from submission (None: the configured request timeout).
    `abstain` ("auto" or a threshold, MC classification only) adds the per-row `abstain` output
    (`dropwise.service.abstention`).
    """

    model: str
    inputs: Any  #: one array-like, or {name: array-like} for a model with several named inputs
    version: int | None = None
    mode: str = "deterministic"
    num_samples: int | None = None
    seed: int | None = None
    return_samples: bool = False
    deadline_s: float | None = None
    abstain: str | float | None = None
    trace: Trace | None = None  #: per-step timestamps when tracing is on (`dropwise.service.tracing`)


@dataclass
class InferenceResult:
    """Named numpy outputs of one request plus where and how it ran (`num_samples` = T, MC only)."""

    model: str
    version: int
    mode: str
    outputs: dict[str, np.ndarray]
    backend: str
    device: str
    provider: str
    num_samples: int | None = None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """Public description of one model version (what `GET /v1/models/{name}` and V2 metadata show)."""

    name: str
    version: int
    versions: tuple[int, ...]
    task: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: str
    labels: tuple[str, ...] | None
    sites: tuple[dict[str, Any], ...]
    backend: str
    device: str
    provider: str
    ready: bool
    mc_available: bool
    max_samples: int
    default_samples: int
    placement: dict[str, Any] | None = None  #: ONNX Runtime on CUDA: MC graph nodes left to the CPU
    evaluation: dict[str, Any] | None = None  #: `dropwise evaluate`'s summary from the manifest, when run
    calibrated: bool = False  #: classification probabilities are temperature-scaled (`dropwise evaluate`)
    #: every named input in ``forward`` order; ``input_*`` above describe the first (the only one for most)
    inputs: tuple[InputSpec, ...] = ()

    def input_specs(self) -> list[InputSpec]:
        """Every input of the model (one built from ``input_*`` for a package that lists none)."""
        if self.inputs:
            return list(self.inputs)
        return [
            InputSpec(
                name=self.input_name,
                shape=list(self.input_shape),
                dtype=self.input_dtype,
                preprocessing=self.preprocessing,
            )
        ]

    def output_names(self, mode: str, return_samples: bool = False, abstain: bool = False) -> list[str]:
        """Output tensor names for `mode`, in the order of the table `dropwise.surgery.outputs`.

        Classification: `probabilities`, `predictions`, and in MC mode the uncertainty summaries;
        regression: `mean`, and in MC mode `std`. `samples` last, in MC mode when `return_samples`.
        """
        return output_names(self.task, mode, return_samples, abstain)


class InferenceService:
    """Serves the model versions `ModelControl` loads: batches requests per version and runs them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.repository = ModelRepository(settings.repository)
        self.control = ModelControl(settings, self.metrics, self.repository)

    @property
    def _models(self) -> dict[str, dict[int, LoadedVersion]]:
        return self.control.models

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load every model's chosen versions, warmed up, one batcher each (see `ModelControl`)."""
        await self.control.start()

    async def stop(self) -> None:
        """Stop every batcher (pending requests are answered with 503)."""
        await self.control.stop()

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown of every batcher at once (see `ModelBatcher.drain`)."""
        batchers = [slot.batcher for versions in self._models.values() for slot in versions.values()]
        await asyncio.gather(*(b.drain(grace_s) for b in batchers))

    # ---------------------------------------------------------------- queries
    def ready(self) -> bool:
        """True when at least one model is served and every model found serves a version (swaps included).

        A refused or failing new version of a model that still serves an older one does not make the
        server unready (it is listed by `/readyz` and the repository index); a model with no servable
        version does.
        """
        return self.control.ready()

    def waiting_for(self) -> str | None:
        """Why the service is not ready, in a few words (None when it is): what `/readyz` reports."""
        control = self.control
        if control.ready():
            return None
        served = {name for name, versions in control.models.items() if versions}
        if control.loading:
            names = ", ".join(f"{name} v{version}" for name, version in sorted(control.loading))
            total = len(control.found) if control.found else "?"
            return f"loading {names} ({len(served)} of {total} models served)"
        if not control.started:
            return "scanning the repository" if not control.found else "loading the models"
        missing = sorted(control.expected - control.unloaded - served)
        if missing:
            reasons = [f"{name}/{v}: {why}" for (name, v), (_, why) in sorted(control.failed.items())]
            reasons += [f"{key}: {why}" for key, why in sorted(self.repository.errors.items())]
            return f"models with no servable version: {', '.join(missing)}" + (
                f" ({'; '.join(reasons)})" if reasons else ""
            )
        return f"model packages in {self.settings.repository} (none found)"

    def has_model(self, name: str) -> bool:
        """Whether `name` is a model of the repository (loaded or not)."""
        return name in self._models

    def models(self) -> list[ModelInfo]:
        """Every model at its latest version, sorted by name."""
        return [self.info(name) for name in sorted(self._models)]

    def info(self, name: str, version: int | None = None) -> ModelInfo:
        """Describe one model version (latest when `version` is None); raises `ModelNotFound`."""
        slot = self._slot(name, version, describe=True)
        spec = slot.spec
        runtime = slot.runtime
        settings = slot.settings
        return ModelInfo(
            name=spec.name,
            version=spec.version,
            versions=tuple(sorted(self._models.get(name, {spec.version: slot}))),
            task=spec.task,
            input_name=spec.input_name,
            input_shape=spec.input_shape,
            input_dtype=spec.input_dtype,
            preprocessing=spec.preprocessing,
            labels=spec.labels,
            sites=spec.sites,
            backend=runtime.backend,
            device=runtime.device,
            provider=runtime.provider,
            ready=slot.serving,
            mc_available=bool(runtime.supports_mc),
            max_samples=settings.max_samples,
            default_samples=min(settings.default_samples, settings.max_samples),
            inputs=spec.inputs,
            placement=(getattr(runtime, "provider_info", None) or {}).get("mc_placement"),
            evaluation=spec.manifest.get("evaluation"),
            calibrated=spec.calibrated,
        )

    def _slot(self, name: str, version: int | None, *, describe: bool = False) -> LoadedVersion:
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ModelNotFound(f"model {name!r} has no version {version!r}", field="version")
        if version is None:
            slot = self.control.lookup(name, None)
        else:
            slot = self.control.describe(name, version) if describe else self.control.lookup(name, version)
        if slot is not None:
            return slot
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model {name!r}", field="model")
        raise ModelNotFound(
            f"model {name!r} has no version {version!r} (versions: {sorted(versions)})", field="version"
        )

    def spec(self, name: str, version: int | None = None) -> PackageSpec:
        """The package spec of a served model version (latest when `version` is None); raises `ModelNotFound`."""
        return self._slot(name, version, describe=True).runtime.spec

    def admit(self, name: str, version: int | None = None) -> None:
        """Refuse up front, before the body is read or parsed: unknown model (404), not loaded or shutting
        down (503), queue full (429 with Retry-After)."""
        slot = self._slot(name, version)  # an unknown model is nobody's request: 404, no statistics
        try:
            if not slot.serving:
                raise ModelNotReady(f"model {name!r} version {slot.spec.version} is not loaded")
            slot.batcher.admit()
        except ServiceError:  # refused before its body is read, still a failed request of this version
            slot.statistics.record_request(False, 0.0)
            raise

    # ---------------------------------------------------------------- inference
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Validate, queue and run one request; raises a `ServiceError` subclass on any failure."""
        started = time.perf_counter()
        mode_label = request.mode if request.mode in MODES else "invalid"
        result: InferenceResult | None = None
        try:
            result = await self._infer(request, started)
            return result
        finally:  # answers are counted by the app's middleware; this is the inference latency
            elapsed = time.perf_counter() - started
            model_label = request.model if request.model in self._models else "_unknown"
            self.metrics.observe_latency(model_label, mode_label, elapsed)
            self._count(request, result, elapsed)

    def _count(self, request: InferenceRequest, result: InferenceResult | None, elapsed: float) -> None:
        """Add one answered request to its model version's statistics (none for unknown models)."""
        if result is not None:
            slot = self.control.describe(result.model, result.version)
            queue_s = result.timings.get("queue_ms", 0.0) / 1000.0
            compute_s = result.timings.get("compute_ms", 0.0) / 1000.0
        else:
            try:
                slot = self._slot(request.model, request.version, describe=True)
            except ServiceError:
                return
            queue_s = compute_s = 0.0
        if slot is not None:
            slot.statistics.record_request(result is not None, elapsed, queue_s, compute_s)

    async def _infer(self, request: InferenceRequest, started: float) -> InferenceResult:
        slot = self._slot(request.model, request.version)
        if not slot.serving:
            raise ModelNotReady(f"model {request.model!r} version {slot.spec.version} is not loaded")
        spec = slot.runtime.spec
        settings = slot.settings
        if request.mode not in MODES:
            raise InvalidInput(f"mode must be one of {list(MODES)}, got {request.mode!r}", field="mode")
        x = validate_inputs(request.inputs, spec, max_rows=self.settings.max_rows_per_request)
        group: MCGroup | None = None
        samples: int | None = None
        seed: int | None = None
        if request.mode == "mc":
            if not slot.runtime.supports_mc:
                raise InvalidInput(
                    f"model {spec.name!r} has no MC-dropout path on backend {slot.runtime.backend!r}",
                    field="mode",
                )
            if request.return_samples and not slot.runtime.mc_returns_samples:
                raise InvalidInput(
                    f"model {spec.name!r} on {slot.runtime.backend} cannot return per-sample outputs "
                    "(its MC graph was exported without them)",
                    field="return_samples",
                )
            samples = self._check_samples(request.num_samples, settings)
            limit, rows = self.settings.max_mc_sample_rows, batch_rows(x)
            if rows * samples > limit:
                raise PayloadTooLarge(
                    f"{rows} rows x T={samples} = {rows * samples} sample-rows exceeds the limit of "
                    f"{limit} sample-rows per MC request (max_mc_sample_rows); send fewer rows or a smaller T",
                    field=NUM_SAMPLES,
                )
            seed = self._check_seed(request.seed)
            group = MCGroup(
                rows=batch_rows(x), num_samples=samples, seed=seed, return_samples=bool(request.return_samples)
            )
        timeout = settings.request_timeout_s if request.deadline_s is None else float(request.deadline_s)
        if not timeout > 0:
            raise InvalidInput("deadline must be a positive number of seconds", field="timeout")
        rule = None if request.abstain is None else resolve_rule(spec, request.abstain, request.mode)
        job = Job(x=x, mode=request.mode, group=group, deadline=time.monotonic() + timeout, trace=request.trace)
        outputs = await slot.batcher.submit(job)
        if rule is not None:
            outputs = {**outputs, ABSTAIN: abstain_flags(outputs, *rule)}
        total = time.perf_counter() - started
        return InferenceResult(
            model=spec.name,
            version=spec.version,
            mode=request.mode,
            outputs=outputs,
            backend=slot.runtime.backend,
            device=slot.runtime.device,
            provider=slot.runtime.provider,
            num_samples=samples,
            seed=seed,
            timings={
                "queue_ms": job.queue_s * 1000.0,
                "compute_ms": job.compute_s * 1000.0,
                "total_ms": total * 1000.0,
                "batch_rows": float(job.batch_rows),
            },
        )

    @staticmethod
    def _check_samples(samples: int | None, settings: Settings) -> int:
        if samples is None:
            return min(settings.default_samples, settings.max_samples)
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
            raise InvalidInput(f"{NUM_SAMPLES} must be an integer, got {samples!r}", field=NUM_SAMPLES)
        if not 1 <= int(samples) <= settings.max_samples:
            raise InvalidInput(
                f"{NUM_SAMPLES} (T) must be between 1 and {settings.max_samples}, got {samples}",
                field=NUM_SAMPLES,
            )
        return int(samples)

    @staticmethod
    def _check_seed(seed: int | None) -> int:
        if seed is None:
            return _SEEDS.getrandbits(31)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidInput(f"seed must be an integer, got {seed!r}", field="seed")
        if not 0 <= int(seed) <= MAX_SEED:
            raise InvalidInput(f"seed must be between 0 and {MAX_SEED}, got {seed}", field="seed")
        return int(seed)


_FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
_INT_DTYPES = {"int64": np.int64, "int32": np.int32}


def validate_inputs(inputs: Any, spec: PackageSpec, *, max_rows: int, field_name: str = "inputs") -> ModelInputs:
    """Check a request's inputs against the package's input specs and return them in the model's dtypes.

    A one-input model takes one array (or ``{name: array}``) and gets one array back; a model with several
    named inputs takes ``{name: array}`` with every name and gets a tuple in the manifest's order, all with
    the same number of rows. Raises `InvalidInput` naming the field for a missing or unknown input, a wrong
    shape, dtype, NaN/Inf, or an index outside an integer input's range.
    """
    specs = spec.inputs
    if len(specs) <= 1:
        if isinstance(inputs, dict):
            if set(inputs) != {spec.input_name}:
                raise InvalidInput(
                    f"model {spec.name!r} takes one input {spec.input_name!r}, got {sorted(inputs)}",
                    field=field_name,
                )
            inputs = inputs[spec.input_name]
        return _validate_array(
            inputs,
            spec.sample_shape,
            spec.input_dtype,
            spec.input_range,
            max_rows=max_rows,
            field_name=field_name,
        )
    names = [s.name for s in specs]
    if not isinstance(inputs, dict):
        raise InvalidInput(
            f"model {spec.name!r} takes several inputs {names}: send an object mapping each name to its array",
            field=field_name,
        )
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise InvalidInput(
            f"model {spec.name!r} takes inputs {names}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else ""),
            field=field_name,
        )
    arrays = tuple(
        _validate_array(
            inputs[s.name],
            tuple(s.shape[1:]),
            s.dtype,
            s.range,
            max_rows=max_rows,
            field_name=f"{field_name}.{s.name}",
        )
        for s in specs
    )
    rows = {a.shape[0] for a in arrays}
    if len(rows) > 1:
        raise InvalidInput(
            f"every input must have the same number of rows, got {[a.shape[0] for a in arrays]}",
            field=field_name,
        )
    return arrays


def _validate_array(
    inputs: Any,
    expected: tuple[int, ...],
    dtype: str,
    vocab: tuple[int, int] | None,
    *,
    max_rows: int,
    field_name: str,
) -> np.ndarray:
    """One input array checked against its shape (without the batch), dtype and integer range; booleans
    are refused (numpy would read `true` as 1.0)."""
    x = as_numeric_array(inputs, field_name=field_name)
    wanted = f"[batch, {', '.join(map(str, expected))}]"
    if x.dtype == object or x.dtype.kind in "USV":
        raise InvalidInput(
            f"inputs must be numbers of dtype {dtype} shaped {wanted}",
            field=field_name,
        )
    if x.ndim != len(expected) + 1:
        raise InvalidInput(f"inputs must have shape {wanted}, got {list(x.shape)}", field=field_name)
    if x.shape[0] < 1:
        raise InvalidInput("inputs must hold at least one example", field=field_name)
    if x.shape[0] > max_rows:
        raise InvalidInput(f"at most {max_rows} examples per request, got {x.shape[0]}", field=field_name)
    for got, want in zip(x.shape[1:], expected, strict=True):
        if want != -1 and got != want:
            raise InvalidInput(
                f"inputs must have shape {wanted}, got {list(x.shape)}",
                field=field_name,
            )
    if dtype in _INT_DTYPES:
        integral = x.dtype.kind in "iu" or (
            x.dtype.kind == "f" and bool(np.all(np.isfinite(x))) and bool(np.all(x == np.round(x)))
        )
        if not integral:
            raise InvalidInput(
                f"inputs must be integers (token ids, dtype {dtype}), got {x.dtype}",
                field=field_name,
            )
        x = x.astype(_INT_DTYPES[dtype])
        if vocab is not None and (x.min() < vocab[0] or x.max() >= vocab[1]):
            raise InvalidInput(
                f"token ids must lie in [{vocab[0]}, {vocab[1]}), got values in [{x.min()}, {x.max()}]",
                field=field_name,
            )
        return np.ascontiguousarray(x)
    if x.dtype.kind not in "iuf":
        raise InvalidInput(f"inputs must be numbers (dtype {dtype}), got {x.dtype}", field=field_name)
    x = x.astype(_FLOAT_DTYPES.get(dtype, np.float32))
    if not np.all(np.isfinite(x)):
        raise InvalidInput("inputs contain NaN or Inf", field=field_name)
    return np.ascontiguousarray(x)
