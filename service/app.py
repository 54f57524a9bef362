"""The FastAPI app factory: routes, the inference service's lifespan, body limit and error rendering.

Errors render by API: paths under `/v2` answer the Open Inference Protocol's `{"error": "..."}`, every other
path the native `{"error": {"message", "field", "type"}}`. Unexpected exceptions are logged and answer a
JSON 500 without a traceback.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dropwise.service.errors import PayloadTooLarge, ServiceError
from dropwise.service.inference import InferenceService
from dropwise.service.metrics import ServiceMetrics
from dropwise.service.routes import health, native, repository, v2
from dropwise.service.settings import Settings
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dropwise.app")

V2_PREFIX = "/v2"


def _is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(path: str, error: ServiceError) -> JSONResponse:
    """Render a `ServiceError` in the format of the API `path` belongs to."""
    body: dict[str, Any] = error.to_v2() if _is_v2(path) else error.to_native()
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length and by counting the stream.

    The body is read (up to the limit) before the app sees it and replayed, so an oversized chunked
    upload is cut off as soon as it crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        too_large = PayloadTooLarge(f"request body exceeds the {self.max_bytes}-byte limit", field="body")
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    bad = ServiceError("invalid Content-Length header", field="content-length", status=400)
                    await error_response(path, bad)(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await error_response(path, too_large)(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(path, too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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
        error = ServiceError(str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}))
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, ServiceError("internal server error", status=500))


def _include_v2(app: FastAPI) -> None:
    app.include_router(repository.router)  # before v2: `/v2/models/stats` is not a model named "stats"
    app.include_router(v2.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (defaults: `Settings()` from the environment)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    service = InferenceService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

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
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.inference = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)

    app.include_router(health.router)
    app.include_router(native.router)
    _include_v2(app)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("dropwise")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


__all__ = ["BodyLimitMiddleware", "create_app", "error_response", "install_error_handlers"]
