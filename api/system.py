"""Handlers for /health, /metrics, the SNS webhook and the static portal."""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from aiohttp import web

from api.common import SCOPE_KEY, require_master, runtime_of
from policyd import feedback
from policyd.metrics import CONTENT_TYPE
from policyd.store import StoreError
from policyd.store.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)
PORTAL_DIR = Path(str(resources.files("api").joinpath("static/portal")))
PORTAL_FILES = {"portal.js": "text/javascript", "portal.css": "text/css",
                "index.html": "text/html"}
PORTAL_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _ping(conn) -> int:  # type: ignore[no-untyped-def]
    return conn.execute("PRAGMA user_version").fetchone()[0]


async def health(request: web.Request) -> web.Response:
    rt = runtime_of(request)
    try:
        version = await rt.store.read(_ping)
        await rt.store.write(_ping)
    except (StoreError, Exception) as exc:  # anything at all: the database is unusable
        log.error("health check: database unusable: %s", exc)
        return web.json_response({"status": "error", "db": "error"}, status=503)
    from policyd import __version__
    return web.json_response({"status": "ok", "db": "ok", "schema_version": version,
                              "expected_schema_version": SCHEMA_VERSION,
                              "version": __version__})


async def metrics(request: web.Request) -> web.Response:
    if request.get(SCOPE_KEY) is not None:
        require_master(request)
    body = runtime_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def ses_webhook(request: web.Request) -> web.Response:
    body = await request.read()
    result = await feedback.handle_sns(runtime_of(request), body)
    return web.json_response(result)


async def portal(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file") or "index.html"
    if name not in PORTAL_FILES:
        raise web.HTTPNotFound(reason="not found")
    return web.FileResponse(PORTAL_DIR / name, headers={
        **PORTAL_HEADERS, "Content-Type": PORTAL_FILES[name]})


async def portal_redirect(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/portal/")


ROUTES = [
    web.get("/health", health), web.get("/metrics", metrics),
    web.post("/webhooks/ses", ses_webhook),
    web.get("/portal", portal_redirect), web.get("/portal/", portal),
    web.get("/portal/{file}", portal),
]
