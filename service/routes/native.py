"""The native API: list and describe models, deterministic and MC-dropout predictions.

The predict routes read the raw body themselves, after refusing what can be refused without it (unknown
model 404, model not loaded or shutting down 503, queue full 429 with Retry-After), and parse and validate
it off the event loop when it is large (over 256 KiB), so one big body never stalls other requests or
`/healthz`. The OpenAPI schema still documents the `PredictRequest` body.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from dropwise.service import tracing
from dropwise.service.body_parsing import BodyValidationFailed, ParsingPool, parse_predict
from dropwise.service.deps import ApiToken
from dropwise.service.errors import InvalidInput
from dropwise.service.examples import example_request, preprocess
from dropwise.service.inference import InferenceRequest, InferenceResult, InferenceService, ModelInfo
from dropwise.service.middleware import label_mode
from dropwise.service.schemas import (
    PREDICT_EXAMPLES,
    ErrorBody,
    InputSpecOut,
    ModelDetail,
    ModelList,
    ModelSummary,
    PredictRequest,
    PredictResponse,
    Uncertainty,
)
from dropwise.surgery.outputs import NUM_SAMPLES
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError

router = APIRouter(prefix="/v1", tags=["native"], dependencies=[ApiToken])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Invalid input (the field is named)."},
    404: {"model": ErrorBody, "description": "Unknown model or version."},
    413: {"model": ErrorBody, "description": "Body over the size limit."},
    422: {"model": ErrorBody, "description": "Request body does not match the schema."},
    408: {"model": ErrorBody, "description": "The body was not sent in time (stalled upload)."},
    429: {"model": ErrorBody, "description": "Queue full; see Retry-After."},
    503: {"model": ErrorBody, "description": "Model not loaded, or the server is shutting down."},
    504: {"model": ErrorBody, "description": "Not answered before the deadline."},
}
#: Bodies (and answers) larger than this are parsed (encoded) in a worker thread.
_THREAD_THRESHOLD = 256 * 1024
_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}"),
                "examples": PREDICT_EXAMPLES,
            }
        },
    }
}

ModelName = Annotated[str, Path(description="Model name as listed by GET /v1/models.", examples=["mlp_digits"])]
Version = Annotated[int, Path(description="Numeric package version.", examples=[1])]


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


def _detail(info: ModelInfo) -> ModelDetail:
    inputs = [
        InputSpecOut(
            name=spec.name,
            shape=list(spec.shape),
            dtype=spec.dtype,
            preprocessing=spec.preprocessing,
            range=list(spec.range) if spec.range else None,
        )
        for spec in info.input_specs()
    ]
    return ModelDetail(
        name=info.name,
        version=info.version,
        versions=list(info.versions),
        task=info.task,
        input=inputs[0],
        inputs=inputs,
        labels=list(info.labels) if info.labels else None,
        sites=list(info.sites),
        backend=info.backend,
        device=info.device,
        provider=info.provider,
        ready=info.ready,
        mc_available=info.mc_available,
        max_samples=info.max_samples,
        default_samples=info.default_samples,
        placement=info.placement,
        evaluation=info.evaluation,
        calibrated=info.calibrated,
    )


@router.get("/models", response_model=ModelList, summary="List models")
async def list_models(request: Request) -> ModelList:
    """Every model at its latest version."""
    return ModelList(
        models=[
            ModelSummary(
                name=info.name,
                version=info.version,
                versions=list(info.versions),
                task=info.task,
                ready=info.ready,
                backend=info.backend,
                device=info.device,
            )
            for info in _service(request).models()
        ]
    )


@router.get("/models/{name}", response_model=ModelDetail, responses={404: _ERRORS[404]}, summary="Describe a model")
async def describe_model(request: Request, name: ModelName) -> ModelDetail:
    """Input spec, labels, task, dropout sites, versions, backend and device of the latest version."""
    return _detail(_service(request).info(name))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelDetail,
    responses={404: _ERRORS[404], 422: _ERRORS[422]},
    summary="Describe a model version",
)
async def describe_model_version(request: Request, name: ModelName, version: Version) -> ModelDetail:
    """Like `GET /v1/models/{name}` for a given version."""
    return _detail(_service(request).info(name, version))


@router.get(
    "/models/{name}/example",
    response_model=PredictRequest,
    response_model_exclude_none=True,
    responses={404: _ERRORS[404]},
    summary="A ready request body for the model",
)
async def example(request: Request, name: ModelName) -> dict[str, Any]:
    """A body `POST /v1/models/{name}/predict` accepts as is: the first rows of the model's test split
    (preprocessed), MC mode, the default T, seed 0 (zeros of the input shape when the package records no
    dataset). `curl .../example | curl -d @- .../predict` gives a first answer."""
    service = _service(request)
    info = service.info(name)
    spec = service.spec(name)
    body = await asyncio.to_thread(example_request, spec, info.default_samples)
    if not info.mc_available:
        body = {"inputs": body["inputs"], "mode": "deterministic"}
    return body


def _response(result: InferenceResult, info: ModelInfo) -> PredictResponse:
    out = result.outputs
    labels = info.labels
    predictions: list[str] | list[int] | None = None
    if "predictions" in out:
        indices = [int(i) for i in np.asarray(out["predictions"]).reshape(-1)]
        predictions = [labels[i] for i in indices] if labels and len(labels) > max(indices) else indices
    # `model_construct`: the values are the runtime's own lists of the declared types, so validating them
    # again per request would only cost CPU; the answer is serialised by the same pydantic schema.
    uncertainty = None
    if result.mode == "mc":
        uncertainty = Uncertainty.model_construct(
            predictive_entropy=_list(out.get("predictive_entropy")),
            expected_entropy=_list(out.get("expected_entropy")),
            mutual_information=_list(out.get("mutual_information")),
            variation_ratio=_list(out.get("variation_ratio")),
            std=np.asarray(out["std"]).tolist(),
        )
    return PredictResponse.model_construct(
        model=result.model,
        version=result.version,
        mode="mc" if result.mode == "mc" else "deterministic",  # the service accepts these two only
        predictions=predictions,
        probabilities=_list(out.get("probabilities")),
        mean=_list(out.get("mean")),
        uncertainty=uncertainty,
        abstain=None if "abstain" not in out else [bool(v) for v in np.asarray(out["abstain"])],
        samples=_list(out.get("samples")),
        num_samples=result.num_samples,
        seed=result.seed,
        backend=result.backend,
        device=result.device,
        provider=result.provider,
        timings={k: round(v, 3) for k, v in result.timings.items()},
    )


def _list(value: np.ndarray | None) -> Any:
    return None if value is None else np.asarray(value).tolist()


async def _predict(request: Request, name: str, version: int | None) -> Response:
    service = _service(request)
    service.admit(name, version)  # 404 / 503 / 429 before the body is read
    raw = await request.body()  # bounded (413) and timed (408) by the body guard middleware
    trace = tracing.of(request.scope)
    tracing.mark(trace, "body")
    parsing: ParsingPool = request.app.state.parsing
    try:  # inline, in a thread or in the parsing process by size: the event loop stays free
        body, inputs = await parsing.run(parse_predict, raw)
    except BodyValidationFailed as exc:
        raise RequestValidationError(exc.errors) from None
    tracing.mark(trace, "parsed")
    label_mode(request, body.mode)
    if body.preprocess:
        inputs = await asyncio.to_thread(preprocess, service.spec(name, version), inputs)
    if body.samples is not None and body.num_samples is not None:
        raise InvalidInput(f"give {NUM_SAMPLES} only (samples is its deprecated alias)", field=NUM_SAMPLES)
    result = await service.infer(
        InferenceRequest(
            model=name,
            version=version,
            inputs=inputs,  # validated (shape, dtype, NaN/Inf) by the service
            mode=body.mode,
            num_samples=body.num_samples if body.num_samples is not None else body.samples,
            seed=body.seed,
            return_samples=body.return_samples,
            abstain=body.abstain,
            deadline_s=body.timeout_s,
            trace=trace,
        )
    )
    answer = _response(result, service.info(result.model, result.version))
    size = sum(np.asarray(v).size for v in result.outputs.values())
    encode = answer.model_dump_json
    text = (
        await asyncio.to_thread(encode, exclude_none=True)
        if size * 20 > _THREAD_THRESHOLD
        else encode(exclude_none=True)
    )
    tracing.mark(trace, "encoded")
    return Response(text, media_type="application/json")


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Predict with the latest version",
    openapi_extra=_PREDICT_BODY,
)
async def predict(request: Request, name: ModelName) -> Response:
    """Deterministic or MC-dropout predictions; MC adds the uncertainty summaries."""
    return await _predict(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Predict with a given version",
    openapi_extra=_PREDICT_BODY,
)
async def predict_version(request: Request, name: ModelName, version: Version) -> Response:
    """Like `POST /v1/models/{name}/predict` for a given version."""
    return await _predict(request, name, version)
