"""Triton's model repository, configuration and statistics extensions under `/v2`.

- `POST /v2/repository/index` (body optional, `{"ready": true}` lists served versions only): every model
  version of the repository, `[{"name", "version", "state", "reason"}]`, states `READY`, `LOADING`,
  `UNLOADING`, `UNAVAILABLE` (the reason says why: refused package, failed load, unloaded, not chosen by
  the version policy).
- `POST /v2/repository/models/{name}/load` and `.../unload`: only with `DROPWISE_MODEL_CONTROL=explicit`
  (400 otherwise, as Triton answers), and all three need the admin token (`dropwise.service.deps`).
- `GET /v2/models/{m}[/versions/{v}]/config`: Triton's model configuration of the version served
  (`dropwise.service.model_config`).
- `GET /v2/models/stats`, `GET /v2/models/{m}[/versions/{v}]/stats`: Triton's statistics
  (`dropwise.service.statistics`), counting every request of the native and V2 APIs.
"""

from __future__ import annotations

import json
from typing import Any

from dropwise.service.deps import require_admin
from dropwise.service.errors import InvalidInput, ModelNotFound
from dropwise.service.inference import InferenceService
from dropwise.service.model_config import triton_model_config
from fastapi import APIRouter, Depends, Request

__all__ = ["EXTENSIONS", "router"]

#: The protocol extensions these routes implement (announced by `GET /v2`).
EXTENSIONS = ("model_repository", "model_configuration", "statistics")

router = APIRouter(tags=["Open Inference Protocol (V2): repository, configuration, statistics"])
_ADMIN = [Depends(require_admin)]
_MAX_CONTROL_BODY = 64 * 1024


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


async def _json_object(request: Request, allowed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The request body as a JSON object (an empty body is `{}`); 400 for anything else.

    `allowed` names the `parameters` this route understands; any other parameter is refused rather than
    ignored (Triton's `config` and `file:` overrides are not supported: a package carries its own serving
    configuration).
    """
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > _MAX_CONTROL_BODY:
        raise InvalidInput(f"request body over {_MAX_CONTROL_BODY} bytes", field="body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("request body is not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", field="body")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters must be a JSON object", field="parameters")
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise InvalidInput(
            f"unsupported parameter(s) {unknown[:5]}: a model's configuration lives in its package "
            "(dropwise.package.serving); this route takes "
            + (", ".join(sorted(allowed)) if allowed else "no parameters"),
            field="parameters",
        )
    return body


def _version(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
        raise InvalidInput(f"model version must be a positive integer, got {text[:40]!r}", field="version")
    return int(text)


@router.post("/v2/repository/index", dependencies=_ADMIN, summary="Repository index")
async def repository_index(request: Request) -> list[dict[str, str]]:
    """Every model version in the repository with its state (`{"ready": true}`: served ones only)."""
    body = await _json_object(request)
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidInput("ready must be true or false", field="ready")
    service = _service(request)
    await service.control.rescan()
    return [entry.to_json() for entry in service.control.index(ready_only)]


@router.post("/v2/repository/models/{name}/load", dependencies=_ADMIN, summary="Load or reload a model")
async def load_model(request: Request, name: str) -> dict[str, Any]:
    """Load `name` by its version policy (a new version is warmed up, then swapped in); explicit mode only."""
    await _json_object(request)
    await _service(request).control.load(name)
    return {}


@router.post("/v2/repository/models/{name}/unload", dependencies=_ADMIN, summary="Unload a model")
async def unload_model(request: Request, name: str) -> dict[str, Any]:
    """Stop serving every version of `name` once its queued requests are answered; explicit mode only."""
    body = await _json_object(request, frozenset({"unload_dependents"}))
    if not isinstance(body.get("parameters", {}).get("unload_dependents", False), bool):
        raise InvalidInput("parameters.unload_dependents must be true or false", field="unload_dependents")
    await _service(request).control.unload(name)
    return {}


@router.get("/v2/models/stats", summary="Statistics of every served model version")
async def all_stats(request: Request) -> dict[str, Any]:
    """Triton's `model_stats` for every served version."""
    control = _service(request).control
    stats = [
        slot.statistics.to_triton(name, version)
        for name, versions in sorted(control.models.items())
        for version, slot in sorted(versions.items())
    ]
    return {"model_stats": stats}


async def _model_stats(request: Request, model: str, version: int | None) -> dict[str, Any]:
    service = _service(request)
    if version is None:
        versions = service.control.models.get(model)
        if not versions:
            raise ModelNotFound(f"unknown model {model!r}", field="model")
        slots = sorted(versions.items())
    else:
        slot = service.control.describe(model, version)
        if slot is None:
            raise ModelNotFound(f"model {model!r} has no served version {version}", field="version")
        slots = [(version, slot)]
    return {"model_stats": [slot.statistics.to_triton(model, v) for v, slot in slots]}


@router.get("/v2/models/{model}/stats", summary="Statistics of a model (every served version)")
async def model_stats(request: Request, model: str) -> dict[str, Any]:
    """Triton's `model_stats` of each served version of `model`."""
    return await _model_stats(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/stats", summary="Statistics of a model version")
async def model_version_stats(request: Request, model: str, version: str) -> dict[str, Any]:
    """Triton's `model_stats` of one version."""
    return await _model_stats(request, model, _version(version))


async def _config(request: Request, model: str, version: int | None) -> dict[str, Any]:
    service = _service(request)
    info = service.info(model, version)
    slot = service.control.describe(info.name, info.version)
    if slot is None:
        raise ModelNotFound(f"model {model!r} has no served version {info.version}", field="version")
    return triton_model_config(info, slot)


@router.get("/v2/models/{model}/config", summary="Model configuration (latest version)")
async def model_config(request: Request, model: str) -> dict[str, Any]:
    """Triton's model configuration of the latest served version, with the settings in force."""
    return await _config(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/config", summary="Model configuration")
async def model_version_config(request: Request, model: str, version: str) -> dict[str, Any]:
    """Triton's model configuration of one version."""
    return await _config(request, model, _version(version))
