"""The native API: list and describe models, deterministic and MC-dropout predictions."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from dropwise.service.errors import InvalidInput
from dropwise.service.inference import InferenceRequest, InferenceResult, InferenceService, ModelInfo
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
from fastapi import APIRouter, Body, Path, Request

router = APIRouter(prefix="/v1", tags=["native"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Invalid input (the field is named)."},
    404: {"model": ErrorBody, "description": "Unknown model or version."},
    413: {"model": ErrorBody, "description": "Body over the size limit."},
    422: {"model": ErrorBody, "description": "Request body does not match the schema."},
    429: {"model": ErrorBody, "description": "Queue full; see Retry-After."},
    504: {"model": ErrorBody, "description": "Not answered before the deadline."},
}

ModelName = Annotated[str, Path(description="Model name as listed by GET /v1/models.", examples=["mlp_digits"])]
Version = Annotated[int, Path(description="Numeric package version.", examples=[1])]
Predict = Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)]


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


def _detail(info: ModelInfo) -> ModelDetail:
    return ModelDetail(
        name=info.name,
        version=info.version,
        versions=list(info.versions),
        task=info.task,
        input=InputSpecOut(
            name=info.input_name,
            shape=list(info.input_shape),
            dtype=info.input_dtype,
            preprocessing=info.preprocessing,
        ),
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
    responses={404: _ERRORS[404]},
    summary="Describe a model version",
)
async def describe_model_version(request: Request, name: ModelName, version: Version) -> ModelDetail:
    """Like `GET /v1/models/{name}` for a given version."""
    return _detail(_service(request).info(name, version))


def _response(result: InferenceResult, info: ModelInfo) -> PredictResponse:
    out = result.outputs
    labels = info.labels
    predictions: list[str] | list[int] | None = None
    if "predictions" in out:
        indices = [int(i) for i in np.asarray(out["predictions"]).reshape(-1)]
        predictions = [labels[i] for i in indices] if labels and len(labels) > max(indices) else indices
    uncertainty = None
    if result.mode == "mc":
        uncertainty = Uncertainty(
            predictive_entropy=_list(out.get("predictive_entropy")),
            expected_entropy=_list(out.get("expected_entropy")),
            mutual_information=_list(out.get("mutual_information")),
            variation_ratio=_list(out.get("variation_ratio")),
            std=np.asarray(out["std"]).tolist(),
        )
    return PredictResponse(
        model=result.model,
        version=result.version,
        mode=result.mode,  # type: ignore[arg-type]
        predictions=predictions,
        probabilities=_list(out.get("probabilities")),
        mean=_list(out.get("mean")),
        uncertainty=uncertainty,
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


async def _predict(request: Request, name: str, version: int | None, body: PredictRequest) -> PredictResponse:
    service = _service(request)
    if body.samples is not None and body.num_samples is not None:
        raise InvalidInput(f"give {NUM_SAMPLES} only (samples is its deprecated alias)", field=NUM_SAMPLES)
    result = await service.infer(
        InferenceRequest(
            model=name,
            version=version,
            inputs=body.inputs,  # validated (shape, dtype, NaN/Inf) by the service
            mode=body.mode,
            num_samples=body.num_samples if body.num_samples is not None else body.samples,
            seed=body.seed,
            return_samples=body.return_samples,
            deadline_s=body.timeout_s,
        )
    )
    return _response(result, service.info(result.model, result.version))


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Predict with the latest version",
)
async def predict(request: Request, name: ModelName, body: Predict) -> PredictResponse:
    """Deterministic or MC-dropout predictions; MC adds the uncertainty summaries."""
    return await _predict(request, name, None, body)


@router.post(
    "/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Predict with a given version",
)
async def predict_version(request: Request, name: ModelName, version: Version, body: Predict) -> PredictResponse:
    """Like `POST /v1/models/{name}/predict` for a given version."""
    return await _predict(request, name, version, body)
