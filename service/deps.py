"""FastAPI dependencies shared by routes: the admin token that guards repository control.

`require_admin` checks `Authorization: Bearer <token>` against `DROPWISE_ADMIN_TOKEN` in constant time
(`hmac.compare_digest`). With no admin token configured the guarded routes answer 403 and say how to enable
them; a missing or wrong token answers 401 with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import hmac

from dropwise.service.errors import ServiceError
from fastapi import Request

__all__ = ["require_admin"]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def require_admin(request: Request) -> None:
    """Let the request through only with the configured admin token (403 when none is configured)."""
    secret = getattr(request.app.state.settings, "admin_token", None)
    expected = secret.get_secret_value() if secret is not None else ""
    if not expected:
        raise ServiceError(
            "repository control is disabled: set DROPWISE_ADMIN_TOKEN and send it as "
            "'Authorization: Bearer <token>' to enable it",
            field="authorization",
            status=403,
        )
    given = _bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ServiceError(
            "missing or wrong admin token (send 'Authorization: Bearer <token>')",
            field="authorization",
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="dropwise-admin"'},
        )
