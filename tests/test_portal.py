"""The partner portal: static files served without auth, with a CSP, and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import web

import api
from api.system import portal_config
from tests.conftest import Daemon

PORTAL = Path(api.__file__).parent / "static" / "portal"


async def test_the_portal_page_is_served_without_a_token(daemon: Daemon) -> None:
    resp = await daemon.client.get("/portal/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert await resp.read() == (PORTAL / "index.html").read_bytes()
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_portal_without_a_slash_redirects(daemon: Daemon) -> None:
    resp = await daemon.client.get("/portal", allow_redirects=False)
    assert resp.status in (301, 308)
    assert resp.headers["Location"] == "/portal/"
    followed = await daemon.client.get("/portal")
    assert followed.status == 200 and followed.url.path == "/portal/"


TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
         ".svg": "image/svg+xml"}


@pytest.mark.parametrize("name,content_type", [
    (p.name, TYPES[p.suffix]) for p in sorted(PORTAL.iterdir()) if p.suffix in TYPES])
async def test_portal_assets_have_their_content_type(daemon: Daemon, name: str,
                                                     content_type: str) -> None:
    resp = await daemon.client.get(f"/portal/{name}")
    assert resp.status == 200 and resp.content_type == content_type
    assert await resp.read() == (PORTAL / name).read_bytes()
    assert "Content-Security-Policy" in resp.headers


@pytest.mark.parametrize("path", [
    "/portal/nope.js", "/portal/portal.js.map", "/portal/%2e%2e%2fapp.py", "/portal/..%2fapp.py",
    "/portal/static/portal.js", "/portal/PORTAL.JS", "/portal/%00",
])
async def test_anything_else_under_portal_is_404_json(daemon: Daemon, path: str) -> None:
    resp = await daemon.client.get(path)
    assert resp.status == 404
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == "not_found"


async def test_the_portal_loads_nothing_from_elsewhere() -> None:
    """No CDN, no build step: every URL the page references is relative and shipped."""
    html = (PORTAL / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs and all(not re.match(r"^[a-z]+:|^//", ref) for ref in refs), refs
    assert {ref for ref in refs} <= {p.name for p in PORTAL.iterdir()}
    assert 'rel="icon" href="favicon.svg"' in html  # no /favicon.ico request, no 401 for it
    for path in PORTAL.glob("*.js"):
        script = path.read_text(encoding="utf-8")
        imports = re.findall(r"""(?:import|from)\s*\(?\s*['"]([^'"]+)['"]""", script)
        assert all(i.startswith("./") and (PORTAL / i[2:]).is_file() for i in imports), imports
        assert "localStorage." not in script  # the key lives in the tab's session storage only
        assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # text only


async def test_the_portal_config_says_which_optional_api_parts_exist(daemon: Daemon) -> None:
    resp = await daemon.client.get("/portal/config.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert "Content-Security-Policy" in resp.headers
    assert set((await resp.json())["features"]) == {"senders"}


def test_the_senders_feature_follows_the_route_table() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})
    bare = web.Application()
    assert portal_config(bare) == {"features": {"senders": False}}
    with_senders = web.Application()
    with_senders.add_routes([web.get("/domains/{name}/senders", handler)])
    assert portal_config(with_senders) == {"features": {"senders": True}}
