"""Running the app under uvicorn: safe binding, the access log, and graceful shutdown on SIGTERM.

`build_server(app, settings, drain)` (what `dropwise serve` runs, with its start-up gate as `app`) and
`serve(app, settings)` run uvicorn with `GracefulServer`. On SIGTERM (or Ctrl-C) it

1. stops accepting connections,
2. drains the service (`InferenceService.drain`): new requests answer 503; requests waiting in a queue
   answer 503 at once; batches already computing finish, for at most `settings.shutdown_grace_s` seconds
   (past that their requests answer 503 too),
3. lets uvicorn close the connections and run the app's lifespan shutdown,

and the process exits with status 0 (uvicorn would otherwise re-raise the captured signal after its
shutdown, so the process would die by SIGTERM). `check_bind(settings)` refuses a non-loopback address
without an API token unless told (`allow_unauthenticated`).
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from dropwise.service.settings import Settings
from starlette.types import ASGIApp
from uvicorn.config import LOGGING_CONFIG

if TYPE_CHECKING:  # kept light: `dropwise serve` imports this before torch and the app are loaded
    from dropwise.service.inference import InferenceService
    from fastapi import FastAPI

from dropwise.errors import UserError


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_bind(settings: Settings) -> None:
    """Refuse to serve a non-loopback address without an API token unless `allow_unauthenticated`."""
    if is_loopback(settings.host) or settings.api_token is not None or settings.allow_unauthenticated:
        return
    raise UserError(
        f"refusing to bind {settings.host} without an API token: anyone who reaches it could use the models. "
        "Set DROPWISE_API_TOKEN, or pass --allow-unauthenticated (env DROPWISE_ALLOW_UNAUTHENTICATED=1) "
        "if an open endpoint is intended"
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server with the drain of the module docstring and exit status 0 after a signal.

    `drain(grace_s)` is awaited after the listening sockets close and before uvicorn's own shutdown
    (`InferenceService.drain` of the app being served).
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting before draining
            server.close()
        await self.drain(self.grace_s)
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # handled: exit normally instead of dying by the signal


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the `dropwise` loggers (the access log with request ids)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dropwise"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def build_server(app: ASGIApp, settings: Settings, drain: Callable[[float], Awaitable[None]]) -> GracefulServer:
    """A `GracefulServer` for `app` on the settings' host and port (refuses an unsafe bind first)."""
    check_bind(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        access_log=False,  # the app's own access log carries the request id
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )
    return GracefulServer(config, drain, settings.shutdown_grace_s)


def serve(app: FastAPI, settings: Settings) -> None:
    """Run `app` (from `create_app(settings)`) until SIGTERM / Ctrl-C, then drain and exit."""
    service: InferenceService = app.state.inference
    build_server(app, settings, service.drain).run()


__all__ = ["GracefulServer", "build_server", "check_bind", "is_loopback", "log_config", "serve"]
