"""Handlers for /health, /metrics and the static portal."""
from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path

from aiohttp import web

from api.common import SCOPE_KEY, require_master, runtime_of
from policyd import __version__
from policyd.metrics import CONTENT_TYPE
from policyd.store.schema import SCHEMA_VERSION, user_version

log = logging.getLogger(__name__)
PORTAL_DIR = Path(str(resources.files("api").joinpath("static/portal")))
PORTAL_FILES = {"portal.js": "text/javascript", "portal.css": "text/css",
                "index.html": "text/html"}
HEALTH_TIMEOUT = 2.0  # seconds: a database slower than this is as good as down for a monitor
PORTAL_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def _probe(request: web.Request) -> int:
    """Read through a reader and take the write lock through the writer; the schema version."""
    store = runtime_of(request).store
    async with asyncio.timeout(HEALTH_TIMEOUT):
        version = await store.read(user_version)
        await store.write(user_version)
    return version


async def health(request: web.Request) -> web.Response:
    """Liveness for monitors and load balancers: 503 while the database is unusable."""
    try:
        version = await _probe(request)
    except Exception as exc:  # anything at all (closed, locked, slow, broken): unusable
        log.error("health check: database unusable: %r", exc)
        return web.json_response(
            {"status": "error", "db": "error",
             "error": {"code": "unavailable", "message": "database unusable"}}, status=503)
    body = {"status": "ok", "db": "ok", "schema_version": version,
            "expected_schema_version": SCHEMA_VERSION, "version": __version__}
    replication = runtime_of(request).replication
    if replication is not None:  # informative: a lagging replica does not fail the check
        body["replication"] = replication.health()
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text (master, or no token from loopback)."""
    if request.get(SCOPE_KEY) is not None:
        require_master(request)
    body = runtime_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def portal(request: web.Request) -> web.StreamResponse:
    """GET /portal/ and its few static files (no auth: the page asks for the key)."""
    name = request.match_info.get("file") or "index.html"
    if name not in PORTAL_FILES:
        raise web.HTTPNotFound(reason="not found")
    return web.FileResponse(PORTAL_DIR / name, headers={
        **PORTAL_HEADERS, "Content-Type": PORTAL_FILES[name]})


async def portal_redirect(request: web.Request) -> web.Response:
    """GET /portal: to /portal/, so the page's relative URLs resolve."""
    raise web.HTTPMovedPermanently("/portal/")


ROUTES = [
    web.get("/health", health), web.get("/metrics", metrics),
    web.get("/portal", portal_redirect), web.get("/portal/", portal),
    web.get("/portal/{file}", portal),
]
