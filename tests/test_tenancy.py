"""Multi-tenancy through the HTTP API: partners, API keys, quotas, usage and delta sync, the
audit log, secrets, and the `partner create` / `key create` command line."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import string
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

import api.app
from policyd import passwords
from policyd.config import Config
from policyd.store import StoreError
from policyd.store import partners as partner_store
from tests.conftest import MASTER, Daemon, start_daemon

PASSWORD = "correct-horse-9"
TOKEN_ALPHABET = set(string.ascii_letters + string.digits + "-_")


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at its minimum cost: these tests create many mailboxes, not test hashing."""
    monkeypatch.setattr(passwords, "ROUNDS", 4)


async def tenant(daemon: Daemon, name: str, **quotas: Any) -> tuple[dict[str, Any], str]:
    """A partner and one client token of it."""
    partner = await daemon.partner(name, **quotas)
    return partner, await daemon.key(partner["id"])


async def new_key(daemon: Daemon, token: str = MASTER, **body: Any) -> dict[str, Any]:
    """POST /api-keys/ and return the created key (with its token)."""
    status, key = await daemon.api("POST", "/api-keys/", body, token=token)
    assert status == 201, key
    return key


def iso_in(delta: timedelta) -> str:
    """An ISO-8601 UTC time delta from now."""
    return (datetime.now(timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_error(status: int, body: Any, expected: int, code: str) -> None:
    """A response in the one error shape with this status and code."""
    assert status == expected, body
    assert body["error"]["code"] == code, body


# --- partners ----------------------------------------------------------------------------
async def test_partner_crud_quotas_and_notify_secret_shown_once(daemon: Daemon) -> None:
    status, created = await daemon.api("POST", "/partners/", {
        "name": "Acme", "max_domains": 3, "max_mailboxes_per_domain": None,
        "max_aliases_per_mailbox": 7, "notify_url": "https://hooks.acme.test/policyd"})
    assert status == 201, created
    secret, pid = created["notify_secret"], created["id"]
    assert len(secret) >= 32 and isinstance(pid, int)
    assert (created["max_domains"], created["max_mailboxes_per_domain"],
            created["max_aliases_per_mailbox"]) == (3, None, 7)
    views = [await daemon.api("GET", f"/partners/{pid}"), await daemon.api("GET", "/partners/"),
             await daemon.api("PUT", f"/partners/{pid}", {"max_domains": None, "name": "Acme 2"})]
    for status, view in views:
        assert status == 200 and secret not in json.dumps(view), view
        assert "notify_secret" not in json.dumps(view)
    updated = views[2][1]
    assert updated["max_domains"] is None and updated["name"] == "Acme 2"
    assert updated["max_aliases_per_mailbox"] == 7  # partial update keeps absent fields
    assert updated["notify_url"] == "https://hooks.acme.test/policyd"
    assert [p["id"] for p in views[1][1]["items"]] == [pid]


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": 5}, {"name": "x", "max_domains": -1},
    {"name": "x", "max_domains": "5"}, {"name": "x", "max_domains": True},
    {"name": "x", "notify_url": "ftp://x"}, {"name": "x", "notify_secret": "mine"},
])
async def test_partner_bad_input_is_400(daemon: Daemon, body: dict[str, Any]) -> None:
    status, error = await daemon.api("POST", "/partners/", body)
    assert_error(status, error, 400, "invalid")
    status, listing = await daemon.api("GET", "/partners/")
    assert listing["items"] == []


async def test_partner_delete_refused_while_it_owns_domains_unless_forced(
        daemon: Daemon) -> None:
    partner, token = await tenant(daemon, "acme")
    await daemon.domain("acme.test", token=token)
    status, error = await daemon.api("DELETE", f"/partners/{partner['id']}")
    assert_error(status, error, 409, "exists")
    assert (await daemon.api("GET", "/domains/acme.test"))[0] == 200
    status, _ = await daemon.api("DELETE", f"/partners/{partner['id']}?force=true")
    assert status == 204
    assert (await daemon.api("GET", "/domains/acme.test"))[0] == 404
    assert (await daemon.api("GET", f"/partners/{partner['id']}"))[0] == 404
    assert (await daemon.api("GET", "/domains/", token=token))[0] == 401  # its keys went too
    status, error = await daemon.api("DELETE", f"/partners/{partner['id']}")
    assert_error(status, error, 404, "not_found")


async def test_a_new_partner_never_inherits_a_deleted_partners_change_feed(
        daemon: Daemon) -> None:
    old, token = await tenant(daemon, "old")
    await daemon.domain("old.test", token=token)
    assert (await daemon.api("DELETE", f"/partners/{old['id']}?force=true"))[0] == 204
    new, new_token = await tenant(daemon, "new")
    status, usage = await daemon.api("GET", "/api-keys/", token=new_token)
    key_id = usage["items"][0]["id"]
    status, usage = await daemon.api("GET", f"/api-keys/{key_id}/usage", token=new_token)
    assert status == 200 and usage["changes"] == [], (old["id"], new["id"], usage)


# --- API keys ----------------------------------------------------------------------------
async def test_key_creation_shows_the_token_once_and_stores_only_a_hash(
        daemon: Daemon, make_config: Callable[..., Config]) -> None:
    partner = await daemon.partner("acme")
    expiry = iso_in(timedelta(days=30))
    keys = [await new_key(daemon, partner_id=partner["id"], name=f"k{i}", expires_at=expiry)
            for i in range(3)]
    for key in keys:
        assert key["id"].startswith("key_") and key["partner_id"] == partner["id"]
        assert key["token"].startswith("pd_") and set(key["token"][3:]) <= TOKEN_ALPHABET
        assert len(key["token"][3:]) * 6 >= 128  # base64url: 6 bits a character
        assert key["expires_at"] == expiry and key["created_at"].endswith("Z")
    assert len({k["token"] for k in keys}) == 3
    status, listing = await daemon.api("GET", "/api-keys/")
    assert sorted(k["name"] for k in listing["items"]) == ["k0", "k1", "k2"]
    shown = [listing] + [(await daemon.api("GET", f"/api-keys/{k['id']}"))[1] for k in keys]
    for key in keys:
        assert all(key["token"] not in json.dumps(view) for view in shown)
        status, by_token = await daemon.api("GET", f"/api-keys/{key['token']}")
        assert status == 200 and by_token["id"] == key["id"] and "token" not in by_token
    db = make_config().db_path
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert all(k["token"].encode() not in stored for k in keys)


async def test_keys_work_revoke_and_expire(daemon: Daemon,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    partner = await daemon.partner("acme")
    forever = await new_key(daemon, partner_id=partner["id"])
    daily = await new_key(daemon, partner_id=partner["id"], expires_at=iso_in(timedelta(days=1)))
    for key in (forever, daily):
        assert (await daemon.api("GET", "/domains/", token=key["token"]))[0] == 200
    status, _ = await daemon.api("GET", "/domains/", token=None,
                                 headers={"X-API-Key": daily["token"]})
    assert status == 200
    later = datetime.now(timezone.utc) + timedelta(days=2)
    monkeypatch.setattr(api.app, "utcnow", lambda: later)
    status, error = await daemon.api("GET", "/domains/", token=daily["token"])
    assert_error(status, error, 401, "unauthorized")
    assert (await daemon.api("GET", "/domains/", token=forever["token"]))[0] == 200
    status, revoked = await daemon.api("DELETE", f"/api-keys/{forever['id']}")
    assert status == 200 and revoked["revoked_at"] is not None
    status, error = await daemon.api("GET", "/domains/", token=forever["token"])
    assert_error(status, error, 401, "unauthorized")
    for bad in ("", "pd_not-a-real-token", forever["id"]):
        assert (await daemon.api("GET", "/domains/", token=bad or None))[0] == 401


@pytest.mark.parametrize("expires_at", ["tomorrow", "2020-01-01T00:00:00Z", 5, "0999-01-01",
                                        "0001-01-01T00:00:00+01:00", ""])
async def test_key_expiry_must_be_a_future_iso_time(daemon: Daemon, expires_at: Any) -> None:
    partner = await daemon.partner("acme")
    status, error = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"],
                                                           "expires_at": expires_at})
    assert_error(status, error, 400, "invalid")


async def test_master_names_the_partner_of_a_key(daemon: Daemon) -> None:
    status, error = await daemon.api("POST", "/api-keys/", {"name": "orphan"})
    assert_error(status, error, 400, "invalid")
    status, error = await daemon.api("POST", "/api-keys/", {"partner_id": 999})
    assert_error(status, error, 404, "not_found")


async def test_a_client_manages_only_its_own_partners_keys(daemon: Daemon) -> None:
    a, a_token = await tenant(daemon, "a")
    b, b_token = await tenant(daemon, "b")
    own = await new_key(daemon, a_token, name="second")
    assert own["partner_id"] == a["id"]
    assert (await new_key(daemon, a_token, partner_id=a["id"]))["partner_id"] == a["id"]
    for body in ({"partner_id": b["id"]}, {"partner_id": b["id"], "expires_at": "never"}):
        status, error = await daemon.api("POST", "/api-keys/", body, token=a_token)
        assert_error(status, error, 403, "forbidden")
    status, listing = await daemon.api("GET", "/api-keys/", token=a_token)
    assert {k["partner_id"] for k in listing["items"]} == {a["id"]}
    assert len(listing["items"]) == 3
    status, listing = await daemon.api("GET", f"/api-keys/?partner_id={b['id']}")
    assert [k["partner_id"] for k in listing["items"]] == [b["id"]]
    assert (await daemon.api("DELETE", f"/api-keys/{own['id']}", token=a_token))[0] == 200
    assert (await daemon.api("GET", "/domains/", token=own["token"]))[0] == 401
    assert (await daemon.api("GET", "/domains/", token=b_token))[0] == 200


async def test_a_client_key_cannot_outlive_the_key_that_creates_it(daemon: Daemon) -> None:
    partner = await daemon.partner("acme")
    expiry = iso_in(timedelta(days=10))
    parent = await new_key(daemon, partner_id=partner["id"], expires_at=expiry)
    child = await new_key(daemon, parent["token"], name="no expiry asked")
    assert child["expires_at"] == expiry
    sooner = iso_in(timedelta(days=2))
    assert (await new_key(daemon, parent["token"], expires_at=sooner))["expires_at"] == sooner
    status, error = await daemon.api("POST", "/api-keys/",
                                     {"expires_at": iso_in(timedelta(days=11))},
                                     token=parent["token"])
    assert_error(status, error, 403, "forbidden")
    unlimited = await new_key(daemon, partner_id=partner["id"])
    assert (await new_key(daemon, unlimited["token"]))["expires_at"] is None


async def test_key_usage_counts_requests_and_last_use(daemon: Daemon) -> None:
    partner = await daemon.partner("acme")
    key = await new_key(daemon, partner_id=partner["id"])
    status, fresh = await daemon.api("GET", f"/api-keys/{key['id']}")
    assert (fresh["request_count"], fresh["last_used_at"]) == (0, None)
    for _ in range(3):
        assert (await daemon.api("GET", "/domains/", token=key["token"]))[0] == 200
    status, used = await daemon.api("GET", f"/api-keys/{key['id']}/usage?since=", token=None,
                                    headers={"Authorization": f"Bearer {key['token']}"})
    assert status == 200
    assert used["key"]["request_count"] == 4  # three lists and this call
    assert used["key"]["last_used_at"].endswith("Z")


async def test_odd_ids_refs_and_cursors_are_client_errors(daemon: Daemon) -> None:
    partner, token = await tenant(daemon, "acme")
    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    cursor = base64.urlsafe_b64encode("seq:²".encode()).decode().rstrip("=")
    for path in ("/partners/%C2%B2", "/partners/-1", "/partners/1" + "0" * 30,
                 "/api-keys/?partner_id=%C2%B2", f"/api-keys/{key_id}/usage?since={cursor}",
                 f"/api-keys/{key_id}/usage?limit=0", "/audit?limit=x"):
        status, error = await daemon.api("GET", path)
        assert_error(status, error, 400, "invalid")
    for ref in ("%ED%A0%80", "%FF", "%00", "key_" + "0" * 500):
        status, error = await daemon.api("GET", f"/api-keys/{ref}")
        assert_error(status, error, 404, "not_found")


# --- quotas ------------------------------------------------------------------------------
async def test_parallel_domain_creates_never_overshoot_max_domains(daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme", max_domains=5)
    results = await asyncio.gather(*(
        daemon.api("POST", "/domains/", {"name": f"d{i}.acme.test"}, token=token)
        for i in range(30)))
    assert_quota(results, created=5, limit_name="max_domains")
    status, listing = await daemon.api("GET", "/domains/", token=token)
    assert len(listing["items"]) == 5


async def test_parallel_mailbox_creates_never_overshoot_max_mailboxes_per_domain(
        daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme", max_mailboxes_per_domain=5)
    for name in ("one.test", "two.test"):
        await daemon.domain(name, token=token, verified=False)
    results = await asyncio.gather(*(
        daemon.api("POST", "/users/", {"email": f"u{i}@one.test", "password": PASSWORD},
                   token=token) for i in range(30)))
    assert_quota(results, created=5, limit_name="max_mailboxes_per_domain")
    status, _ = await daemon.api("POST", "/users/", {"email": "u@two.test",
                                                     "password": PASSWORD}, token=token)
    assert status == 201  # the quota is per domain


async def test_parallel_alias_creates_never_overshoot_max_aliases_per_mailbox(
        daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme", max_aliases_per_mailbox=5)
    await daemon.domain("acme.test", token=token, verified=False)
    for local in ("box", "other"):
        status, _ = await daemon.api("POST", "/users/", {"email": f"{local}@acme.test",
                                                         "password": PASSWORD}, token=token)
        assert status == 201
    results = await asyncio.gather(*(
        daemon.api("POST", "/aliases/", {"source": f"a{i}@acme.test",
                                         "destinations": ["box@acme.test"]}, token=token)
        for i in range(30)))
    assert_quota(results, created=5, limit_name="max_aliases_per_mailbox")
    status, _ = await daemon.api("POST", "/aliases/", {
        "source": "x@acme.test", "destinations": ["other@acme.test"]}, token=token)
    assert status == 201  # the quota is per mailbox


def assert_quota(results: list[tuple[int, Any]], *, created: int, limit_name: str) -> None:
    """Exactly `created` 201s; every other answer is 403 quota_exceeded naming the limit."""
    statuses = [status for status, _ in results]
    assert statuses.count(201) == created, statuses
    refused = [body for status, body in results if status != 201]
    assert len(refused) == len(results) - created
    for body in refused:
        assert body["error"]["code"] == "quota_exceeded", body
        assert limit_name in body["error"]["message"], body


async def test_usage_reports_use_against_each_quota(daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme", max_domains=4, max_mailboxes_per_domain=9)
    other, other_token = await tenant(daemon, "other")
    await daemon.domain("acme.test", token=token, verified=False)
    await daemon.domain("other.test", token=other_token, verified=False)
    for body in ({"email": "a@acme.test", "password": PASSWORD},
                 {"email": "b@acme.test", "password": PASSWORD}):
        assert (await daemon.api("POST", "/users/", body, token=token))[0] == 201
    alias = {"source": "c@acme.test", "destinations": ["a@acme.test"]}
    assert (await daemon.api("POST", "/aliases/", alias, token=token))[0] == 201
    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    status, usage = await daemon.api("GET", f"/api-keys/{key_id}/usage", token=token)
    assert status == 200
    assert usage["usage"] == {"domains": {"used": 1, "max": 4},
                              "mailboxes": {"used": 2, "max_per_domain": 9},
                              "aliases": {"used": 1, "max_per_mailbox": None}}


# --- delta sync --------------------------------------------------------------------------
async def replay(daemon: Daemon, token: str, key_id: str, since: str = "",
                 limit: int = 7) -> tuple[list[dict[str, Any]], str]:
    """Page through the change feed until an empty page; returns (changes, last cursor)."""
    seen: list[dict[str, Any]] = []
    for _ in range(200):
        status, page = await daemon.api(
            "GET", f"/api-keys/{key_id}/usage?limit={limit}&since={since}", token=token)
        assert status == 200, page
        assert len(page["changes"]) <= limit
        if not page["changes"]:
            assert page["cursor"] == since or not since
            return seen, page["cursor"]
        seen += page["changes"]
        since = page["cursor"]
    raise AssertionError("the change feed never ran dry")


async def create_mailboxes(daemon: Daemon, token: str, domain: str, count: int,
                           start: int = 0) -> list[str]:
    """Create count mailboxes in parallel; returns their addresses."""
    addresses = [f"m{i:02d}@{domain}" for i in range(start, start + count)]
    results = await asyncio.gather(*(
        daemon.api("POST", "/users/", {"email": a, "password": PASSWORD}, token=token)
        for a in addresses))
    assert [s for s, _ in results] == [201] * count
    return addresses


async def test_delta_sync_never_misses_or_repeats_a_change(daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme")
    _, other_token = await tenant(daemon, "other")
    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    await daemon.domain("acme.test", token=token, verified=False)
    await daemon.domain("other.test", token=other_token, verified=False)
    first = await create_mailboxes(daemon, token, "acme.test", 25)
    await create_mailboxes(daemon, other_token, "other.test", 5)
    status, page = await daemon.api("GET", f"/api-keys/{key_id}/usage?limit=7", token=token)
    early, cursor = page["changes"], page["cursor"]
    second = await create_mailboxes(daemon, token, "acme.test", 25, start=25)
    alias = {"source": "@acme.test", "destinations": [first[0]]}
    assert (await daemon.api("POST", "/aliases/", alias, token=token))[0] == 201
    rest, final = await replay(daemon, token, key_id, cursor)
    changes = early + rest
    keys = [(c["op"], c["kind"], c["key"]) for c in changes]
    assert len(keys) == len(set(keys)) == 52
    assert keys[0] == ("created", "domain", "acme.test")
    assert set(keys[1:51]) == {("created", "mailbox", a) for a in first + second}
    assert keys[51] == ("created", "alias", "@acme.test")
    assert [c["at"] for c in changes] == sorted(c["at"] for c in changes)
    assert not any("other.test" in c["key"] for c in changes)
    assert len({c["at"] for c in changes}) < len(changes)  # timestamps really were shared
    assert (await replay(daemon, token, key_id, final))[0] == []  # caught up
    again, _ = await replay(daemon, token, key_id, cursor)
    assert again == rest  # a cursor can be replayed


async def test_delta_sync_reports_deletions_of_a_force_deleted_domain(daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme")
    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    await daemon.domain("acme.test", token=token, verified=False)
    boxes = await create_mailboxes(daemon, token, "acme.test", 3)
    alias = {"source": "info@acme.test", "destinations": boxes[:2]}
    assert (await daemon.api("POST", "/aliases/", alias, token=token))[0] == 201
    _, cursor = await replay(daemon, token, key_id)
    status, error = await daemon.api("DELETE", "/domains/acme.test", token=token)
    assert_error(status, error, 409, "exists")
    assert (await daemon.api("DELETE", "/domains/acme.test?force=true", token=token))[0] == 204
    deleted, _ = await replay(daemon, token, key_id, cursor)
    assert {(c["op"], c["kind"], c["key"]) for c in deleted} == {
        *(("deleted", "mailbox", b) for b in boxes), ("deleted", "alias", "info@acme.test"),
        ("deleted", "domain", "acme.test")}
    assert len(deleted) == 5
    status, usage = await daemon.api("GET", f"/api-keys/{key_id}/usage?since={cursor}",
                                     token=token)
    assert usage["usage"]["mailboxes"]["used"] == 0 and usage["usage"]["domains"]["used"] == 0


async def test_delta_sync_since_an_iso_time(daemon: Daemon) -> None:
    _, token = await tenant(daemon, "acme")
    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    await daemon.domain("acme.test", token=token, verified=False)
    everything, _ = await replay(daemon, token, key_id, "2000-01-01T00:00:00Z")
    assert [c["key"] for c in everything] == ["acme.test"]
    at = everything[0]["at"]
    assert (await replay(daemon, token, key_id, at))[0] == everything  # inclusive of `at`
    assert (await replay(daemon, token, key_id, "2000-01-01T01:00:00+01:00"))[0] == everything
    future = iso_in(timedelta(days=1))
    status, page = await daemon.api("GET", f"/api-keys/{key_id}/usage?since={future}",
                                    token=token)
    assert status == 200 and page["changes"] == []
    old, _ = await replay(daemon, token, key_id, "1066-10-14T09:00:00Z")
    assert old == everything
    for bad in ("yesterday", "c2VxOmFiYw", "2026-13-01", "9999-12-31T23:59:59-01:00"):
        status, error = await daemon.api("GET", f"/api-keys/{key_id}/usage?since={bad}",
                                         token=token)
        assert_error(status, error, 400, "invalid")


# --- audit -------------------------------------------------------------------------------
async def audit_log(daemon: Daemon, query: str = "") -> list[dict[str, Any]]:
    """Every audit entry (following `next`), oldest first."""
    entries: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        status, page = await daemon.api("GET", f"/audit?limit=3&offset={offset}{query}")
        assert status == 200, page
        entries += page["items"]
        offset = page["next"]
    return entries


async def test_audit_log_records_master_changes_and_every_key_change(daemon: Daemon) -> None:
    partner, token = await tenant(daemon, "acme")
    pid = partner["id"]
    assert (await daemon.api("PUT", f"/partners/{pid}", {"max_domains": 9}))[0] == 200
    client_key = await new_key(daemon, token, name="by client")
    assert (await daemon.api("DELETE", f"/api-keys/{client_key['id']}", token=token))[0] == 200
    await daemon.domain("acme.test", partner_id=pid)
    master_calls = [
        ("PUT", "/domains/acme.test/outbound", {"tier": "pro", "enforcement": "soft"}),
        ("PUT", "/domains/acme.test/outbound", {"status": "blocked"}),
        ("PUT", "/domains/acme.test/retention", {"retention_days": 30}),
        ("PUT", "/domains/acme.test/transfer", {"monthly_limit_bytes": 10**9}),
        ("PUT", "/domains/acme.test/parent", {"parent": None, "wildcard": True}),
        ("PUT", "/domains/acme.test/suspend", None),
        ("PUT", "/domains/acme.test/activate", None),
        ("POST", "/outbound/reset-daily", {"domain": "acme.test", "current": True}),
        ("POST", "/outbound/reset-monthly", {"domain": "acme.test", "current": True}),
    ]
    for method, path, body in master_calls:
        status, reply = await daemon.api(method, path, body)
        assert status == 200, (path, reply)
    assert (await daemon.api("DELETE", f"/partners/{pid}?force=true"))[0] == 204
    entries = await audit_log(daemon)
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    assert all(set(e) == {"id", "at", "actor", "action", "target", "before", "after"}
               for e in entries)
    by_action = [(e["action"], e["actor"], e["target"]) for e in entries]
    key_id = client_key["id"]
    for expected in [("partner.create", "master", f"partner:{pid}"),
                     ("partner.update", "master", f"partner:{pid}"),
                     ("key.create", "master", None), ("key.create", None, key_id),
                     ("key.revoke", None, key_id), ("outbound.update", "master", "acme.test"),
                     ("domain.retention", "master", "acme.test"),
                     ("domain.transfer", "master", "acme.test"),
                     ("domain.parent", "master", "acme.test"),
                     ("domain.suspend", "master", "acme.test"),
                     ("domain.activate", "master", "acme.test"),
                     ("outbound.reset_daily", "master", "acme.test"),
                     ("outbound.reset_monthly", "master", "acme.test"),
                     ("partner.delete", "master", f"partner:{pid}")]:
        assert any(match(entry, expected) for entry in by_action), (expected, by_action)
    tier = next(e for e in entries if e["action"] == "outbound.update")
    assert tier["before"]["out_tier"] == "standard" and tier["after"]["out_tier"] == "pro"
    client_actor = next(e["actor"] for e in entries
                        if e["action"] == "key.create" and e["target"] == key_id)
    assert client_actor.startswith("key_") and client_actor != key_id
    assert token not in json.dumps(entries)


def match(entry: tuple[str, str, str | None], expected: tuple[str, str | None,
                                                             str | None]) -> bool:
    """An (action, actor, target) triple against a pattern where None matches anything."""
    return all(want is None or got == want for got, want in zip(entry, expected))


async def test_audit_target_filter_and_master_only(daemon: Daemon) -> None:
    partner, token = await tenant(daemon, "acme")
    for name in ("one.test", "two.test"):
        await daemon.domain(name, partner_id=partner["id"])
        for days in (5, 6):
            body = {"retention_days": days}
            assert (await daemon.api("PUT", f"/domains/{name}/retention", body))[0] == 200
    one = [e for e in await audit_log(daemon, "&target=one.test")
           if e["action"] == "domain.retention"]
    assert [(e["target"], e["after"]) for e in one] == [
        ("one.test", {"retention_days": 5}), ("one.test", {"retention_days": 6})]
    assert one[1]["before"] == {"retention_days": 5}
    assert await audit_log(daemon, "&target=nothing.test") == []
    status, error = await daemon.api("GET", "/audit", token=token)
    assert_error(status, error, 403, "forbidden")
    status, error = await daemon.api("GET", "/audit?since=soon")
    assert_error(status, error, 400, "invalid")


MASTER_CHANGES = [
    pytest.param("POST", "/domains/", {"name": "new.test"}, id="domain-create"),
    pytest.param("POST", "/users/", {"email": "new@acme.test", "password": PASSWORD},
                 id="mailbox-create"),
    pytest.param("PUT", "/users/box@acme.test", {"name": "Box"}, id="mailbox-update"),
    pytest.param("DELETE", "/users/box@acme.test", None, id="mailbox-delete"),
    pytest.param("POST", "/aliases/", {"source": "new@acme.test",
                                       "destinations": ["box@acme.test"]},
                 id="alias-create"),
    pytest.param("DELETE", "/aliases/fw@acme.test", None, id="alias-delete"),
    pytest.param("POST", "/outbound/reset-daily", {}, id="reset-daily"),
    pytest.param("DELETE", "/domains/acme.test?force=true", None, id="domain-delete"),
    pytest.param("PUT", "/domains/acme.test/suspend", None, id="domain-suspend"),
]


@pytest.mark.parametrize(("method", "path", "body"), MASTER_CHANGES)
async def test_every_change_made_with_the_master_token_is_audited(
        daemon: Daemon, method: str, path: str, body: Any) -> None:
    partner = await daemon.partner("acme")
    await daemon.domain("acme.test", partner_id=partner["id"])
    for url, setup in (("/users/", {"email": "box@acme.test", "password": PASSWORD}),
                       ("/aliases/", {"source": "fw@acme.test",
                                      "destinations": ["box@acme.test"]})):
        assert (await daemon.api("POST", url, setup))[0] == 201
    before = await audit_log(daemon)
    status, reply = await daemon.api(method, path, body)
    assert status in (200, 201, 204), reply
    added = (await audit_log(daemon))[len(before):]
    assert [e["actor"] for e in added] == ["master"], added


# --- privileges --------------------------------------------------------------------------
MASTER_ONLY_CALLS = [
    ("POST", "/partners/", {"name": "x"}), ("GET", "/partners/", None),
    ("GET", "/partners/{pid}", None), ("PUT", "/partners/{pid}", {"max_domains": 99}),
    ("DELETE", "/partners/{pid}?force=true", None),
    ("PUT", "/domains/own.test/retention", {"retention_days": 3}),
    ("PUT", "/domains/own.test/transfer", {"monthly_limit_bytes": 5}),
    ("POST", "/domains/own.test/ses-verify", None),
    ("PUT", "/domains/own.test/parent", {"parent": None, "wildcard": True}),
    ("POST", "/outbound/reset-daily", {}), ("POST", "/outbound/reset-monthly", {}),
    ("POST", "/outbound/reset-daily", {"domain": "own.test", "current": True}),
    ("POST", "/domains/own.test/outbound/increment", {"count": 1}),
    ("GET", "/audit", None), ("GET", "/metrics", None),
]


async def test_master_only_endpoints_are_forbidden_to_clients(daemon: Daemon) -> None:
    partner, token = await tenant(daemon, "acme")
    await daemon.domain("own.test", token=token)
    before = await daemon.api("GET", "/domains/own.test")
    for method, path, body in MASTER_ONLY_CALLS:
        status, error = await daemon.api(method, path.format(pid=partner["id"]), body,
                                         token=token)
        assert status == 403 and error["error"]["code"] == "forbidden", (method, path, error)
    after = await daemon.api("GET", "/domains/own.test")
    assert after == before
    assert (await daemon.api("GET", f"/partners/{partner['id']}"))[1]["max_domains"] is None


# --- secrets -----------------------------------------------------------------------------
async def test_tokens_and_notify_secret_never_reappear_in_responses_or_logs(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    responses: list[str] = []

    async def call(method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, reply = await daemon.api(method, path, body, **kw)
        responses.append(json.dumps(reply))
        return status, reply

    status, partner = await daemon.api("POST", "/partners/", {"name": "acme"})
    secret = partner["notify_secret"]
    key = await new_key(daemon, partner_id=partner["id"])
    token = key["token"]
    second = await new_key(daemon, token, expires_at=iso_in(timedelta(days=1)))
    await daemon.domain("acme.test", token=token)
    for method, path, body in [
            ("GET", f"/api-keys/{token}", None), ("GET", f"/api-keys/{token}/usage", None),
            ("GET", f"/api-keys/{token}/usage?since=nonsense", None),
            ("GET", f"/api-keys/{second['token']}", None), ("GET", "/api-keys/", None),
            ("POST", "/users/", {"email": "a@acme.test", "password": PASSWORD}),
            ("GET", "/domains/acme.test", None), ("GET", "/partners/missing", None),
            ("DELETE", f"/api-keys/{second['token']}", None)]:
        await call(method, path, body, token=token)
        await call(method, path, body)
    await call("GET", "/domains/", token=second["token"])  # revoked: 401
    await call("GET", "/domains/", token=token + "x")
    await call("GET", f"/partners/{partner['id']}")
    await call("GET", "/partners/")
    await call("GET", "/audit")
    assert responses and all(s not in r for r in responses for s in (token, secret,
                                                                     second["token"]))
    logged = "\n".join(r.getMessage() for r in caplog.records
                       if r.name != "aiohttp.access")  # the test server's own access log
    assert logged  # the scenario did log something
    for s in (token, secret, second["token"]):
        assert s not in logged


async def test_a_failing_request_never_logs_the_token_in_its_path(
        daemon: Daemon, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    partner = await daemon.partner("acme")
    key = await new_key(daemon, partner_id=partner["id"])

    def broken(*args: Any) -> None:
        raise StoreError("disk I/O error")
    monkeypatch.setattr(partner_store, "get_key", broken)
    caplog.set_level(logging.DEBUG)
    status, error = await daemon.api("GET", f"/api-keys/{key['token']}/usage",
                                     token=key["token"])
    assert_error(status, error, 503, "unavailable")
    assert "disk I/O error" in caplog.text  # the failure itself is logged
    assert key["token"] not in caplog.text


# --- command line ------------------------------------------------------------------------
async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the policyd command as a subprocess."""
    exe = Path(sys.executable).with_name("policyd")
    proc = await asyncio.create_subprocess_exec(str(exe), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_partner_and_key_create_give_a_working_token(
        make_config: Callable[..., Config]) -> None:
    config = make_config()
    assert config.source
    daemon = await start_daemon(config)
    try:
        rc, out, err = await run_cli("partner", "create", "Acme CLI", "--max-domains", "1",
                                     "--config", str(config.source))
        assert rc == 0, err
        partner = json.loads(out)
        assert partner["max_domains"] == 1 and partner["notify_secret"]
        rc, out, err = await run_cli("key", "create", "--partner", str(partner["id"]),
                                     "--config", str(config.source))
        assert rc == 0, err
        key = json.loads(out)
        assert key["id"].startswith("key_") and out.count(key["token"]) == 1
        await daemon.domain("cli.test", token=key["token"], verified=False)
        status, error = await daemon.api("POST", "/domains/", {"name": "two.test"},
                                         token=key["token"])
        assert_error(status, error, 403, "quota_exceeded")
        status, shown = await daemon.api("GET", f"/api-keys/{key['id']}")
        assert status == 200 and key["token"] not in json.dumps(shown)
        rc, out, err = await run_cli("key", "create", "--partner", "999",
                                     "--config", str(config.source))
        assert rc != 0 and len(err.strip().splitlines()) == 1 and not out
    finally:
        await daemon.stop()
