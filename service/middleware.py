"""ASGI middleware of the service: request identity, metrics and access log; the request-body guard.

`RequestContextMiddleware` (outermost of the app's own middleware) gives every request an id (the client's
`X-Request-ID` when it is a short printable token, else a fresh one), echoes it on every answer, errors
included, counts every answered request in `/metrics` by model, route, mode and status, and writes one
access-log line per request (logger `dropwise.access`) carrying the id.

`BodyGuardMiddleware` wraps the ASGI `receive` channel: a body whose declared `Content-Length` or counted
bytes exceed the limit raises `PayloadTooLarge` (413) as soon as it is known, and a client that sends
nothing for `idle_timeout_s` while the app waits for its body raises `RequestTimeout` (408). The errors are
raised inside the app, so the registered exception handlers render them like every other error. Nothing is
buffered here: the route reads the body when it needs it, which lets it refuse work (unknown model, full
queue, missing token) before a byte of the body is read. (Starlette's own `max_body_size` limiter answers a
plain-text 413 outside the app's handlers and has no stall timeout, hence this guard.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from dropwise.service import tracing
from dropwise.service.errors import InvalidInput, PayloadTooLarge, RequestTimeout
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from dropwise.service.metrics import ServiceMetrics

access_log = logging.getLogger("dropwise.access")

REQUEST_ID_HEADER = "X-Request-ID"
#: scope keys this module sets (a plain dict entry survives the whole middleware stack)
REQUEST_ID_KEY = "dropwise.request_id"
MODE_KEY = "dropwise.mode"
_VALID_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
#: label of requests whose route names no model / names a model this server does not hold
NO_MODEL = "_none"
UNKNOWN_MODEL = "_unknown"
UNMATCHED_ROUTE = "_unmatched"


#: fresh request ids: 16 random hex digits per process, then a 16-digit counter (32 characters, unique
#: within the process and across processes; one `os.urandom` call per process instead of one per request)
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def _new_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_prefix)  # a forked worker gets ids of its own


def new_request_id() -> str:
    """A fresh 32-character request id (see `_ID_PREFIX`)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id(scope: Scope) -> str | None:
    """The id `RequestContextMiddleware` gave this request (None outside it)."""
    value = scope.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


def label_mode(request: Request, mode: str) -> None:
    """Record the inference mode of `request` for its `/metrics` label (`deterministic` / `mc`)."""
    request.scope[MODE_KEY] = mode


def _route_template(scope: Scope) -> str:
    """The matched route's path template (FastAPI records the route in the scope), bounded cardinality."""
    route = scope.get("route")
    # `path_format`: the template without convertors (`{version:int}` -> `{version}`), as FastAPI's routes have
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Request id in and out, one `/metrics` count and one access-log line per answered request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_model: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.known_model = known_model  #: callable name -> bool (the service's models, read live)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        trace = tracing.start(scope)
        given = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        rid = given if given is not None and _VALID_ID.fullmatch(given) else new_request_id()
        scope[REQUEST_ID_KEY] = rid
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            elif trace is not None and not message.get("more_body", False):
                await send(message)
                tracing.mark(trace, "sent")
                return
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = 500  # the catch-all handler (outside this middleware) answers it
            raise
        finally:
            self._record(scope, status, time.perf_counter() - started, rid)
            if trace is not None:
                tracing.finish(trace, rid=rid, path=scope.get("path"), status=status)

    def _record(self, scope: Scope, status: int, seconds: float, rid: str) -> None:
        params = scope.get("path_params") or {}
        name = params.get("name", params.get("model"))
        model = NO_MODEL
        if name is not None:
            model = str(name) if self.known_model(str(name)) else UNKNOWN_MODEL
        route = _route_template(scope)
        mode = str(scope.get(MODE_KEY, "_none"))
        self.metrics.count_answer(model=model, route=route, mode=mode, status=str(status))
        access_log.info(
            '%s "%s %s" %d %.1fms rid=%s',
            (scope.get("client") or ("-",))[0],
            scope.get("method", "-"),
            scope.get("path", "-"),
            status,
            seconds * 1000.0,
            rid,
        )


class BodyGuardMiddleware:
    """Refuse oversized bodies (413) and stalled uploads (408) from inside `receive` (see module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                text = value.strip()
                declared = int(text) if text.isdigit() and len(text) <= 18 else -1
                break
        size = 0
        complete = False
        limit = self.max_bytes

        async def guarded() -> Message:
            nonlocal size, complete
            if complete:  # body fully read: later calls only wait for a disconnect, without a deadline
                return await receive()
            if declared is not None and declared > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit", field="body")
            if declared == -1:
                raise InvalidInput("invalid Content-Length header", field="content-length")
            try:  # `asyncio.timeout`, not `wait_for`: no task of its own per body read (see the batcher)
                async with asyncio.timeout(self.idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"no request body data for {self.idle_timeout_s:g} s; upload abandoned", field="body"
                ) from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit", field="body")
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, guarded, send)


__all__ = [
    "MODE_KEY",
    "REQUEST_ID_HEADER",
    "BodyGuardMiddleware",
    "RequestContextMiddleware",
    "label_mode",
    "request_id",
]
