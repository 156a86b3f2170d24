"""Errors raised by the core and mapped by the API to its one JSON error shape."""
from __future__ import annotations


class PolicydError(Exception):
    """Base of the errors a client can be told about."""

    status = 400
    code = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(PolicydError):
    """Bad input: wrong type, bad name, out of range."""


class Unauthorized(PolicydError):
    status, code = 401, "unauthorized"


class Forbidden(PolicydError):
    status, code = 403, "forbidden"


class QuotaExceeded(PolicydError):
    status, code = 403, "quota_exceeded"


class NotFound(PolicydError):
    status, code = 404, "not_found"


class Exists(PolicydError):
    status, code = 409, "exists"


class Unavailable(PolicydError):
    status, code = 503, "unavailable"
