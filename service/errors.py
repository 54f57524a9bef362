"""Errors the service answers with a status code: one class per kind of failure.

Routes never build error responses by hand: they raise a `ServiceError` and the app's exception handler
renders it (native routes `{"error": {"message": ..., "field": ...}}`, V2 routes `{"error": "..."}`).
"""

from __future__ import annotations

import math

from dropwise.errors import DropwiseError


class ServiceError(DropwiseError):
    """A failure with an HTTP status, a human message and, for bad input, the offending field.

    Every failure the service answers derives from it (codec errors, auth, limits, deadlines), so the
    app's exception handlers are the only place an error response is built.
    """

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle with every attribute (errors raised in the body-parsing process travel back intact)."""
        return (_rebuild, (type(self), self.message, self.field, self.status, self.headers))

    def to_native(self) -> dict[str, object]:
        """The native API's body: `{"error": {"message", "field", "type"}}`."""
        return {"error": {"message": self.message, "field": self.field, "type": type(self).__name__}}

    def to_v2(self) -> dict[str, str]:
        """The Open Inference Protocol body: `{"error": "..."}` (field folded into the message)."""
        if self.field is None or self.field in self.message:
            return {"error": self.message}
        return {"error": f"{self.field}: {self.message}"}


def _rebuild(
    cls: type[ServiceError], message: str, field: str | None, status: int, headers: dict[str, str]
) -> ServiceError:
    error = cls.__new__(cls)
    ServiceError.__init__(error, message, field=field, status=status, headers=headers)
    return error


class ModelNotFound(ServiceError):
    """Unknown model name or version (404)."""

    status = 404


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content is wrong (400 by default, 422 on request)."""

    status = 400


class QueueFull(ServiceError):
    """The model's queue is at capacity (429 with Retry-After)."""

    status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0, field: str | None = None) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, field=field, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class DeadlineExceeded(ServiceError):
    """The request was not answered before its deadline (504)."""

    status = 504


class PayloadTooLarge(ServiceError):
    """The body exceeds the configured size limit (413)."""

    status = 413


class ModelNotReady(ServiceError):
    """The model exists but is not loaded (or failed to load), or the server is shutting down: 503."""

    status = 503


class RequestTimeout(ServiceError):
    """The client did not send its body in time (a stalled upload): 408."""

    status = 408


class Unauthorized(ServiceError):
    """No valid bearer token: 401 with `WWW-Authenticate: Bearer` (RFC 6750)."""

    status = 401

    def __init__(self, message: str, *, realm: str = "dropwise") -> None:
        super().__init__(message, field="authorization", headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


class Forbidden(ServiceError):
    """The route is disabled on this server (e.g. repository control without an admin token): 403."""

    status = 403
