"""Domains through the API against the real daemon: normalisation, IDN, delete, suspension,
wildcard parents, dns-check against a DNS server on loopback, retention and transfer."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Callable

import pytest

from policyd.config import Config
from tests.api_helpers import assert_error, fast_bcrypt, tenant, user
from tests.conftest import Daemon, outbound, start_daemon
from tests.dnsserver import DnsServer

__all__ = ["fast_bcrypt"]  # an autouse fixture: imported to apply here


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
