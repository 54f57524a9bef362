"""The four inference routes, served without FastAPI's per-request route machinery.

`POST /v1/models/{name}/predict`, `POST /v1/models/{name}/versions/{version}/predict`,
`POST /v2/models/{model}/infer` and `POST /v2/models/{model}/versions/{version}/infer` do all their own work
on the raw request (body read, parsing and validation, answer encoding), so FastAPI's dependency solving,
parameter validation and exit stack add nothing but CPU: under the serving bench they were the largest
single share of the service's CPU per request (py-spy; README "Serving bench (13.2)"). `hot_routes()`
returns plain Starlette routes for those paths, placed before FastAPI's own routes by `install`, that
check the API token and call the same handlers. FastAPI's routes stay registered behind them, so the
OpenAPI schema documents them as before, and a request the plain route does not match (a native version
that is not a number) still gets FastAPI's 422. Errors go through the app's registered exception handlers
as on every other route (Starlette's `request_response` wraps the endpoint with them).
"""

from __future__ import annotations

from dropwise.service.deps import require_api_token
from dropwise.service.routes import native, v2
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope


class HotRoute(Route):
    """A Starlette route that records itself in the scope as FastAPI's routes do (the `/metrics` route
    label is read from there)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


async def _predict(request: Request) -> Response:
    await require_api_token(request)
    return await native.predict(request, request.path_params["name"])


async def _predict_version(request: Request) -> Response:
    await require_api_token(request)
    return await native.predict_version(request, request.path_params["name"], request.path_params["version"])


async def _infer(request: Request) -> Response:
    await require_api_token(request)
    return await v2.infer(request, request.path_params["model"])


def hot_routes() -> list[HotRoute]:
    """The plain routes of the inference paths (see the module docstring)."""
    return [
        HotRoute("/v1/models/{name}/predict", _predict, methods=["POST"], include_in_schema=False),
        HotRoute(
            "/v1/models/{name}/versions/{version:int}/predict",
            _predict_version,
            methods=["POST"],
            include_in_schema=False,
        ),
        HotRoute("/v2/models/{model}/infer", _infer, methods=["POST"], include_in_schema=False),
        HotRoute("/v2/models/{model}/versions/{version}/infer", _infer, methods=["POST"], include_in_schema=False),
    ]


def install(app: FastAPI) -> None:
    """Put the plain inference routes in front of the app's routes (call after every router is included)."""
    app.router.routes[0:0] = hot_routes()


__all__ = ["HotRoute", "hot_routes", "install"]
