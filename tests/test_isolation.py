"""Tenant isolation: partner B's token against partner A's resources, on every route of
`api.app.routes()`, so that a new endpoint is covered (or fails loudly) without a new test."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from api.app import routes
from policyd import passwords
from tests.conftest import Daemon

PASSWORD = "correct-horse-9"
PUBLIC = {("GET", "/health"), ("POST", "/webhooks/ses"), ("GET", "/portal"),
          ("GET", "/portal/{file}"), ("GET", "/openapi.json")}
MASTER_ONLY = {
    ("POST", "/partners"), ("GET", "/partners"), ("GET", "/partners/{id}"),
    ("PUT", "/partners/{id}"), ("DELETE", "/partners/{id}"),
    ("PUT", "/domains/{name}/parent"), ("POST", "/domains/{name}/ses-verify"),
    ("PUT", "/domains/{name}/retention"), ("PUT", "/domains/{name}/transfer"),
    ("POST", "/domains/{name}/outbound/increment"), ("POST", "/outbound/reset-daily"),
    ("POST", "/outbound/reset-monthly"), ("GET", "/audit"), ("GET", "/metrics"),
}


@dataclass(frozen=True)
class Tenant:
    """One partner's objects (or names of objects that do not exist)."""

    partner_id: int
    token: str
    key_id: str
    domain: str
    mailbox: str
    alias: str

    def path_values(self, by_token: bool) -> dict[str, str]:
        """What fills each path parameter."""
        return {"name": self.domain, "email": self.mailbox, "source": self.alias,
                "token": self.token if by_token else self.key_id, "id": str(self.partner_id)}

    def masked(self, text: str) -> str:
        """text with this tenant's identifiers replaced by placeholders."""
        for value, mask in sorted([(self.token, "<token>"), (self.key_id, "<key>"),
                                   (self.mailbox, "<mailbox>"), (self.alias, "<alias>"),
                                   (self.domain, "<domain>")], key=lambda p: -len(p[0])):
            text = text.replace(value, mask)
        return text


MISSING = Tenant(999_999, "pd_" + "x" * 43, "key_00000000deadbeef", "missing.test",
                 "ghost@missing.test", "nobody@missing.test")
Body = Callable[[Tenant], Any]
# A plausible body for each route that takes one; a new PUT/POST route gets {} until it is listed.
BODIES: dict[tuple[str, str], Body] = {
    ("POST", "/domains"): lambda t: {"name": "new-b.test", "partner_id": t.partner_id},
    ("POST", "/users"): lambda t: {"email": f"new@{t.domain}", "password": PASSWORD},
    ("POST", "/aliases"): lambda t: {"source": f"new@{t.domain}", "destinations": [t.mailbox]},
    ("POST", "/api-keys"): lambda t: {"partner_id": t.partner_id, "name": "stolen"},
    ("POST", "/partners"): lambda t: {"name": "mine now"},
    ("PUT", "/partners/{id}"): lambda t: {"max_domains": 0},
    ("PUT", "/domains/{name}/parent"): lambda t: {"parent": None, "wildcard": True},
    ("PUT", "/domains/{name}/retention"): lambda t: {"retention_days": 1},
    ("PUT", "/domains/{name}/transfer"): lambda t: {"monthly_limit_bytes": 1},
    ("PUT", "/domains/{name}/outbound"): lambda t: {"daily_limit": 1},
    ("POST", "/domains/{name}/outbound/increment"): lambda t: {"count": 1},
    ("POST", "/outbound/reset-daily"): lambda t: {"domain": t.domain, "current": True},
    ("POST", "/outbound/reset-monthly"): lambda t: {"domain": t.domain, "current": True},
    ("PUT", "/users/{email}"): lambda t: {"name": "taken", "password": PASSWORD + "!",
                                          "active": False},
    ("PUT", "/users/{email}/quota"): lambda t: {"quota_bytes": 1},
}
QUERIES = {("DELETE", "/domains/{name}"): "?force=true",
           ("DELETE", "/partners/{id}"): "?force=true"}
# Collection reads answer 200 with B's own items only, also when asked for A's by filter.
LISTS = {("GET", "/domains"): "", ("GET", "/users"): "?domain={domain}",
         ("GET", "/aliases"): "?domain={domain}", ("GET", "/api-keys"): "?partner_id={partner_id}"}
NO_BODY_METHODS = ("GET", "DELETE")


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at its minimum cost: hashing is not what these tests are about."""
    monkeypatch.setattr(passwords, "ROUNDS", 4)


async def make_tenant(daemon: Daemon, name: str) -> Tenant:
    """A partner with a key, a verified domain, a mailbox and an alias, made through the API."""
    partner = await daemon.partner(name)
    status, key = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"]})
    assert status == 201, key
    domain = f"{name}.test"
    await daemon.domain(domain, token=key["token"])
    mailbox, alias = f"box@{domain}", f"alias@{domain}"
    for path, body in (("/users/", {"email": mailbox, "password": PASSWORD}),
                       ("/aliases/", {"source": alias, "destinations": [mailbox]})):
        status, reply = await daemon.api("POST", path, body, token=key["token"])
        assert status == 201, reply
    return Tenant(partner["id"], key["token"], key["id"], domain, mailbox, alias)


async def snapshot(daemon: Daemon, t: Tenant) -> dict[str, Any]:
    """Everything the master can read about a tenant (reads with the master token only)."""
    d = t.domain
    paths = [f"/domains/{d}", f"/domains/{d}/outbound", f"/domains/{d}/retention",
             f"/domains/{d}/transfer", f"/domains/{d}/outbound/history", f"/users/{t.mailbox}",
             f"/users/?domain={d}", f"/aliases/?domain={d}", f"/aliases/{t.alias}",
             f"/api-keys/?partner_id={t.partner_id}", f"/partners/{t.partner_id}",
             f"/api-keys/{t.key_id}/usage", "/audit?limit=1000"]
    views = {}
    for path in paths:
        status, body = await daemon.api("GET", path)
        assert status == 200, (path, body)
        views[path] = body
    return views


def route_table() -> list[tuple[str, str]]:
    """(method, path) of every route, trailing-slash twins folded together."""
    seen: dict[tuple[str, str], None] = {}
    for route in routes():
        path = route.path.rstrip("/") or "/"  # type: ignore[attr-defined]
        seen[(route.method, path)] = None  # type: ignore[attr-defined]
    return list(seen)


def fill(path: str, values: dict[str, str]) -> str:
    """The path with its {params} filled; a parameter the walker does not know fails the test."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[0]
        if name not in values:
            pytest.fail(f"the isolation walker cannot fill {{{name}}} in {path}: teach it")
        return values[name]
    return re.sub(r"\{([^}]+)\}", one, path)


async def call(daemon: Daemon, route: tuple[str, str], t: Tenant, token: str,
               by_token: bool = False) -> tuple[int, Any]:
    """Call a route with token, its params and body taken from tenant t."""
    method, template = route
    path = fill(template, t.path_values(by_token)) + QUERIES.get(route, "")
    body = BODIES.get(route, lambda _: None if method in NO_BODY_METHODS else {})(t)
    return await daemon.api(method, path, body, token=token)


async def check_route(daemon: Daemon, route: tuple[str, str], a: Tenant, b: Tenant) -> None:
    """B against A's objects answers exactly as B against objects that do not exist."""
    method, template = route
    if route in LISTS:
        return await check_list(daemon, route, a, b)
    if route not in MASTER_ONLY and "{" not in template and route not in BODIES:
        pytest.fail(f"the isolation walker does not know {method} {template}: teach it")
    for by_token in ((False, True) if "{token}" in template else (False,)):
        status, reply = await call(daemon, route, a, b.token, by_token)
        missing_status, missing = await call(daemon, route, MISSING, b.token, by_token)
        where = (method, template, by_token, reply)
        if route in MASTER_ONLY:
            assert status == 403 and reply["error"]["code"] == "forbidden", where
        else:
            assert status in (403, 404), where
        assert (status, a.masked(json.dumps(reply))) == (
            missing_status, MISSING.masked(json.dumps(missing))), where


async def check_list(daemon: Daemon, route: tuple[str, str], a: Tenant, b: Tenant) -> None:
    """A collection read shows B's own items and nothing of A's, even filtered for A."""
    method, template = route
    filtered = LISTS[route].format(**vars(a))
    for query, mine in [("", True)] + ([(filtered, False)] if filtered else []):
        status, reply = await daemon.api(method, template + "/" + query, token=b.token)
        assert status == 200, (template, query, reply)
        text = json.dumps(reply)
        for secret in (a.domain, a.key_id, a.token):
            assert secret not in text, (template, query, reply)
        assert (len(reply["items"]) > 0) is mine, (template, query, reply)


async def test_every_route_hides_partner_a_from_partner_b(daemon: Daemon) -> None:
    a = await make_tenant(daemon, "alpha")
    b = await make_tenant(daemon, "bravo")
    before = await snapshot(daemon, a)
    walked = 0
    for route in route_table():
        if route in PUBLIC:
            continue
        await check_route(daemon, route, a, b)
        walked += 1
    assert walked >= 40  # the table really was walked
    assert await snapshot(daemon, a) == before
    status, mine = await daemon.api("GET", f"/domains/{a.domain}", token=a.token)
    assert status == 200 and mine["partner_id"] == a.partner_id


async def test_the_walker_fails_on_a_route_it_cannot_fill() -> None:
    with pytest.raises(pytest.fail.Exception, match="cannot fill"):
        fill("/domains/{name}/things/{thing_id}", MISSING.path_values(False))


async def test_the_public_allow_list_is_exactly_public(daemon: Daemon) -> None:
    for method, path in PUBLIC:
        status, _ = await daemon.api(method, path.format(file="index.html"), None, token=None)
        assert status not in (401, 403), (method, path)
    assert PUBLIC <= set(route_table())
    status, _ = await daemon.api("GET", "/domains/", token=None)
    assert status == 401


async def test_usage_and_change_feed_show_only_the_own_partner(daemon: Daemon) -> None:
    a = await make_tenant(daemon, "alpha")
    b = await make_tenant(daemon, "bravo")
    status, usage = await daemon.api("GET", f"/api-keys/{b.key_id}/usage", token=b.token)
    assert status == 200
    assert [usage["usage"][k]["used"] for k in ("domains", "mailboxes", "aliases")] == [1, 1, 1]
    assert {c["key"] for c in usage["changes"]} == {b.domain, b.mailbox, b.alias}
    status, by_master = await daemon.api("GET", f"/api-keys/{a.key_id}/usage")
    assert {c["key"] for c in by_master["changes"]} == {a.domain, a.mailbox, a.alias}
    assert (await daemon.api("DELETE", f"/domains/{a.domain}?force=true", token=a.token)
            )[0] == 204
    status, later = await daemon.api("GET", f"/api-keys/{b.key_id}/usage?since="
                                     f"{usage['cursor']}", token=b.token)
    assert status == 200 and later["changes"] == []


async def test_a_subdomain_never_links_to_another_partners_wildcard_parent(
        daemon: Daemon) -> None:
    a = await make_tenant(daemon, "alpha")
    b = await make_tenant(daemon, "bravo")
    body = {"parent": None, "wildcard": True}
    assert (await daemon.api("PUT", f"/domains/{a.domain}/parent", body))[0] == 200
    # a client may not claim a subdomain of another partner's domain at all (SPEC §5)
    status, body = await daemon.api("POST", "/domains/", {"name": f"shop.{a.domain}"},
                                    token=b.token)
    assert (status, body["error"]["code"]) == (403, "forbidden"), body
    # the master may give it to b: then it is b's, and never linked to a's parent
    created = await daemon.domain(f"shop.{a.domain}", partner_id=b.partner_id, verified=False)
    assert created["parent"] is None and created["ses"]["status"] != "inherited"
    mine = await daemon.domain(f"shop2.{a.domain}", token=a.token, verified=False)
    assert mine["parent"] == a.domain  # the same partner's subdomain is linked


async def test_a_client_claims_subdomains_only_under_its_own_closest_ancestor(
        daemon: Daemon) -> None:
    a = await make_tenant(daemon, "alpha")
    b = await make_tenant(daemon, "bravo")
    await daemon.domain(f"deep.{a.domain}", token=a.token, verified=False)
    await daemon.domain(f"b.deep.{a.domain}", partner_id=b.partner_id, verified=False)

    async def create(name: str, token: str) -> int:
        return (await daemon.api("POST", "/domains/", {"name": name}, token=token))[0]

    assert await create(f"x.{a.domain}", b.token) == 403  # a's domain is closest
    assert await create(f"x.deep.{a.domain}", b.token) == 403  # a's subdomain is closest
    assert await create(f"x.b.deep.{a.domain}", a.token) == 403  # b's is closest, not a's
    assert await create(f"x.b.deep.{a.domain}", b.token) == 201
    assert await create(f"x.deep.{a.domain}", a.token) == 201
    assert await create("unhosted-parent.example", b.token) == 201  # no ancestor hosted
    assert await create("sub.nothing-hosted.example", b.token) == 201


async def test_alias_quota_never_reveals_another_partners_mailbox(daemon: Daemon) -> None:
    a = await make_tenant(daemon, "alpha")
    b = await make_tenant(daemon, "bravo")
    assert (await daemon.api("PUT", f"/partners/{b.partner_id}",
                             {"max_aliases_per_mailbox": 1}))[0] == 200
    replies = [await daemon.api("POST", "/aliases/", {"source": f"fw{i}@{b.domain}",
                                                      "destinations": [target]}, token=b.token)
               for i, target in enumerate((a.mailbox, "ghost@missing.test"))]
    assert [status for status, _ in replies] == [201, 201], replies
