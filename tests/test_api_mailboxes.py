"""Mailboxes (bcrypt, quotas, normalisation) and aliases and catch-alls through the API."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.api_helpers import (PASSWORD, assert_error, fast_bcrypt, password_hash_of,
                               stored_hash, tenant, user, verifies)
from tests.conftest import Daemon

__all__ = ["fast_bcrypt"]  # an autouse fixture: imported to apply here


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
