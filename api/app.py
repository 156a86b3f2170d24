"""The aiohttp application: middlewares, the one route table, and the service lifecycle."""
from __future__ import annotations

import hmac
import logging
import re
import sqlite3
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_request import BaseRequest

from api import domains, mailboxes, openapi, outbound, senders, system, tenancy, webhooks
from api.common import MASTER_TOKEN, RUNTIME, SCOPE_KEY, error_response
from policyd.errors import PolicydError, Unauthorized
from policyd.runtime import Runtime
from policyd.store import StoreError
from policyd.store import partners as partner_store
from policyd.store.scope import MASTER, Scope
from policyd.timeutil import iso, utcnow

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PREFIXES = ("/health", "/webhooks/ses", "/portal", "/openapi.json")
SECRET_PARAMS = frozenset({"token"})  # /api-keys/{token}: a key id, or the token itself


def routes() -> list[web.AbstractRouteDef]:
    """The whole route table, in one place."""
    return [
        *system.ROUTES, *domains.ROUTES, *outbound.ROUTES, *mailboxes.ROUTES, *tenancy.ROUTES,
        *senders.ROUTES, *webhooks.ROUTES, *openapi.ROUTES,
    ]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in the one JSON shape; bad input is never a 500."""
    try:
        return await handler(request)
    except PolicydError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPRequestEntityTooLarge:
        return error_response(400, "invalid", "request body over the size limit (1 MiB)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except (StoreError, sqlite3.OperationalError) as exc:  # closed, locked, disk, I/O
        log.error("database unavailable for %s %s: %s", request.method, loggable_path(request),
                  exc)
        return error_response(503, "unavailable", "database unavailable, try again")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, loggable_path(request))
        return error_response(500, "internal", "internal error")


def loggable_path(request: web.Request) -> str:
    """The path for a log line, secret parameters left as their {placeholder} (SPEC §3)."""
    resource = request.match_info.route.resource
    if resource is None:
        return "(no route)"
    info = request.match_info
    return re.sub(r"\{(\w+)\}",
                  lambda m: m[0] if m[1] in SECRET_PARAMS else info.get(m[1], m[0]),
                  resource.canonical)


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, ...) in the one JSON shape."""
    response = error_response(exc.status, _error_code(exc.status), exc.reason)
    if "Allow" in exc.headers:  # RFC 9110 §15.5.6: a 405 lists the allowed methods
        response.headers["Allow"] = exc.headers["Allow"]
    return response


_ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "exists", 503: "unavailable"}


def _error_code(status: int) -> str:
    return _ERROR_CODES.get(status, "internal" if status >= 500 else "invalid")


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with its own error replies (a request line or header
    its parser refuses, a handler timeout) in the one JSON shape instead of text/plain: no
    middleware sees those requests (SPEC §8: every 4xx is JSON)."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the connection is broken
            raise ConnectionError("response already sent, cannot send an error")
        if status >= 500:
            log.error("HTTP request from %s failed: %s", request.remote, type(exc).__name__,
                      exc_info=exc)
        else:  # one line, and never the client's bytes (the parser's message quotes them)
            log.info("HTTP request from %s refused (%d): %s", request.remote, status,
                     type(exc).__name__ if exc else "bad request")
        if isinstance(exc, LineTooLong):
            detail = "request line or header over the size limit"
        else:
            detail = "malformed HTTP request" if status < 500 else "internal error"
        response = error_response(status, _error_code(status), detail)
        response.force_close()
        return response


# aiohttp builds one RequestHandler per connection from this module-level name
# (web_server.Server.__call__); there is no option to pass another class.
web_server.RequestHandler = _JsonErrorHandler  # type: ignore[misc]


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


async def authenticate(request: web.Request, token: str) -> Scope | None:
    """The Scope a token grants, or None: master compared in constant time, keys by hash."""
    master = request.app[MASTER_TOKEN]
    if master and hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                      master.encode("utf-8")):
        return MASTER
    rt = request.app[RUNTIME]
    digest = partner_store.hash_token(token)
    found = await rt.store.read(partner_store.key_by_token_hash, digest)
    if found is None:
        return None
    key, stored = found
    now = iso(utcnow())
    if not hmac.compare_digest(stored, digest) or not key.usable(now):
        return None
    await rt.store.write(partner_store.touch_key, key.id, now)
    return Scope(actor=key.id, partner_id=key.partner_id)


def _public(request: web.Request) -> bool:
    path = request.path
    if path == "/metrics":
        return request.remote in ("127.0.0.1", "::1") and _token(request) is None
    return any(path == p or path.startswith(p + "/") for p in PUBLIC_PREFIXES)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer or X-API-Key on every path but the public ones."""
    if _public(request):
        return await handler(request)
    token = _token(request)
    scope = await authenticate(request, token) if token else None
    if scope is None:
        raise Unauthorized("missing, invalid, expired or revoked token")
    request[SCOPE_KEY] = scope
    return await handler(request)


def create_app(runtime: Runtime, master_token: str,
               services: Callable[[web.Application], AsyncIterator[None]] | None = None
               ) -> web.Application:
    """Build the application; services (a cleanup_ctx) starts and stops everything else."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware],
                          client_max_size=runtime.config.api.max_body_bytes)
    app[RUNTIME] = runtime
    app[MASTER_TOKEN] = master_token
    if services is not None:
        app.cleanup_ctx.append(services)
    app.add_routes(routes())
    return app

