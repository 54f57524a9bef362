"""`StartupGate`: an ASGI app that answers `/healthz` from the first second while the service starts.

`dropwise serve` hands uvicorn a gate instead of the FastAPI app, so the port listens at once. The gate's
lifespan starts three steps in the background and reports each as it goes:

1. `prepare` (optional, run in a thread): the command line's first-start work, such as training the
   reference networks into an empty repository or converting packages to ONNX;
2. `build` (in a thread): import the service (torch, FastAPI) and build the app;
3. the app's own ASGI lifespan: scan the repository and load every model.

Until the app is built, the gate itself answers `/healthz` 200 `{"status": "ok"}`, `/readyz` 503
`{"status": "not ready", "waiting_for": "..."}` naming the step in progress, and every other request 503 with
the same reason (in the Open Inference Protocol's `{"error": ...}` format under `/v2`). Once the app is
built, `/healthz`, `/readyz` and `/metrics` go to the app (its `/readyz` names the model being loaded); other
requests follow once the app's lifespan has started. A step that fails keeps `/readyz` at 503 with the
reason, logs it and calls `on_failure(reason)` (the command line then stops the server and exits with
that one line); `/healthz` stays 200 while the process answers.

This module imports neither torch nor FastAPI, so the gate is up before those heavy imports finish. The
work runs in daemon threads: stopping the server (Ctrl-C) does not wait for a training run to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from dropwise.errors import DropwiseError

log = logging.getLogger("dropwise.startup")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

#: paths the built app answers while its lifespan is still loading models
EARLY_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """Run `work` in a daemon thread and await its result (the process may exit while it runs)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle_error(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def settle(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def target() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle_error, exc)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=target, name="dropwise-startup", daemon=True).start()
    return await future


class StartupGate:
    """Listen at once; prepare, build and start the real app behind it (see the module docstring)."""

    def __init__(
        self,
        build: Callable[[], ASGIApp],
        *,
        prepare: Callable[[], object] | None = None,
        preparing: str = "preparing the model repository",
        on_failure: Callable[[str], object] | None = None,
    ) -> None:
        self._build = build
        self._prepare = prepare
        self._preparing = preparing
        self._on_failure = on_failure
        self._app: ASGIApp | None = None
        self._started = False  #: the app's lifespan has started (every request goes to the app)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: what the service is waiting for, as `/readyz` reports it before the app is built
        self.waiting_for = "starting"
        self.failed: str | None = None

    @property
    def app(self) -> ASGIApp | None:
        """The built app, once step 2 is done."""
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self._app
        if app is not None and (self._started or scope.get("path") in EARLY_PATHS):
            await app(scope, receive, send)
            return
        if scope["type"] == "http":
            await self._answer(scope, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})

    # ------------------------------------------------------------------ answers before the app is up
    async def _answer(self, scope: Scope, send: Send) -> None:
        path = str(scope.get("path", ""))
        reason = f"failed: {self.failed}" if self.failed else self.waiting_for
        body: dict[str, Any]
        if path == "/healthz":
            status, body = 200, {"status": "ok"}
        elif path == "/readyz":
            status, body = 503, {"status": "not ready", "models": {}, "errors": {}, "waiting_for": reason}
        elif path == "/v2" or path.startswith("/v2/"):
            status, body = 503, {"error": f"the service is starting: {reason}"}
        else:
            message = f"the service is starting: {reason}"
            status, body = 503, {"error": {"message": message, "field": None, "type": "ModelNotReady"}}
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    # ------------------------------------------------------------------ lifespan
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        self._task = asyncio.get_running_loop().create_task(self._start(), name="dropwise-startup")
        await send({"type": "lifespan.startup.complete"})
        message = await receive()  # lifespan.shutdown
        self._stop.set()
        if self._task is not None:
            if self._app is None:  # still preparing or building: do not wait for it
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # already logged by _start
                pass
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        try:
            if self._prepare is not None:
                self.waiting_for = self._preparing
                await _in_daemon_thread(self._prepare)
            self.waiting_for = "importing the service and building the app"
            self._app = await _in_daemon_thread(self._build)
            self.waiting_for = "loading the models"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(f"{self.waiting_for}: {exc}", exc)
            return
        await self._run_app_lifespan(self._app)

    def _fail(self, reason: str, exc: BaseException | None) -> None:
        self.failed = reason
        expected = exc is None or isinstance(exc, DropwiseError)  # a traceback helps only for a bug
        log.error("dropwise start-up failed while %s", reason, exc_info=None if expected else exc)
        if self._on_failure is not None:
            self._on_failure(reason)

    async def _run_app_lifespan(self, app: ASGIApp) -> None:
        """Drive the app's ASGI lifespan: startup now, shutdown when the server stops."""
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        started = asyncio.Event()
        finished = asyncio.Event()
        startup_error: list[str] = []

        async def app_receive() -> Message:
            return await inbox.get()

        async def app_send(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                # Route to the app now, not when `_start` next runs: the app's own /readyz already answers
                # 200 (it goes to the app early), and a request sent on that word must not get the gate's 503.
                self._started = True
                self.waiting_for = ""
                started.set()
            elif kind == "lifespan.startup.failed":
                startup_error.append(str(message.get("message", "")))
                started.set()
            elif kind.startswith("lifespan.shutdown"):
                finished.set()

        await inbox.put({"type": "lifespan.startup"})
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

        async def run_app() -> None:
            await app(scope, app_receive, app_send)

        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(run_app())
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if startup_error or (task.done() and not started.is_set()):
            error = startup_error[0] if startup_error else repr(task.exception())
            self._fail(f"loading the models: {error}", None)
            return
        self._started = True
        self.waiting_for = ""
        await self._stop.wait()
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait({task, asyncio.ensure_future(finished.wait())}, return_when=asyncio.FIRST_COMPLETED)


__all__ = ["EARLY_PATHS", "StartupGate"]
