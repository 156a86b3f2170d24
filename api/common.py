"""Shared pieces of every handler: app keys, the JSON error shape, body parsing, pagination."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from policyd.errors import Forbidden, Invalid, PolicydError
from policyd.names import InvalidName, has_control
from policyd.runtime import Runtime
from policyd.store.scope import Scope

SCOPE_KEY: web.RequestKey[Scope] = web.RequestKey("scope", Scope)  # set by auth middleware
RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
MASTER_TOKEN: web.AppKey[str] = web.AppKey("master_token", str)


def runtime_of(request: web.Request) -> Runtime:
    """The process runtime behind a request."""
    return request.app[RUNTIME]


def error_response(status: int, code: str, message: str) -> web.Response:
    """The one error shape: {"error": {"code", "message"}}."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def scope_of(request: web.Request) -> Scope:
    """The authenticated caller."""
    return request[SCOPE_KEY]


def require_master(request: web.Request) -> Scope:
    """The caller, who must be the master; else 403 forbidden."""
    scope = scope_of(request)
    if not scope.is_master:
        raise Forbidden("this action needs the master token")
    return scope


def _no_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which Python's json accepts but JSON (RFC 8259) has not."""
    raise ValueError(f"{name} is not JSON")


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or Invalid."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
        raise Invalid("body is not valid JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise Invalid("body must be a JSON object")
    return body


def only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Reject unknown fields, so a typo is an error and not silently ignored."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise Invalid(f"unknown field(s): {shown}; allowed: {', '.join(allowed)}")


def opt_int(body: dict[str, Any], field: str, *, minimum: int = 0,
            maximum: int = 2**62) -> int | None:
    """An optional non-bool integer field in range (null allowed)."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{field} must be an integer or null")
    if not minimum <= value <= maximum:
        raise Invalid(f"{field} must be between {minimum} and {maximum}")
    return value


def opt_str(body: dict[str, Any], field: str, *, max_len: int = 255) -> str | None:
    """An optional string field of bounded length (null allowed)."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(f"{field} must be a string or null")
    if len(value) > max_len:
        raise Invalid(f"{field} must be at most {max_len} characters")
    if not is_clean_text(value):
        raise Invalid(f"{field} must be valid UTF-8 text without control characters")
    return value


def is_clean_text(value: str) -> bool:
    """True if value encodes to UTF-8 (JSON may carry lone surrogates) and holds no control
    character (C0, DEL, C1): text fields end up in log lines and maps (SPEC §8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not has_control(value)


def opt_bool(body: dict[str, Any], field: str) -> bool | None:
    """An optional boolean field."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise Invalid(f"{field} must be true or false")
    return value


def flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter (?force=true)."""
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise Invalid(f"?{name} must be true or false")
    return value in ("true", "1", "yes")


def _query_int(request: web.Request, name: str, default: int) -> int:
    """A decimal query parameter (ASCII digits only, at most 18 of them: fits SQLite)."""
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise Invalid(f"?{name} must be a non-negative integer")
    return int(text)


def page(request: web.Request, *, default: int = 100, maximum: int = 1000) -> tuple[int, int]:
    """(limit, offset) from ?limit=&offset=."""
    limit = _query_int(request, "limit", default)
    offset = _query_int(request, "offset", 0)
    if not 1 <= limit <= maximum:
        raise Invalid(f"?limit must be 1..{maximum}")
    return limit, offset


def paged(items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """A list page; items holds up to limit+1 rows, the extra one only signals a next page."""
    more = len(items) > limit
    return {"items": items[:limit], "next": offset + limit if more else None}


def normalised(fn: Any, value: Any) -> Any:
    """Run a names normaliser, turning its error into Invalid."""
    try:
        return fn(value)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None


__all__ = ["PolicydError", "error_response", "scope_of", "require_master", "json_body", "only",
           "opt_int", "opt_str", "opt_bool", "is_clean_text", "flag", "page", "paged",
           "normalised"]
