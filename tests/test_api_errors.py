"""Bad input on the API (SPEC §4, §8): a 4xx in the one error shape, never a 5xx.

The walk covers every route of api.app.routes() with garbage bodies, wrong field types and
garbage path parameters, so a new endpoint is covered the day it is added."""
from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import routes
from policyd import passwords
from policyd.config import Config
from policyd.outbound import FIELDS as OUTBOUND_FIELDS
from policyd.ses import SesIdentity, SesStatus
from policyd.store import StoreError
from policyd.store import partners as partner_store
from tests.conftest import MASTER, Daemon, start_daemon

MIB = 1 << 20
World = tuple[Daemon, dict[str, str]]  # the daemon, and path parameters naming its resources
GARBAGE_VALUES: list[Any] = [
    None, True, -1, 2**70, 1.5, "", "x" * 5000, "\ud800", "a\x00b", [], {"k": "v"}, [[["x"]]],
]
RAW_BODIES: list[bytes] = [
    b"{", b"[]", b"[1, 2]", b"null", b'"text"', b"42", b"\xff\xfe\x00garbage", b" ",
    b'{"a": NaN}', b"[" * 100_000, b'{"a":' * 50_000, b"\x00" * 16, b'{"\\ud800": 1}',
    json.dumps({"name": "x" * (MIB + 1)}).encode(),
]
GARBAGE_PATHS = [
    "..", "-lead.com", "a" * 300, "x" * 64 + ".com", "a b.com", "nul\x00.com", "%", "ü" * 100,
    "@", "@@", "0", "-1", "9" * 30, "key_nope", "a@b@c", "%FF%FE", "nosuch.example",
    "nobody@nosuch.example", "@nosuch.example",
]
GARBAGE_QUERY = ("?limit=x&offset=-1&force=maybe&since=garbage&cursor=%FF&domain=..&"
                 "partner_id=x&target=%00&until=never")
# Every field name any endpoint takes; each endpoint must reject the ones it does not.
FIELDS = sorted({
    "name", "partner_id", "email", "password", "quota_bytes", "active", "source",
    "destinations", "parent", "wildcard", "retention_days", "monthly_limit_bytes", "count",
    "bytes", "expires_at", "notify_url", "max_domains", "max_mailboxes_per_domain",
    "max_aliases_per_mailbox", "domain", "current", "Type", "MessageId", "Message",
    "Signature", "SigningCertURL", *OUTBOUND_FIELDS,
})
# A valid body per route, so a wrong type in one field is reached past the required ones.
VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/domains/"): {"name": "new.walk.example"},
    ("POST", "/users/"): {"email": "new@walk.example", "password": "walk-password-1"},
    ("POST", "/aliases/"): {"source": "new@walk.example", "destinations": ["user@walk.example"]},
    ("POST", "/partners/"): {"name": "another"},
    ("POST", "/api-keys/"): {"name": "walk key"},
    ("PUT", "/domains/{name}/parent"): {"parent": None, "wildcard": False},
    ("PUT", "/domains/{name}/retention"): {"retention_days": 30},
    ("PUT", "/domains/{name}/transfer"): {"monthly_limit_bytes": 1000},
    ("PUT", "/domains/{name}/outbound"): {"daily_limit": 10},
    ("POST", "/domains/{name}/outbound/increment"): {"count": 1, "bytes": 10},
    ("PUT", "/users/{email}"): {"name": "User"},
    ("PUT", "/users/{email}/quota"): {"quota_bytes": 1000},
    ("PUT", "/partners/{id}"): {"name": "walk"},
    ("POST", "/outbound/reset-daily"): {"domain": "walk.example", "current": True},
    ("POST", "/outbound/reset-monthly"): {"domain": "walk.example", "current": True},
}


class FakeSes:
    """A small SES stand-in: verification always starts, status is never known."""

    async def verify_domain(self, domain: str) -> SesIdentity:
        return SesIdentity(verification_token="tok-" + domain, dkim_tokens=("a", "b", "c"))

    async def statuses(self, domains: list[str]) -> dict[str, SesStatus]:
        return {}


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at its minimum cost: these tests are about input, not hashing."""
    monkeypatch.setattr(passwords, "ROUNDS", 4)


@pytest.fixture
async def world(make_config: Callable[..., Config]) -> AsyncIterator[World]:
    """A daemon holding one of every resource, and the path parameters naming them."""
    daemon = await start_daemon(make_config(), ses=FakeSes())
    partner = await daemon.partner("walk")
    status, key = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"]})
    assert status == 201, key
    await daemon.domain("walk.example", partner_id=partner["id"])
    for method, path, body in (
            ("POST", "/users/", {"email": "user@walk.example", "password": "walk-password-1"}),
            ("POST", "/aliases/", {"source": "alias@walk.example",
                                   "destinations": ["user@walk.example"]})):
        status, created = await daemon.api(method, path, body)
        assert status == 201, created
    params = {"name": "walk.example", "email": "user@walk.example",
              "source": "alias@walk.example", "id": str(partner["id"]), "token": key["id"],
              "file": "index.html"}
    yield daemon, params
    await daemon.stop()


def assert_error(status: int, body: Any, expected: int, code: str) -> None:
    """A response in the one error shape with this status and code."""
    assert status == expected, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def fill(template: str, params: dict[str, str], garbage: str | None = None) -> str:
    """A concrete path: {param}s from params (unknown ones: 'x'), or all set to garbage."""
    return re.sub(r"\{(\w+)\}",
                  lambda m: garbage if garbage is not None else params.get(m[1], "x"), template)


def canonical(template: str) -> str:
    """The route with a trailing slash where a collection has both forms."""
    return template if "{" in template or template.endswith("/") else template + "/"


class Walker:
    """Sends requests as the master and collects every answer that breaks the contract."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon, self.sent = daemon, 0
        self.failures: list[str] = []

    async def send(self, method: str, path: str, *, raw: bytes | None = None,
                   body: Any = None) -> tuple[int, Any]:
        """One request; a 5xx or a malformed error is recorded, not raised."""
        status, answer = await self.daemon.api(method, path, body, raw=raw)
        self.sent += 1
        what = f"{method} {path[:80]} {(raw or json.dumps(body))[:80]!r}"
        if status >= 500:
            self.failures.append(f"{status} for {what}: {str(answer)[:200]}")
        elif status >= 400 and not _is_error_shape(answer):
            self.failures.append(f"{status} without the error shape for {what}: {answer!r:.200}")
        return status, answer

    async def field_types(self, method: str, path: str, base: dict[str, Any]) -> None:
        """Each field the route accepts, set to each garbage value, on top of a valid body."""
        for field in FIELDS:
            for index, value in enumerate(GARBAGE_VALUES):
                status, answer = await self.send(method, path, body={**base, field: value})
                if index == 0 and status == 400 and "unknown field" in str(answer):
                    break  # the route rejects this field whatever its value: next field


def _is_error_shape(answer: Any) -> bool:
    """True for {"error": {"code": str, "message": str}} and nothing else."""
    if not isinstance(answer, dict) or set(answer) != {"error"}:
        return False
    error = answer["error"]
    return (isinstance(error, dict) and set(error) == {"code", "message"}
            and all(isinstance(error[k], str) and error[k] for k in error))


def route_table() -> list[tuple[str, str]]:
    """(method, path template) of every route, deletions last (they remove the world)."""
    table = sorted({(r.method, r.path) for r in routes() if isinstance(r, web.RouteDef)},
                   key=lambda r: (r[0] == "DELETE", r[1], r[0]))
    assert len(table) > 40, table
    return table


async def test_every_route_survives_garbage_bodies_and_paths(world: World) -> None:
    daemon, params = world
    walker = Walker(daemon)
    for method, template in route_table():
        path = fill(template, params)
        if method in ("POST", "PUT"):
            for raw in RAW_BODIES:
                await walker.send(method, path, raw=raw)
            base = VALID_BODIES.get((method, canonical(template)), {})
            await walker.field_types(method, path, base)
        await walker.send(method, path + GARBAGE_QUERY)
        for garbage in GARBAGE_PATHS if "{" in template else ():
            await walker.send(method, fill(template, params, garbage), body={})
    assert not walker.failures, "\n".join(walker.failures[:40])
    assert walker.sent > 2000


async def test_every_route_needs_a_token_unless_public(world: World) -> None:
    daemon, params = world
    public = ("/health", "/webhooks/ses", "/portal", "/portal/", "/portal/{file}", "/metrics",
              "/openapi.json")
    for method, template in route_table():
        if template in public:
            continue
        path = fill(template, params)
        for token in (None, "bad-token", MASTER + "x"):
            status, body = await daemon.api(method, path, {}, token=token)
            assert_error(status, body, 401, "unauthorized")


async def test_a_wrong_method_is_405_json_with_allow(world: World) -> None:
    daemon, params = world
    for _, template in route_table():
        path = fill(template, params)
        resp = await daemon.client.request("PATCH", path,
                                           headers={"Authorization": f"Bearer {MASTER}"})
        assert resp.status == 405, (path, resp.status)
        assert_error(resp.status, await resp.json(), 405, "method_not_allowed")
        assert "PATCH" not in resp.headers["Allow"] and resp.headers["Allow"]


@pytest.mark.parametrize("path", ["/nope", "/domains/walk.example/nope", "/users/a/b/c",
                                  "/v1/domains/", "/health/x"])
async def test_an_unknown_route_is_404_json(world: World, path: str) -> None:
    daemon, _ = world
    assert_error(*await daemon.api("GET", path), 404, "not_found")


@pytest.mark.parametrize("path", ["/domains/nosuch.example", "/users/nobody@walk.example",
                                  "/aliases/nobody@walk.example", "/aliases/@walk.example",
                                  "/partners/9999", "/api-keys/key_nope",
                                  "/domains/nosuch.example/retention",
                                  "/users/nobody@walk.example/quota"])
async def test_an_unknown_resource_is_404_not_found(world: World,
                                                   path: str) -> None:
    daemon, _ = world
    assert_error(*await daemon.api("GET", path), 404, "not_found")


@pytest.mark.parametrize("raw", [
    b"{", b"[]", b'["walk.example"]', b"null", b'"walk.example"', b"1", b"\xff\xfe",
    b'{"name": "a.example",}', b'{"name": NaN}', b"[" * 100_000,
])
async def test_a_body_that_is_not_a_json_object_is_400(world: World,
                                                       raw: bytes) -> None:
    daemon, _ = world
    assert_error(*await daemon.api("POST", "/domains/", raw=raw), 400, "invalid")


async def test_a_body_over_one_mib_is_400_and_nothing_is_written(
        world: World) -> None:
    daemon, _ = world
    padding = "x" * MIB
    assert_error(*await daemon.api("POST", "/domains/", {"name": "big.example", "p": padding}),
                 400, "invalid")
    assert_error(*await daemon.api("POST", "/users/", {
        "email": "big@walk.example", "password": "walk-password-1", "name": padding}),
        400, "invalid")
    assert_error(*await daemon.api("GET", "/domains/big.example"), 404, "not_found")
    assert_error(*await daemon.api("GET", "/users/big@walk.example"), 404, "not_found")


@pytest.mark.parametrize("name", [
    "", " ", ".", "..", "a..example", ".example.com", "example.com..", "x" * 64 + ".com",
    "-lead.com", "trail-.com", "a" * 300, "exa mple.com", "nul\x00.com", "under_score.com",
    "localhost", "1.2.3.4", "example.123", "xn--zz.com", "\ud800.com", "@example.com",
    "http://example.com", ("a." * 127) + "com", 5, None, True, ["example.com"],
    {"name": "example.com"},
])
async def test_bad_domain_names_are_400(world: World, name: Any) -> None:
    daemon, _ = world
    assert_error(*await daemon.api("POST", "/domains/", {"name": name}), 400, "invalid")
    status, listed = await daemon.api("GET", "/domains/")
    assert [d["name"] for d in listed["items"]] == ["walk.example"]


@pytest.mark.parametrize("field,value", [
    (field, value) for field in ("name", "partner_id") for value in GARBAGE_VALUES
    if not (field == "partner_id" and value is None)
])
async def test_wrong_types_in_a_domain_create_are_400(world: World, field: str,
                                                      value: Any) -> None:
    daemon, _ = world
    body = {"name": "typed.example", field: value}
    assert_error(*await daemon.api("POST", "/domains/", body), 400, "invalid")


async def test_unknown_fields_are_400_everywhere(world: World) -> None:
    daemon, params = world
    for (method, template), base in VALID_BODIES.items():
        path = fill(template, params)
        status, body = await daemon.api(method, path, {**base, "surprise": 1})
        assert_error(status, body, 400, "invalid")
        assert "surprise" in body["error"]["message"]


async def test_a_database_failure_is_503_and_logged_without_the_token(
        world: World, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, params = world
    status, key = await daemon.api("POST", "/api-keys/", {"partner_id": int(params["id"])})
    secret = key["token"]

    def broken(*args: Any) -> None:
        raise StoreError("disk I/O error")
    monkeypatch.setattr(partner_store, "get_key", broken)
    status, body = await daemon.api("GET", f"/api-keys/{secret}/usage", token=secret)
    assert_error(status, body, 503, "unavailable")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "api.app")
    assert "disk I/O error" in logged and "/api-keys/{token}/usage" in logged
    assert secret not in logged


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
domain_bodies = st.fixed_dictionaries(
    {"name": st.text(max_size=70) | st.from_regex(r"[a-zA-Z0-9.-]{1,70}", fullmatch=True)},
    optional={"partner_id": json_values})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values | domain_bodies)
async def test_any_json_body_to_post_domains_is_never_a_5xx(daemon: Daemon, body: Any) -> None:
    status, answer = await daemon.api("POST", "/domains/", raw=json.dumps(body).encode())
    assert status in (201, 400, 409), (status, answer)
    if status != 201:
        assert _is_error_shape(answer), answer
