"""The FastAPI app factory: routes, the inference service's lifespan, middleware and error rendering.

Errors are rendered here only, by the registered exception handlers: paths under `/v2` answer the Open
Inference Protocol's `{"error": "..."}`, every other path the native `{"error": {"message", "field",
"type"}}`. Unexpected exceptions are logged and answer a JSON 500 without a traceback. Middleware (see
`dropwise.service.middleware`): request id, metrics and access log outermost; CORS only when
`cors_origins` is set; the body guard (size limit, stalled uploads). Trailing-slash redirects are off, so
no answer is ever built from the `Host` header.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dropwise.service import tracing
from dropwise.service.body_parsing import ParsingPool
from dropwise.service.errors import PayloadTooLarge, ServiceError
from dropwise.service.inference import InferenceService
from dropwise.service.metrics import ServiceMetrics
from dropwise.service.middleware import BodyGuardMiddleware, RequestContextMiddleware, request_id
from dropwise.service.routes import health, hot_paths, native, repository, v2
from dropwise.service.settings import Settings
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dropwise.app")

V2_PREFIX = "/v2"


def _is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(path: str, error: ServiceError) -> JSONResponse:
    """Render a `ServiceError` in the format of the API `path` belongs to."""
    body: dict[str, Any] = error.to_v2() if _is_v2(path) else error.to_native()
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


def _validation_field(error: dict[str, Any]) -> str | None:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "path", "query", "header")]
    return ".".join(loc) or None


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for service errors, schema violations, unknown routes and unexpected exceptions."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        field = _validation_field(first) if first else None
        message = (
            "; ".join(f"{_validation_field(e) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
            or "invalid request"
        )
        return error_response(request.url.path, ServiceError(message, field=field or "body", status=422))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ServiceError):  # FastAPI wraps errors raised while reading a body
            return error_response(request.url.path, exc.__cause__)
        if exc.status_code == 413:
            return error_response(request.url.path, PayloadTooLarge(str(exc.detail), field="body"))
        error = ServiceError(str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}))
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        rid = request_id(request.scope)
        headers = {"X-Request-ID": rid} if rid else None
        error = ServiceError("internal server error", status=500, headers=headers)
        return error_response(request.url.path, error)


def _include_v2(app: FastAPI) -> None:
    app.include_router(repository.router)  # before v2: `/v2/models/stats` is not a model named "stats"
    app.include_router(v2.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (defaults: `Settings()` from the environment)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    service = InferenceService(settings, metrics)

    parsing = ParsingPool()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            parsing.shutdown()
            tracing.flush()

    app = FastAPI(
        title="dropwise",
        summary="Deterministic and MC-dropout predictions of dropout-family networks.",
        description=(
            "Native API under `/v1` (deterministic or Monte-Carlo dropout predictions with uncertainty), "
            "Open Inference Protocol (KServe V2 / Triton REST) under `/v2`, health at `/healthz` and "
            "`/readyz`, Prometheus metrics at `/metrics`."
        ),
        version=_version(),
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.inference = service
    app.state.parsing = parsing
    # added innermost first: the body guard, then CORS (when configured), then the request context
    app.add_middleware(
        BodyGuardMiddleware, max_bytes=settings.max_body_bytes, idle_timeout_s=settings.body_idle_timeout_s
    )
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Inference-Header-Content-Length"],
            expose_headers=["X-Request-ID", "Retry-After", "Inference-Header-Content-Length"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics, known_model=service.has_model)
    install_error_handlers(app)

    app.include_router(health.router)
    app.include_router(native.router)
    _include_v2(app)
    hot_paths.install(app)  # the inference routes without FastAPI's per-request machinery, matched first
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("dropwise")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__all__ = ["create_app", "error_response", "install_error_handlers"]
