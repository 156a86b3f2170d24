"""Mailbox, alias and API key changes are logged at INFO, and no secret ever is (SPEC §3, §10)."""
from __future__ import annotations

import logging

import pytest

from policyd.store.partners import hash_token
from tests.conftest import Daemon, password_hash_of

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "another secret passphrase"


def info_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno == logging.INFO]


def every_logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record's message and traceback. Not aiohttp's access log: the test server keeps
    one, `policyd serve` does not (AppRunner(access_log=None)), and a key's token may be the
    {token} of a path."""
    parts = []
    for record in caplog.records:
        if record.name == "aiohttp.access":
            continue
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


async def test_mailbox_and_alias_changes_are_logged_without_secrets(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    partner = await daemon.partner("acme")
    token = await daemon.key(partner["id"])
    await daemon.domain("example.com", token=token)
    calls = [
        ("POST", "/users/", {"email": "Bob@Example.com", "password": PASSWORD,
                             "name": "Bob Builder", "quota_bytes": 1000}, 201),
        ("PUT", "/users/bob@example.com", {"password": NEW_PASSWORD, "active": False}, 200),
        ("PUT", "/users/bob@example.com", {"active": False}, 200),  # no change: no line
        ("PUT", "/users/bob@example.com/quota", {"quota_bytes": None}, 200),
        ("POST", "/aliases/", {"source": "info@example.com",
                               "destinations": ["bob@example.com", "x@elsewhere.org"]}, 201),
        ("DELETE", "/aliases/info@example.com", None, 204),
    ]
    for method, path, body, expected in calls:
        status, answer = await daemon.api(method, path, body, token=token)
        assert status == expected, (method, path, answer)
    stored_hash = await daemon.rt.store.read(password_hash_of, "bob@example.com")
    status, _ = await daemon.api("DELETE", "/users/bob@example.com", token=token)
    assert status == 204

    key_id = (await daemon.api("GET", "/api-keys/", token=token))[1]["items"][0]["id"]
    assert info_lines(caplog, "api.mailboxes") == [
        f"mailbox bob@example.com created by {key_id}: name, quota_bytes=1000, active=True, "
        "password",
        f"mailbox bob@example.com updated by {key_id}: active=False, password",
        f"mailbox bob@example.com updated by {key_id}: quota_bytes=None",
        f"alias info@example.com created by {key_id}: 2 destination(s)",
        f"alias info@example.com deleted by {key_id}",
        f"mailbox bob@example.com deleted by {key_id}",
    ]
    logged = every_logged_text(caplog)
    assert stored_hash and stored_hash not in logged
    for secret in (PASSWORD, NEW_PASSWORD, token, hash_token(token), "Injected"):
        assert secret not in logged


async def test_key_changes_are_logged_by_id_never_by_token(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    partner = await daemon.partner("acme")
    status, created = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"],
                                                              "name": "portal"})
    assert status == 201, created
    client_token = created["token"]
    status, own = await daemon.api("POST", "/api-keys/", {"name": "second"}, token=client_token)
    assert status == 201, own

    # revoked by its token in the path (accepted, never logged), by the key itself
    status, revoked = await daemon.api("DELETE", f"/api-keys/{own['token']}",
                                       token=client_token)
    assert (status, revoked["id"]) == (200, own["id"])
    status, _ = await daemon.api("DELETE", f"/api-keys/{created['id']}")
    assert status == 200

    pid = partner["id"]
    assert info_lines(caplog, "api.tenancy") == [
        f"API key {created['id']} created for partner {pid} by master (expires never)",
        f"API key {own['id']} created for partner {pid} by {created['id']} (expires never)",
        f"API key {own['id']} of partner {pid} revoked by {created['id']}",
        f"API key {created['id']} of partner {pid} revoked by master",
    ]
    logged = every_logged_text(caplog)
    for secret in (client_token, own["token"], hash_token(client_token), hash_token(own["token"]),
                   partner["notify_secret"]):
        assert secret not in logged
