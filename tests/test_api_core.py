"""The management API's core resources through aiohttp's test client against the real daemon:
health, auth headers, domains (normalisation, IDN, delete, suspension, wildcard parents,
dns-check, retention, transfer), mailboxes with bcrypt, aliases and catch-alls, pagination."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, AsyncIterator, Callable

import bcrypt
import pytest

from policyd import passwords
from policyd.config import Config
from tests.conftest import MASTER, Daemon, outbound, start_daemon, password_hash_of
from tests.dnsserver import DnsServer

PASSWORD = "correct-horse-9"


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at its minimum cost (the real cost is checked in test_hashing_stress.py)."""
    monkeypatch.setattr(passwords, "ROUNDS", 4)


async def tenant(daemon: Daemon, name: str = "acme") -> tuple[int, str, str]:
    """A partner with one client key: (partner id, token, key id)."""
    partner = await daemon.partner(name)
    status, key = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"]})
    assert status == 201, key
    return partner["id"], key["token"], key["id"]


def assert_error(status: int, body: Any, expected: int, code: str) -> None:
    """A response in the one error shape with this status and code."""
    assert status == expected, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def user(daemon: Daemon, email: str, password: str = PASSWORD,
               **fields: Any) -> dict[str, Any]:
    """Create a mailbox through the API."""
    status, body = await daemon.api("POST", "/users/", {"email": email, "password": password,
                                                         **fields})
    assert status == 201, body
    return body


async def stored_hash(daemon: Daemon, email: str) -> str:
    """The password hash as stored (and as Dovecot reads it)."""
    stored = await daemon.rt.store.read(password_hash_of, email)
    assert stored is not None
    return stored


def verifies(password: str, stored: str) -> bool:
    """bcrypt's own check of a '{BLF-CRYPT}$2b$...' hash."""
    assert stored.startswith("{BLF-CRYPT}$2b$"), stored
    return bcrypt.checkpw(password.encode("utf-8"), stored.removeprefix("{BLF-CRYPT}").encode())


# --- health and auth ------------------------------------------------------------------------
async def test_health_answers_without_a_token(daemon: Daemon) -> None:
    status, body = await daemon.api("GET", "/health", token=None)
    assert status == 200, body
    assert body["status"] == "ok" and body["db"] == "ok"
    assert body["schema_version"] == body["expected_schema_version"] > 0


async def test_health_is_503_once_the_store_is_closed(daemon: Daemon) -> None:
    await daemon.rt.store.close()
    status, body = await daemon.api("GET", "/health", token=None)
    assert status == 503, body
    assert body["status"] == "error" and body["db"] == "error"
    assert body["error"]["code"] == "unavailable"
    status, body = await daemon.api("GET", "/domains/")
    assert_error(status, body, 503, "unavailable")


async def test_health_is_503_while_another_process_holds_the_write_lock(
        make_config: Callable[..., Config]) -> None:
    config = make_config(database={"busy_timeout": "0.2"})
    daemon = await start_daemon(config)
    holder = sqlite3.connect(str(config.db_path), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # e.g. a stuck sqlite3 shell or a backup tool
        status, body = await daemon.api("GET", "/health", token=None)
        assert status == 503 and body["db"] == "error", body
        holder.execute("ROLLBACK")
        status, body = await daemon.api("GET", "/health", token=None)
        assert status == 200 and body["db"] == "ok", body
    finally:
        holder.close()
        await daemon.stop()


async def test_every_call_but_health_needs_a_valid_token(daemon: Daemon) -> None:
    _, token, _ = await tenant(daemon)
    assert_error(*await daemon.api("GET", "/domains/", token=None), 401, "unauthorized")
    assert_error(*await daemon.api("GET", "/domains/", token="not-a-token"), 401, "unauthorized")
    assert_error(*await daemon.api("GET", "/domains/", token=None,
                                   headers={"Authorization": f"Basic {MASTER}"}),
                 401, "unauthorized")
    for secret in (MASTER, token):
        assert (await daemon.api("GET", "/domains/", token=secret))[0] == 200
        assert (await daemon.api("GET", "/domains/", token=None,
                                 headers={"X-API-Key": secret}))[0] == 200
        assert (await daemon.api("GET", "/domains/", token=None,
                                 headers={"Authorization": f"bearer {secret}"}))[0] == 200


# --- domains --------------------------------------------------------------------------------
async def test_domain_create_list_get_delete(daemon: Daemon) -> None:
    status, created = await daemon.api("POST", "/domains/", {"name": "example.com"})
    assert status == 201, created
    assert (created["name"], created["partner_id"], created["status"]) == (
        "example.com", None, "active")
    assert created["parent"] is None and created["wildcard"] is False
    assert created["ses"]["status"] == "not_started"
    assert created["retention_days"] is None
    assert created["transfer"] == {"monthly_limit_bytes": None, "used_bytes": 0}
    assert created["outbound"]["tier"] == "standard"
    assert created["created_at"].endswith("Z")
    status, listed = await daemon.api("GET", "/domains/")
    assert status == 200 and [d["name"] for d in listed["items"]] == ["example.com"]
    assert listed["next"] is None
    status, shown = await daemon.api("GET", "/domains/example.com")
    assert status == 200 and shown == created
    assert (await daemon.api("DELETE", "/domains/example.com"))[0] == 204
    assert_error(*await daemon.api("GET", "/domains/example.com"), 404, "not_found")
    assert_error(*await daemon.api("DELETE", "/domains/example.com"), 404, "not_found")


async def test_domain_names_are_normalised(daemon: Daemon) -> None:
    status, created = await daemon.api("POST", "/domains/", {"name": " Example.COM. "})
    assert status == 201 and created["name"] == "example.com", created
    assert_error(*await daemon.api("POST", "/domains/", {"name": "example.com"}), 409, "exists")
    assert_error(*await daemon.api("POST", "/domains/", {"name": "EXAMPLE.com."}), 409, "exists")
    status, shown = await daemon.api("GET", "/domains/EXAMPLE.Com.")
    assert status == 200 and shown["name"] == "example.com"


async def test_idn_domain_is_stored_as_a_label_and_reachable_by_either_form(
        daemon: Daemon) -> None:
    status, created = await daemon.api("POST", "/domains/", {"name": "Bücher.example"})
    assert status == 201 and created["name"] == "xn--bcher-kva.example", created
    for path_name in ("bücher.example", "xn--bcher-kva.example", "BÜCHER.example."):
        status, shown = await daemon.api("GET", f"/domains/{path_name}")
        assert status == 200 and shown["name"] == "xn--bcher-kva.example", (path_name, shown)
    assert_error(*await daemon.api("POST", "/domains/", {"name": "xn--bcher-kva.example"}),
                 409, "exists")
    created_user = await user(daemon, "joerg@BÜCHER.example")
    assert created_user["email"] == "joerg@xn--bcher-kva.example"


async def test_a_client_creates_domains_for_its_own_partner_only(daemon: Daemon) -> None:
    pid, token, _ = await tenant(daemon, "acme")
    other = await daemon.partner("other")
    status, created = await daemon.api("POST", "/domains/", {"name": "acme.test"}, token=token)
    assert status == 201 and created["partner_id"] == pid, created
    assert_error(*await daemon.api("POST", "/domains/", {"name": "b.test",
                                                          "partner_id": other["id"]},
                                   token=token), 403, "forbidden")
    status, created = await daemon.api("POST", "/domains/", {"name": "c.test",
                                                              "partner_id": other["id"]})
    assert status == 201 and created["partner_id"] == other["id"]
    assert_error(*await daemon.api("POST", "/domains/", {"name": "d.test", "partner_id": 999}),
                 400, "invalid")


async def test_delete_is_refused_while_mailboxes_exist_unless_forced(daemon: Daemon) -> None:
    _, token, key_id = await tenant(daemon)
    await daemon.domain("example.com", token=token)
    await user(daemon, "bob@example.com")
    status, _ = await daemon.api("POST", "/aliases/", {"source": "@example.com",
                                                       "destinations": ["bob@example.com"]})
    assert status == 201
    assert_error(*await daemon.api("DELETE", "/domains/example.com", token=token), 409, "exists")
    assert (await daemon.api("GET", "/users/bob@example.com"))[0] == 200  # nothing half-done
    assert_error(*await daemon.api("DELETE", "/domains/example.com?force=maybe", token=token),
                 400, "invalid")
    status, _ = await daemon.api("DELETE", "/domains/example.com?force=true", token=token)
    assert status == 204
    assert_error(*await daemon.api("GET", "/users/bob@example.com"), 404, "not_found")
    assert_error(*await daemon.api("GET", "/aliases/@example.com"), 404, "not_found")
    status, usage = await daemon.api("GET", f"/api-keys/{key_id}/usage", token=token)
    assert status == 200, usage
    deleted = {(c["kind"], c["key"]) for c in usage["changes"] if c["op"] == "deleted"}
    assert deleted == {("domain", "example.com"), ("mailbox", "bob@example.com"),
                       ("alias", "@example.com")}


async def test_an_empty_domain_is_deleted_without_force(daemon: Daemon) -> None:
    await daemon.domain("example.com", verified=False)
    assert (await daemon.api("DELETE", "/domains/example.com"))[0] == 204


async def test_a_client_suspends_and_activates_its_domain(daemon: Daemon) -> None:
    _, token, _ = await tenant(daemon)
    await daemon.domain("example.com", token=token)
    policy = await daemon.policy()
    try:
        status, body = await daemon.api("PUT", "/domains/example.com/suspend", token=token)
        assert status == 200 and body["status"] == "suspended", body
        assert (await policy.ask(**outbound("bob@example.com"))).startswith("DEFER 4.7.1")
        status, body = await daemon.api("PUT", "/domains/example.com/activate", token=token)
        assert status == 200 and body["status"] == "active", body
        assert await policy.ask(**outbound("bob@example.com")) == "DUNNO"
    finally:
        await policy.close()


async def test_a_master_suspension_cannot_be_lifted_by_a_client(daemon: Daemon) -> None:
    _, token, _ = await tenant(daemon)
    await daemon.domain("example.com", token=token)
    status, body = await daemon.api("PUT", "/domains/example.com/suspend")
    assert status == 200 and body["status"] == "suspended"
    assert_error(*await daemon.api("PUT", "/domains/example.com/activate", token=token),
                 403, "forbidden")
    # suspending again must not turn the master's suspension into the client's own
    assert (await daemon.api("PUT", "/domains/example.com/suspend", token=token))[0] == 200
    assert_error(*await daemon.api("PUT", "/domains/example.com/activate", token=token),
                 403, "forbidden")
    assert (await daemon.api("GET", "/domains/example.com"))[1]["status"] == "suspended"
    status, body = await daemon.api("PUT", "/domains/example.com/activate")
    assert status == 200 and body["status"] == "active"


async def test_a_new_subdomain_of_a_wildcard_domain_is_linked(daemon: Daemon) -> None:
    pid, token, _ = await tenant(daemon)
    await daemon.domain("parent.com", token=token)
    assert_error(*await daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True},
                                   token=token), 403, "forbidden")
    status, body = await daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    assert status == 200 and body["wildcard"] is True and body["parent"] is None, body
    status, sub = await daemon.api("POST", "/domains/", {"name": "Sub.Parent.com"}, token=token)
    assert status == 201 and sub["parent"] == "parent.com", sub
    assert sub["ses"]["status"] == "inherited"  # the parent is verified: no SES call of its own
    # the master naming no partner: the subdomain joins the parent's partner and is linked
    status, deep = await daemon.api("POST", "/domains/", {"name": "x.y.parent.com"})
    assert status == 201 and (deep["parent"], deep["partner_id"]) == ("parent.com", pid), deep
    status, unrelated = await daemon.api("POST", "/domains/", {"name": "parent.com.example"})
    assert status == 201 and unrelated["parent"] is None
    policy = await daemon.policy()
    try:
        assert await policy.ask(**outbound("bob@sub.parent.com")) == "DUNNO"
    finally:
        await policy.close()


async def test_the_master_links_and_unlinks_a_parent(daemon: Daemon) -> None:
    await daemon.domain("parent.com")
    await daemon.domain("a.parent.com", verified=False)
    await daemon.domain("elsewhere.com", verified=False)
    status, body = await daemon.api("GET", "/domains/a.parent.com")
    assert body["parent"] is None
    status, body = await daemon.api("PUT", "/domains/a.parent.com/parent",
                                    {"parent": "PARENT.com."})
    assert status == 200 and body["parent"] == "parent.com", body
    assert body["ses"]["status"] == "inherited" and body["wildcard"] is False
    for bad in ("elsewhere.com", "a.parent.com", "arent.com", 5, ""):
        assert_error(*await daemon.api("PUT", "/domains/a.parent.com/parent", {"parent": bad}),
                     400, "invalid")
    await daemon.domain("b.missing.com", verified=False)
    assert_error(*await daemon.api("PUT", "/domains/b.missing.com/parent",
                                   {"parent": "missing.com"}), 404, "not_found")
    for bad_body in ({}, {"wildcard": None}, {"wildcard": "yes"}, {"parent": None, "x": 1}):
        assert_error(*await daemon.api("PUT", "/domains/a.parent.com/parent", bad_body),
                     400, "invalid")
    status, body = await daemon.api("PUT", "/domains/a.parent.com/parent", {"parent": None})
    assert status == 200 and body["parent"] is None and body["ses"]["status"] == "not_started"
    status, audit = await daemon.api("GET", "/audit?target=a.parent.com")
    assert [e["action"] for e in audit["items"]] == [
        "domain.create", "domain.parent", "domain.parent"]
    assert audit["items"][1]["after"]["parent"] == "parent.com"
    assert audit["items"][2]["after"]["parent"] is None


async def test_deleting_a_parent_unlinks_its_subdomains(daemon: Daemon) -> None:
    _, token, key_id = await tenant(daemon)
    await daemon.domain("parent.com", token=token)
    await daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    status, sub = await daemon.api("POST", "/domains/", {"name": "sub.parent.com"}, token=token)
    assert sub["ses"]["status"] == "inherited"
    assert (await daemon.api("DELETE", "/domains/parent.com", token=token))[0] == 204
    status, sub = await daemon.api("GET", "/domains/sub.parent.com")
    assert status == 200 and sub["parent"] is None and sub["ses"]["status"] == "not_started"
    status, usage = await daemon.api("GET", f"/api-keys/{key_id}/usage", token=token)
    assert {"op": "updated", "kind": "domain", "key": "sub.parent.com"} in [
        {k: c[k] for k in ("op", "kind", "key")} for c in usage["changes"]]
    policy = await daemon.policy()
    try:  # no longer verified through the parent: outbound mail is refused
        assert (await policy.ask(**outbound("bob@sub.parent.com"))).startswith("REJECT 5.7.1")
    finally:
        await policy.close()


async def test_a_parent_of_another_partner_is_not_linked(daemon: Daemon) -> None:
    _, token_a, _ = await tenant(daemon, "a")
    _, token_b, _ = await tenant(daemon, "b")
    await daemon.domain("parent.com", token=token_a)
    await daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    status, sub = await daemon.api("POST", "/domains/", {"name": "sub.parent.com"},
                                   token=token_b)
    assert_error(status, sub, 403, "forbidden")  # not b's to claim (SPEC §5)
    _, key = await daemon.api("GET", "/api-keys/", token=token_b)
    status, sub = await daemon.api("POST", "/domains/", {  # the master gives it to b
        "name": "sub.parent.com", "partner_id": key["items"][0]["partner_id"]})
    assert status == 201 and sub["parent"] is None and sub["ses"]["status"] == "not_started"
    assert_error(*await daemon.api("PUT", "/domains/sub.parent.com/parent",
                                   {"parent": "parent.com"}), 400, "invalid")


# --- dns-check ------------------------------------------------------------------------------
@pytest.fixture
async def dns_daemon(make_config: Callable[..., Config],
                     dns_server: DnsServer) -> AsyncIterator[Daemon]:
    """A daemon whose dns-check asks the test DNS server, with a short timeout."""
    daemon = await start_daemon(make_config(dns={
        "nameservers": "127.0.0.1", "port": str(dns_server.port), "timeout": "0.3"}))
    yield daemon
    await daemon.stop()


def publish(server: DnsServer, domain: str) -> None:
    """Every record dns-check wants for a domain verified by Daemon.verify (tokens a, b, c)."""
    server.add(domain, "MX", "10 mx1.mail.test.")
    server.add(domain, "TXT", "v=spf1 include:amazonses.com ~all", "google-site-verification=x")
    server.add(f"_amazonses.{domain}", "TXT", f"tok-{domain}")
    for token in "abc":
        server.add(f"{token}._domainkey.{domain}", "CNAME", f"{token}.dkim.amazonses.com.")


async def test_dns_check_of_a_fully_published_domain_is_ok(dns_daemon: Daemon,
                                                           dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    publish(dns_server, "example.com")
    status, body = await dns_daemon.api("GET", "/domains/Example.com/dns-check")
    assert status == 200, body
    assert body["ok"] is True, body
    kinds = [(c["type"], c["name"]) for c in body["checks"]]
    assert kinds == [("MX", "example.com"), ("SPF", "example.com"),
                     ("TXT", "_amazonses.example.com"),
                     ("CNAME", "a._domainkey.example.com"), ("CNAME", "b._domainkey.example.com"),
                     ("CNAME", "c._domainkey.example.com")]
    assert all(c["ok"] for c in body["checks"])


async def test_dns_check_reports_each_missing_or_wrong_record(dns_daemon: Daemon,
                                                             dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    publish(dns_server, "example.com")
    dns_server.add("example.com", "TXT", "v=spf1 -all")  # two SPF records: invalid (RFC 7208)
    dns_server.records.pop(("b._domainkey.example.com", "CNAME"))
    status, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    assert status == 200 and body["ok"] is False, body
    failed = [c["name"] for c in body["checks"] if not c["ok"]]
    assert failed == ["example.com", "b._domainkey.example.com"]
    assert body["checks"][1]["type"] == "SPF"


async def test_dns_check_of_a_silent_server_times_out_check_by_check(
        dns_daemon: Daemon, dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    dns_server.silent = True
    started = time.monotonic()
    status, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    elapsed = time.monotonic() - started
    assert status == 200, body
    assert body["ok"] is False and len(body["checks"]) == 6
    assert all(not c["ok"] and c["found"] == "timeout" for c in body["checks"]), body
    assert elapsed < 3, elapsed  # lookups run concurrently, each bounded by [dns] timeout
    assert dns_server.queries >= 6


async def test_dns_check_before_ses_tokens_exist_says_so(dns_daemon: Daemon,
                                                         dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com", verified=False)
    publish(dns_server, "example.com")
    status, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    assert status == 200 and body["ok"] is False
    assert [c["ok"] for c in body["checks"]] == [True, True, False, False, False, False]
    assert "not started" in body["checks"][2]["found"]
    assert_error(*await dns_daemon.api("GET", "/domains/nosuch.com/dns-check"), 404, "not_found")


# --- retention and transfer -----------------------------------------------------------------
@pytest.mark.parametrize("resource,field,value", [
    ("retention", "retention_days", 30),
    ("transfer", "monthly_limit_bytes", 10**9),
])
async def test_retention_and_transfer_are_read_by_both_and_set_by_the_master(
        daemon: Daemon, resource: str, field: str, value: int) -> None:
    _, token, _ = await tenant(daemon)
    await daemon.domain("example.com", token=token)
    path = f"/domains/example.com/{resource}"
    status, body = await daemon.api("GET", path, token=token)
    assert status == 200 and body[field] is None, body
    status, body = await daemon.api("PUT", path, {field: value})
    assert status == 200 and body[field] == value, body
    status, body = await daemon.api("GET", path, token=token)
    assert body[field] == value
    # a client is refused before its input is even looked at
    for attempt in ({field: 1}, {field: "garbage"}, {"unknown": 1}):
        assert_error(*await daemon.api("PUT", path, attempt, token=token), 403, "forbidden")
    status, body = await daemon.api("PUT", path, {field: None})
    assert status == 200 and body[field] is None
    status, audit = await daemon.api("GET", "/audit?target=example.com")
    assert [e["action"] for e in audit["items"]] == [f"domain.{resource}"] * 2


async def test_transfer_shows_bytes_used_this_month(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    policy = await daemon.policy()
    try:
        assert await policy.ask(**outbound("bob@example.com", size=5000)) == "DUNNO"
    finally:
        await policy.close()
    status, body = await daemon.api("GET", "/domains/example.com/transfer")
    assert status == 200 and body["used_bytes"] == 5000, body


@pytest.mark.parametrize("resource,body", [
    ("retention", {"retention_days": 0}), ("retention", {"retention_days": -1}),
    ("retention", {"retention_days": "30"}), ("retention", {"retention_days": True}),
    ("retention", {"retention_days": 1.5}), ("retention", {"retention_days": 36501}),
    ("retention", {}), ("retention", {"retention_days": 3, "x": 1}),
    ("transfer", {"monthly_limit_bytes": -1}), ("transfer", {"monthly_limit_bytes": "1"}),
    ("transfer", {"monthly_limit_bytes": 2**70}), ("transfer", {}),
])
async def test_bad_retention_and_transfer_values_are_400(daemon: Daemon, resource: str,
                                                         body: dict[str, Any]) -> None:
    await daemon.domain("example.com", verified=False)
    assert_error(*await daemon.api("PUT", f"/domains/example.com/{resource}", body),
                 400, "invalid")


# --- mailboxes ------------------------------------------------------------------------------
async def test_a_mailbox_password_is_stored_as_a_bcrypt_hash_and_never_shown(
        daemon: Daemon) -> None:
    await daemon.domain("example.com")
    created = await user(daemon, "bob@example.com", name="Bob", quota_bytes=1000)
    assert created["email"] == "bob@example.com" and created["active"] is True
    assert (created["name"], created["quota_bytes"]) == ("Bob", 1000)
    stored = await stored_hash(daemon, "bob@example.com")
    assert verifies(PASSWORD, stored) and not verifies(PASSWORD + "x", stored)
    views = [created, *(await asyncio.gather(
        daemon.api("GET", "/users/bob@example.com"), daemon.api("GET", "/users/"),
        daemon.api("GET", "/users/bob@example.com/quota"),
        daemon.api("PUT", "/users/bob@example.com", {"name": "Robert"})))]
    for view in views:
        text = str(view)
        assert "password" not in text and "$2b$" not in text and PASSWORD not in text, view


@pytest.mark.parametrize("password,accepted", [
    ("é" * 36, True),             # 36 characters, 72 bytes: bcrypt's whole input
    ("€" * 24, True),             # 72 bytes of 3-byte characters
    ("12345678", True),
    ("é" * 36 + "x", False),      # 73 bytes, 37 characters
    ("x" * 73, False),
    ("1234567", False),
    ("ab\x00cdefgh", False),      # bcrypt would ignore everything after the NUL
    ("\ud800" * 8, False),        # a lone surrogate is not UTF-8
    (12345678, False), (None, False), (["password"], False),
])
async def test_password_length_is_counted_in_utf8_bytes(daemon: Daemon, password: Any,
                                                        accepted: bool) -> None:
    await daemon.domain("example.com")
    status, body = await daemon.api("POST", "/users/", {"email": "bob@example.com",
                                                        "password": password})
    if not accepted:
        assert_error(status, body, 400, "invalid")
        assert await daemon.rt.store.read(password_hash_of, "bob@example.com") is None
        return
    assert status == 201, body
    assert verifies(password, await stored_hash(daemon, "bob@example.com"))


async def test_a_mailbox_is_updated_partially_and_deleted(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    await user(daemon, "bob@example.com", name="Bob", quota_bytes=1000)
    status, body = await daemon.api("PUT", "/users/Bob@Example.com",
                                    {"email": "BOB@example.com", "active": False})
    assert status == 200 and body["active"] is False, body
    assert (body["name"], body["quota_bytes"]) == ("Bob", 1000)  # absent fields kept
    status, body = await daemon.api("PUT", "/users/bob@example.com",
                                    {"name": None, "password": "new-password-1"})
    assert status == 200 and body["name"] is None
    stored = await stored_hash(daemon, "bob@example.com")
    assert verifies("new-password-1", stored) and not verifies(PASSWORD, stored)
    assert_error(*await daemon.api("PUT", "/users/bob@example.com",
                                   {"email": "alice@example.com"}), 400, "invalid")
    assert_error(*await daemon.api("PUT", "/users/bob@example.com", {"password": "short"}),
                 400, "invalid")
    assert_error(*await daemon.api("PUT", "/users/bob@example.com", {"active": None}),
                 400, "invalid")
    assert_error(*await daemon.api("PUT", "/users/nobody@example.com", {"name": "x"}),
                 404, "not_found")
    assert verifies("new-password-1", await stored_hash(daemon, "bob@example.com"))
    assert (await daemon.api("DELETE", "/users/bob@example.com"))[0] == 204
    assert_error(*await daemon.api("GET", "/users/bob@example.com"), 404, "not_found")
    assert_error(*await daemon.api("DELETE", "/users/bob@example.com"), 404, "not_found")


async def test_mailbox_quota_is_read_and_set(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    await user(daemon, "bob@example.com")
    status, body = await daemon.api("GET", "/users/bob@example.com/quota")
    assert status == 200 and body["quota_bytes"] is None and "used_bytes" in body, body
    status, body = await daemon.api("PUT", "/users/bob@example.com/quota",
                                    {"quota_bytes": 5 * 2**30})
    assert status == 200 and body["quota_bytes"] == 5 * 2**30, body
    assert (await daemon.api("GET", "/users/bob@example.com"))[1]["quota_bytes"] == 5 * 2**30
    for bad in ({"quota_bytes": -1}, {"quota_bytes": "1"}, {"quota_bytes": 1.5}, {},
                {"quota_bytes": 1, "name": "x"}):
        assert_error(*await daemon.api("PUT", "/users/bob@example.com/quota", bad),
                     400, "invalid")
    status, body = await daemon.api("PUT", "/users/bob@example.com/quota", {"quota_bytes": None})
    assert status == 200 and body["quota_bytes"] is None
    assert_error(*await daemon.api("GET", "/users/nobody@example.com/quota"), 404, "not_found")


async def test_email_addresses_are_lowercased(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    created = await user(daemon, " Bob.Smith@Example.COM. ")
    assert created["email"] == "bob.smith@example.com"
    status, shown = await daemon.api("GET", "/users/BOB.SMITH@EXAMPLE.com")
    assert status == 200 and shown["email"] == "bob.smith@example.com"
    assert_error(*await daemon.api("POST", "/users/", {"email": "BOB.SMITH@example.com",
                                                       "password": PASSWORD}), 409, "exists")


@pytest.mark.parametrize("body,status,code", [
    ({"email": "bob@nosuch.com", "password": PASSWORD}, 404, "not_found"),
    ({"email": "bob@example.com"}, 400, "invalid"),
    ({"password": PASSWORD}, 400, "invalid"),
    ({"email": "bob@example.com", "password": PASSWORD, "admin": True}, 400, "invalid"),
    ({"email": "bob@example.com", "password": PASSWORD, "quota_bytes": -5}, 400, "invalid"),
    ({"email": "bob@example.com", "password": PASSWORD, "active": "yes"}, 400, "invalid"),
    ({"email": "bob@example.com", "password": PASSWORD, "name": ["x"]}, 400, "invalid"),
    ({"email": "bob@example.com", "password": PASSWORD, "name": "x" * 256}, 400, "invalid"),
    ({"email": "bob..x@example.com", "password": PASSWORD}, 400, "invalid"),
    ({"email": "@example.com", "password": PASSWORD}, 400, "invalid"),
    ({"email": "x" * 65 + "@example.com", "password": PASSWORD}, 400, "invalid"),
])
async def test_bad_mailbox_input(daemon: Daemon, body: dict[str, Any], status: int,
                                 code: str) -> None:
    await daemon.domain("example.com")
    assert_error(*await daemon.api("POST", "/users/", body), status, code)
    assert (await daemon.api("GET", "/users/"))[1]["items"] == []


# --- aliases --------------------------------------------------------------------------------
async def test_alias_and_catch_all_lifecycle(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    status, alias = await daemon.api("POST", "/aliases/", {
        "source": "Sales@Example.com",
        "destinations": ["Bob@Example.com", "bob@example.com", "x@other.org"]})
    assert status == 201, alias
    assert alias["source"] == "sales@example.com" and alias["catch_all"] is False
    assert alias["destinations"] == ["bob@example.com", "x@other.org"]  # de-duplicated, in order
    status, catch_all = await daemon.api("POST", "/aliases/", {"source": "@EXAMPLE.com",
                                                               "destinations": ["bob@example.com"]})
    assert status == 201 and catch_all["source"] == "@example.com" and catch_all["catch_all"]
    status, listed = await daemon.api("GET", "/aliases/?domain=Example.com")
    assert [a["source"] for a in listed["items"]] == ["@example.com", "sales@example.com"]
    status, shown = await daemon.api("GET", "/aliases/SALES@example.com")
    assert status == 200 and shown == alias
    status, shown = await daemon.api("GET", "/aliases/@example.com")
    assert status == 200 and shown == catch_all
    assert_error(*await daemon.api("POST", "/aliases/", {"source": "sales@example.com",
                                                         "destinations": ["a@b.org"]}),
                 409, "exists")
    assert (await daemon.api("DELETE", "/aliases/@example.com"))[0] == 204
    assert (await daemon.api("DELETE", "/aliases/sales@example.com"))[0] == 204
    assert_error(*await daemon.api("GET", "/aliases/sales@example.com"), 404, "not_found")
    assert (await daemon.api("GET", "/aliases/"))[1]["items"] == []


@pytest.mark.parametrize("destinations", [
    "bob@example.com", [], None, {"bob@example.com": 1}, ["not-an-address"], [5], [None],
    ["bob@localhost"], ["bob@example.com", ""], [f"u{i}@example.org" for i in range(101)],
])
async def test_alias_destinations_are_validated(daemon: Daemon, destinations: Any) -> None:
    await daemon.domain("example.com")
    assert_error(*await daemon.api("POST", "/aliases/", {"source": "a@example.com",
                                                         "destinations": destinations}),
                 400, "invalid")
    assert_error(*await daemon.api("GET", "/aliases/a@example.com"), 404, "not_found")


async def test_an_alias_may_have_a_hundred_destinations(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    many = [f"u{i}@example.org" for i in range(100)]
    status, alias = await daemon.api("POST", "/aliases/", {"source": "all@example.com",
                                                           "destinations": many})
    assert status == 201 and alias["destinations"] == many


async def test_bad_alias_sources(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    assert_error(*await daemon.api("POST", "/aliases/", {"source": "Self@Example.com",
                                                         "destinations": ["self@example.com"]}),
                 400, "invalid")
    assert_error(*await daemon.api("POST", "/aliases/", {"source": "a@nosuch.com",
                                                         "destinations": ["b@example.com"]}),
                 404, "not_found")
    for source in ("@", "", None, 7, "a@", "@@example.com"):
        assert_error(*await daemon.api("POST", "/aliases/", {"source": source,
                                                             "destinations": ["b@x.org"]}),
                     400, "invalid")
    assert_error(*await daemon.api("POST", "/aliases/", {"destinations": ["b@x.org"]}),
                 400, "invalid")


async def test_alias_quota_counts_only_the_partners_own_mailboxes(daemon: Daemon) -> None:
    pid, token, _ = await tenant(daemon, "acme")
    _, other_token, _ = await tenant(daemon, "other")
    await daemon.api("PUT", f"/partners/{pid}", {"max_aliases_per_mailbox": 1})
    await daemon.domain("acme.test", token=token)
    await daemon.domain("other.test", token=other_token)
    await user(daemon, "box@acme.test")
    await user(daemon, "theirs@other.test")
    for i in range(2):  # the other partner's aliases to acme's box use none of acme's quota
        await daemon.api("POST", "/aliases/", {"source": f"o{i}@other.test",
                                               "destinations": ["box@acme.test"]},
                         token=other_token)
        # ... and acme pointing at another partner's mailbox is an outside address
        status, body = await daemon.api("POST", "/aliases/", {
            "source": f"out{i}@acme.test", "destinations": ["theirs@other.test"]}, token=token)
        assert status == 201, body
    status, _ = await daemon.api("POST", "/aliases/", {"source": "a1@acme.test",
                                                       "destinations": ["box@acme.test"]},
                                 token=token)
    assert status == 201
    assert_error(*await daemon.api("POST", "/aliases/", {"source": "a2@acme.test",
                                                         "destinations": ["box@acme.test"]},
                                   token=token), 403, "quota_exceeded")


async def test_master_changes_to_mailboxes_and_aliases_are_audited_without_secrets(
        daemon: Daemon) -> None:
    _, token, _ = await tenant(daemon)
    await daemon.domain("example.com", token=token)
    await user(daemon, "bob@example.com")
    await daemon.api("PUT", "/users/bob@example.com", {"password": "another-pass-1",
                                                       "quota_bytes": 10})
    await daemon.api("POST", "/aliases/", {"source": "@example.com",
                                           "destinations": ["bob@example.com"]})
    await daemon.api("DELETE", "/aliases/@example.com")
    await daemon.api("DELETE", "/users/bob@example.com")
    await daemon.api("POST", "/users/", {"email": "own@example.com", "password": PASSWORD},
                     token=token)  # a client's own change: in the change feed, not audited
    status, audit = await daemon.api("GET", "/audit")
    assert status == 200
    audit["items"] = [e for e in audit["items"] if e["action"].split(".")[0] in (
        "mailbox", "alias")]
    assert [(e["action"], e["target"]) for e in audit["items"]] == [
        ("mailbox.create", "bob@example.com"), ("mailbox.update", "bob@example.com"),
        ("alias.create", "@example.com"), ("alias.delete", "@example.com"),
        ("mailbox.delete", "bob@example.com")]
    update = audit["items"][1]
    assert (update["before"]["quota_bytes"], update["after"]["quota_bytes"]) == (None, 10)
    assert update["after"]["password"] == "changed"
    text = str(audit)
    assert "$2b$" not in text and PASSWORD not in text and "another-pass-1" not in text


# --- pagination -----------------------------------------------------------------------------
async def test_lists_paginate_until_next_is_null(daemon: Daemon) -> None:
    names = [f"d{i}.example" for i in range(5)]
    for name in names:
        await daemon.domain(name, verified=False)
    seen: list[str] = []
    offset: int | None = 0
    nexts = []
    while offset is not None:
        status, page = await daemon.api("GET", f"/domains/?limit=2&offset={offset}")
        assert status == 200 and set(page) == {"items", "next"}, page
        seen += [d["name"] for d in page["items"]]
        offset = page["next"]
        nexts.append(offset)
    assert seen == names and nexts == [2, 4, None]
    status, page = await daemon.api("GET", "/domains/?limit=5")
    assert len(page["items"]) == 5 and page["next"] is None
    status, page = await daemon.api("GET", "/domains/?offset=99")
    assert page == {"items": [], "next": None}


async def test_users_and_aliases_paginate_too(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    for i in range(3):
        await user(daemon, f"u{i}@example.com")
        await daemon.api("POST", "/aliases/", {"source": f"a{i}@example.com",
                                               "destinations": [f"u{i}@example.com"]})
    for path, key, last in (("/users/", "email", "u2@example.com"),
                            ("/aliases/", "source", "a2@example.com")):
        status, page = await daemon.api("GET", f"{path}?limit=2")
        assert status == 200 and len(page["items"]) == 2 and page["next"] == 2, page
        status, page = await daemon.api("GET", f"{path}?limit=2&offset=2")
        assert [item[key] for item in page["items"]] == [last] and page["next"] is None


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", "limit=abc", "limit=1001", "limit=1.5", "limit=", "offset=-1",
    "offset=1e3", "offset=" + "9" * 30, "limit=%D9%A1",
])
async def test_bad_pagination_is_400(daemon: Daemon, query: str) -> None:
    for path in ("/domains/", "/users/", "/aliases/"):
        assert_error(*await daemon.api("GET", f"{path}?{query}"), 400, "invalid")


async def test_idna_2008_keeps_sharp_s_domains_apart(daemon: Daemon) -> None:
    """IDNA 2003 would map straße.de onto strasse.de: two registered domains, two tenants."""
    status, sharp = await daemon.api("POST", "/domains/", {"name": "Straße.de"})
    assert status == 201 and sharp["name"] == "xn--strae-oqa.de"
    status, plain = await daemon.api("POST", "/domains/", {"name": "strasse.de"})
    assert status == 201 and plain["name"] == "strasse.de"
    await daemon.verify("xn--strae-oqa.de")
    client = await daemon.policy()
    assert await client.ask(sender="bob@straße.de", sasl_username="bob@straße.de") == "DUNNO"
    await client.close()
    _, out = await daemon.api("GET", "/domains/straße.de/outbound")
    assert out["sent_today"] == 1
    _, other = await daemon.api("GET", "/domains/strasse.de/outbound")
    assert other["sent_today"] == 0
