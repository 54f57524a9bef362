"""FastAPI dependencies shared by the routes: the inference service and bearer-token checks.

Tokens travel as `Authorization: Bearer <token>` (RFC 6750) and are compared with `hmac.compare_digest`
(constant time). `require_api_token` guards inference and model routes when `DROPWISE_API_TOKEN` is set
(the admin token is accepted there too); health, readiness and metrics stay open. `require_admin` guards
repository control: without `DROPWISE_ADMIN_TOKEN` those routes answer 403 saying how to enable them.
A missing or wrong token answers 401 with `WWW-Authenticate: Bearer`.

    router.add_api_route("/v2/repository/index", index, dependencies=[AdminOnly], methods=["POST"])
"""

from __future__ import annotations

import hmac
from typing import Annotated

from dropwise.service.errors import Forbidden, Unauthorized
from dropwise.service.inference import InferenceService
from dropwise.service.settings import Settings
from fastapi import Depends, Request
from pydantic import SecretStr


def get_service(request: Request) -> InferenceService:
    """The app's `InferenceService`."""
    return request.app.state.inference


def get_settings(request: Request) -> Settings:
    """The app's `Settings`."""
    return request.app.state.settings


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _configured(secret: SecretStr | None) -> bool:
    return secret is not None and bool(secret.get_secret_value())


def _matches(token: str, secret: SecretStr | None) -> bool:
    if secret is None or not _configured(secret):
        return False
    return hmac.compare_digest(token.encode("utf-8"), secret.get_secret_value().encode("utf-8"))


async def require_api_token(request: Request) -> None:
    """Pass when no API token is configured, or the request carries it (or the admin token).

    A coroutine on purpose (as `require_admin`): FastAPI runs a plain function dependency in its thread pool,
    a thread hop per request that, under load on one core, cost a request tens of milliseconds of waiting.
    """
    settings = get_settings(request)
    if not _configured(settings.api_token):
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("this server requires a token: send 'Authorization: Bearer <DROPWISE_API_TOKEN>'")
    if not (_matches(token, settings.api_token) or _matches(token, settings.admin_token)):
        raise Unauthorized("invalid bearer token")


async def require_admin(request: Request) -> None:
    """Pass only with the admin token; 403 when repository control is not enabled (no admin token)."""
    settings = get_settings(request)
    if not _configured(settings.admin_token):
        raise Forbidden(
            "repository control is disabled on this server: start it with DROPWISE_ADMIN_TOKEN set and send "
            "'Authorization: Bearer <token>'"
        )
    token = _bearer(request)
    if token is None:
        raise Unauthorized(
            "missing admin token: repository control requires 'Authorization: Bearer <DROPWISE_ADMIN_TOKEN>'",
            realm="dropwise-admin",
        )
    if not _matches(token, settings.admin_token):
        raise Unauthorized("invalid admin token", realm="dropwise-admin")


ApiToken = Depends(require_api_token)
AdminOnly = Depends(require_admin)
Service = Annotated[InferenceService, Depends(get_service)]

__all__ = ["AdminOnly", "ApiToken", "Service", "get_service", "get_settings", "require_admin", "require_api_token"]
