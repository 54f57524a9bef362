"""Open Inference Protocol routes (KServe V2 / Triton REST) with the binary tensor data extension.

Health, server and model metadata, model readiness and inference. The official Triton HTTP client sends no
Content-Type and by default puts tensors after the JSON header (``Inference-Header-Content-Length``), so the
infer route reads the raw body and decodes it with :mod:`dropwise.service.v2_codec` instead of a pydantic model.

Per-request settings travel in the request's ``parameters``: ``mode`` ("deterministic" | "mc"),
``num_samples`` (T; ``samples`` is accepted as a deprecated alias), ``seed``, ``return_samples``,
``abstain`` ("auto" or a threshold: adds the BOOL output ``abstain``), plus the
protocol's own ``binary_data_output`` and
``timeout`` (microseconds, as the Triton client sends it). Every failure answers ``{"error": "..."}`` with a
4xx status for bad input; nothing a client sends gives a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
from dropwise.service import tracing
from dropwise.service.body_parsing import ParsingPool
from dropwise.service.deps import ApiToken
from dropwise.service.errors import InvalidInput, ModelNotReady, ServiceError
from dropwise.service.inference import MODES, InferenceRequest, InferenceService, ModelInfo
from dropwise.service.middleware import label_mode
from dropwise.service.v2_codec import (
    DecodedRequest,
    TensorInput,
    datatype_of,
    decode_body,
    decompress_body,
    encode_response,
    parse_header_length,
)
from dropwise.surgery.outputs import NUM_SAMPLES, output_shape
from dropwise.surgery.outputs import spec as output_spec
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

__all__ = ["SERVER_EXTENSIONS", "router"]

router = APIRouter(tags=["Open Inference Protocol (V2)"])

SERVER_NAME = "dropwise"
SERVER_EXTENSIONS = [
    "binary_tensor_data",
    "parameters",
    "model_repository",
    "model_configuration",
    "statistics",
]
#: Request parameters this server understands; anything else is refused so a typo never goes unnoticed.
_KNOWN_PARAMETERS = frozenset(
    {"mode", NUM_SAMPLES, "samples", "seed", "return_samples", "abstain", "binary_data_output", "timeout", "priority"}
    | {"sequence_id", "sequence_start", "sequence_end"}
)
_MC_ONLY_PARAMETERS = (NUM_SAMPLES, "samples", "return_samples", "abstain")
#: Longest request timeout accepted (one day, in microseconds as the Triton client sends it).
_MAX_TIMEOUT_US = 86_400 * 1_000_000
#: Bodies above this size are decoded and encoded in a worker thread so the event loop stays free.
_THREAD_THRESHOLD = 256 * 1024
#: Responses smaller than this are never compressed, even when the client accepts it.
_COMPRESS_MIN_BYTES = 1024


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


def _path_version(request: Request) -> int | None:
    """The ``{version}`` path segment as a positive integer (None on the unversioned routes)."""
    version = request.path_params.get("version")
    if version is None:
        return None
    if not (version.isascii() and version.isdigit() and len(version) <= 18) or int(version) < 1:
        raise InvalidInput(f"model version must be a positive integer, got {version[:40]!r}", field="version")
    return int(version)


def _datatype_for(dtype: str) -> str:
    try:
        return datatype_of(np.dtype(dtype))
    except (TypeError, ValueError):
        return "FP32"


def _output_specs(info: ModelInfo) -> list[dict[str, Any]]:
    """Every output a model can answer, with its datatype and shape (-1 = dynamic), from the output table."""
    width = len(info.labels) if info.task == "classification" and info.labels else None
    names = info.output_names(
        "mc" if info.mc_available else "deterministic", info.mc_available, abstain=info.mc_available
    )
    return [
        {
            "name": name,
            "datatype": datatype_of(np.dtype(output_spec(name).dtype)),
            "shape": output_shape(name, info.task, width),
        }
        for name in names
    ]


def _model_metadata(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "versions": [str(v) for v in info.versions],
        "platform": f"dropwise_{info.backend}",
        "inputs": [
            {"name": spec.name, "datatype": _datatype_for(spec.dtype), "shape": [-1, *spec.shape[1:]]}
            for spec in info.input_specs()
        ],
        "outputs": _output_specs(info),
        "parameters": {
            "version": str(info.version),
            "task": info.task,
            "labels": list(info.labels) if info.labels else None,
            "backend": info.backend,
            "device": info.device,
            "mc_available": info.mc_available,
            "default_samples": info.default_samples,
            "max_samples": info.max_samples,
            "modes": list(MODES) if info.mc_available else ["deterministic"],
        },
    }


# ---------------------------------------------------------------------------------------------- health
async def live() -> Response:
    """200 while the process answers."""
    return Response(status_code=200)


async def ready(request: Request) -> Response:
    """200 once every model of the repository is loaded (never with zero models), else 503."""
    if not _service(request).ready():
        raise ModelNotReady("server is not ready: models are loading, failed, or none are served")
    return Response(status_code=200)


async def server_metadata() -> dict[str, Any]:
    """Server name, version and the protocol extensions it implements."""
    try:
        version = metadata.version("dropwise")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": SERVER_EXTENSIONS}


# ---------------------------------------------------------------------------------------------- models
async def model_metadata(request: Request, model: str) -> Response:
    """Name, versions, platform, input and output tensors (-1 marks a dynamic dimension)."""
    info = _service(request).info(model, _path_version(request))
    return JSONResponse(_model_metadata(info))


async def model_ready(request: Request, model: str) -> Response:
    """200 when the model version is loaded, 404 when unknown, 503 when it failed to load."""
    info = _service(request).info(model, _path_version(request))
    if not info.ready:
        raise ModelNotReady(f"model {model!r} version {info.version} is not loaded")
    return Response(status_code=200)


# ---------------------------------------------------------------------------------------------- infer
def _strict_int(parameters: Mapping[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameters.{name} must be an integer, got {value!r}", field=name)
    return value


def _strict_bool(parameters: Mapping[str, Any], name: str) -> bool | None:
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"parameters.{name} must be true or false, got {value!r}", field=name)
    return value


class _Plan:
    """What a decoded request asks for, checked against the model before any work is queued."""

    def __init__(self, decoded: DecodedRequest, info: ModelInfo) -> None:
        params = decoded.parameters
        unknown = sorted(set(params) - _KNOWN_PARAMETERS)
        if unknown:
            raise InvalidInput(
                f"unknown parameter(s) {unknown}; this server understands {sorted(_KNOWN_PARAMETERS)}",
                field="parameters",
            )
        if _strict_int(params, "sequence_id") or _strict_bool(params, "sequence_start"):
            raise InvalidInput("sequence batching is not supported: the models are stateless", field="sequence_id")
        _strict_int(params, "priority")
        mode = params.get("mode", "deterministic")
        if mode not in MODES:
            raise InvalidInput(f"parameters.mode must be one of {list(MODES)}, got {mode!r}", field="mode")
        self.mode: str = mode
        self.num_samples = _strict_int(params, NUM_SAMPLES)
        alias = _strict_int(params, "samples")
        if alias is not None:
            if self.num_samples is not None:
                raise InvalidInput(
                    f"give parameters.{NUM_SAMPLES} only (parameters.samples is its deprecated alias)",
                    field=NUM_SAMPLES,
                )
            self.num_samples = alias
        self.seed = _strict_int(params, "seed")
        return_samples = bool(_strict_bool(params, "return_samples"))
        if mode == "deterministic":
            given = [name for name in _MC_ONLY_PARAMETERS if params.get(name) is not None]
            if given:
                raise InvalidInput(
                    f"parameters {given} apply to MC dropout only: add parameters.mode = 'mc'", field=given[0]
                )
        timeout_us = _strict_int(params, "timeout")
        if timeout_us is not None and not 0 < timeout_us <= _MAX_TIMEOUT_US:
            raise InvalidInput(
                f"parameters.timeout must be between 1 and {_MAX_TIMEOUT_US} microseconds", field="timeout"
            )
        self.deadline_s: float | None = None if timeout_us is None else timeout_us / 1e6
        self.binary_default = bool(_strict_bool(params, "binary_data_output"))

        requested = decoded.outputs
        if requested is not None and any(o.name == "samples" for o in requested):
            return_samples = True
        self.return_samples = return_samples
        self.abstain = params.get("abstain")  # "auto" or a threshold, checked by the service
        available = info.output_names(mode, return_samples, abstain=self.abstain is not None)
        if requested:
            names = [o.name for o in requested]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise InvalidInput(f"outputs {duplicates} requested twice", field="outputs")
            missing = [n for n in names if n not in available]
            if missing:
                raise InvalidInput(
                    f"unknown output(s) {missing} for mode {mode!r}; available: {available}", field="outputs"
                )
            self.outputs = [(o.name, self.binary_default if o.binary is None else o.binary) for o in requested]
        else:
            self.outputs = [(n, self.binary_default) for n in available]

        self.inputs = _model_inputs(decoded.inputs, info)


def _model_inputs(tensors: list[TensorInput], info: ModelInfo) -> Any:
    """The request's input tensors matched to the model's inputs by name and datatype: one array for a
    one-input model, ``{name: array}`` for a model with several (checked further by the service)."""
    specs = info.input_specs()
    names = [spec.name for spec in specs]
    given = [t.name for t in tensors]
    if sorted(given) != sorted(names):
        duplicates = sorted({n for n in given if given.count(n) > 1})
        unknown = sorted(set(given) - set(names))
        missing = [n for n in names if n not in given]
        problems = [
            f"{label} {values}"
            for label, values in (("missing", missing), ("unknown", unknown), ("repeated", duplicates))
            if values
        ]
        raise InvalidInput(
            f"model {info.name!r} takes input(s) {names}; got {given} ({', '.join(problems)})", field="inputs"
        )
    by_name = {t.name: t for t in tensors}
    for spec in specs:
        expected = _datatype_for(spec.dtype)
        tensor = by_name[spec.name]
        if tensor.datatype != expected:
            raise InvalidInput(
                f"input {tensor.name!r} has datatype {tensor.datatype}; model {info.name!r} expects {expected}",
                field="datatype",
            )
    if len(specs) == 1:
        return by_name[names[0]].data
    return {name: by_name[name].data for name in names}


def _compression(request: Request, size: int) -> str | None:
    if size < _COMPRESS_MIN_BYTES:
        return None
    accepted = [part.split(";")[0].strip().lower() for part in request.headers.get("accept-encoding", "").split(",")]
    for name in ("gzip", "deflate"):
        if name in accepted:
            return name
    return None


async def _infer(request: Request, model: str) -> Response:
    service = _service(request)
    info = service.info(model, _path_version(request))
    service.admit(info.name, info.version)  # 429 / 503 before a byte of the body is read
    limit = service.settings.max_body_bytes
    raw = await request.body()  # bounded (413) and timed (408) by the body guard middleware
    trace = tracing.of(request.scope)
    tracing.mark(trace, "body")
    body = decompress_body(raw, request.headers.get("content-encoding"), limit)
    header_length = parse_header_length(request.headers.get("inference-header-content-length"), len(body))
    parsing: ParsingPool = request.app.state.parsing
    decoded = await parsing.run(decode_body, body, header_length)  # off the event loop when large
    plan = _Plan(decoded, info)
    tracing.mark(trace, "parsed")
    label_mode(request, plan.mode)
    result = await service.infer(
        InferenceRequest(
            model=info.name,
            # unversioned: the latest version when queued (a hot swap during the body read loses nothing)
            version=_path_version(request),
            inputs=plan.inputs,
            mode=plan.mode,
            num_samples=plan.num_samples,
            seed=plan.seed,
            return_samples=plan.return_samples,
            abstain=plan.abstain,
            deadline_s=plan.deadline_s,
            trace=trace,
        )
    )
    missing = [name for name, _ in plan.outputs if name not in result.outputs]
    if missing:
        raise ServiceError(f"the runtime produced no output {missing}", status=500)
    outputs = [(name, np.asarray(result.outputs[name]), binary) for name, binary in plan.outputs]
    parameters: dict[str, Any] = {"mode": result.mode, "backend": result.backend, "device": result.device}
    if result.mode == "mc":
        parameters.update({NUM_SAMPLES: result.num_samples, "seed": result.seed})
    size = sum(array.nbytes for _, array, _ in outputs)
    encoding = _compression(request, size)
    args = (result.model, str(result.version), outputs)
    options: dict[str, Any] = {"request_id": decoded.id, "parameters": parameters, "compression": encoding}
    if size > _THREAD_THRESHOLD:
        encoded = await asyncio.to_thread(encode_response, *args, **options)
    else:
        encoded = encode_response(*args, **options)
    tracing.mark(trace, "encoded")
    headers = encoded.headers
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return Response(encoded.body, headers=headers)


async def infer(request: Request, model: str) -> Response:
    """Run a deterministic or MC-dropout prediction.

    Body: a V2 inference request, JSON alone or JSON followed by binary tensors (set
    ``Inference-Header-Content-Length``). ``parameters``: ``mode``, ``num_samples`` (T), ``seed``,
    ``return_samples``, ``binary_data_output``, ``timeout`` (µs). Outputs: ``probabilities``,
    ``predictions`` (or ``mean``), and for MC ``predictive_entropy``, ``expected_entropy``,
    ``mutual_information``, ``variation_ratio``, ``std``, ``samples``.
    """
    return await _infer(request, model)


_BODY_DOC = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}
_V2_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
#: every status an Open Inference route may answer with an error, in the protocol's `{"error": "..."}` form
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": _V2_ERROR_SCHEMA}}}
    for status, description in (
        (400, "Invalid request (the message names the field)."),
        (401, "Missing or wrong bearer token (when DROPWISE_API_TOKEN is set)."),
        (404, "Unknown model or version."),
        (408, "The body was not sent in time."),
        (413, "Body or MC work over the limit."),
        (415, "Unsupported Content-Encoding."),
        (422, "Malformed path parameter."),
        (429, "Queue full; see Retry-After."),
        (503, "Not ready, or shutting down."),
        (504, "Not answered before the deadline."),
    )
}
#: health routes answer an empty body: 200 when true, an error otherwise
_EMPTY_OK: dict[int | str, dict[str, Any]] = {200: {"description": "Yes (empty body)."}, **_ERRORS}


def _route(path: str, endpoint: Any, method: str, summary: str, **extra: Any) -> None:
    router.add_api_route(path, endpoint, methods=[method], summary=summary, **{"responses": _ERRORS, **extra})


# Inference first: the busiest route is matched before the others.
_route(
    "/v2/models/{model}/infer",
    infer,
    "POST",
    "Inference (latest version)",
    dependencies=[ApiToken],
    openapi_extra=_BODY_DOC,
)
_route(
    "/v2/models/{model}/versions/{version}/infer",
    infer,
    "POST",
    "Inference",
    dependencies=[ApiToken],
    openapi_extra=_BODY_DOC,
)
_route("/v2/health/live", live, "GET", "Server liveness", response_class=Response, responses=_EMPTY_OK)
_route("/v2/health/ready", ready, "GET", "Server readiness", response_class=Response, responses=_EMPTY_OK)
_route("/v2", server_metadata, "GET", "Server metadata")
_route("/v2/models/{model}", model_metadata, "GET", "Model metadata (latest version)", dependencies=[ApiToken])
_route("/v2/models/{model}/versions/{version}", model_metadata, "GET", "Model metadata", dependencies=[ApiToken])
_route(
    "/v2/models/{model}/ready",
    model_ready,
    "GET",
    "Model readiness (latest version)",
    response_class=Response,
    responses=_EMPTY_OK,
)
_route(
    "/v2/models/{model}/versions/{version}/ready",
    model_ready,
    "GET",
    "Model readiness",
    response_class=Response,
    responses=_EMPTY_OK,
)
