"""conf/dovecot against a real Dovecot: logins and user lookups on the daemon's own database.

A private Dovecot instance (tests/dovecot_harness.py: own base_dir, no network listener) reads
the SQLite file a running daemon writes, through conf/dovecot/99-policyd.conf and
dovecot-policyd-sql.conf.ext with only their paths changed. Mailboxes are created through the API
(bcrypt in our thread, stored as {BLF-CRYPT}); `doveadm auth test` and `doveadm user` are what
an operator would run.
"""
from __future__ import annotations

import asyncio
import pwd
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from policyd.config import Config
from tests.conftest import Daemon, start_daemon
from tests.dovecot_harness import PrivateDovecot, dovecot_skip_reason

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.skipif(dovecot_skip_reason() is not None, reason=str(dovecot_skip_reason())),
]
PASSWORD = "correct horse battery"


@pytest.fixture
async def daemon_and_dovecot(make_config: Callable[..., Config],
                             tmp_path: Path) -> AsyncIterator[tuple[Daemon, PrivateDovecot]]:
    config = make_config()
    daemon = await start_daemon(config)
    workdir = tmp_path / "dovecot"
    workdir.mkdir()
    dovecot = PrivateDovecot(workdir, Path(config.db_path))
    dovecot.start()
    try:
        yield daemon, dovecot
    finally:
        dovecot.stop()
        await daemon.stop()


async def mailbox(daemon: Daemon, email: str, **fields: Any) -> None:
    status, body = await daemon.api("POST", "/users/",
                                    {"email": email, "password": PASSWORD, **fields})
    assert status == 201, body


def userdb(output: str) -> dict[str, str]:
    """The fields `doveadm user` prints: a header line, then one "name<TAB>value" per field."""
    found: dict[str, str] = {}
    for line in output.splitlines()[1:]:
        name, _, value = line.partition("\t")
        found[name] = value
    return found


async def test_dovecot_logs_in_with_the_password_the_api_hashed(
        daemon_and_dovecot: tuple[Daemon, PrivateDovecot]) -> None:
    daemon, dovecot = daemon_and_dovecot
    await daemon.domain("example.com")
    await mailbox(daemon, "bob@example.com")
    ok = await asyncio.to_thread(dovecot.auth, "Bob@Example.com", PASSWORD)
    assert ok.returncode == 0, (ok.stdout, ok.stderr, dovecot.log())
    assert "auth succeeded" in ok.stdout
    assert "user=bob@example.com" in ok.stdout  # the stored spelling, from password_query
    wrong = await asyncio.to_thread(dovecot.auth, "bob@example.com", "nope")
    assert wrong.returncode != 0 and "auth failed" in wrong.stdout


async def test_dovecot_user_lookup_follows_the_api(
        daemon_and_dovecot: tuple[Daemon, PrivateDovecot]) -> None:
    daemon, dovecot = daemon_and_dovecot
    await daemon.domain("example.com")
    await mailbox(daemon, "ann@example.com", quota_bytes=1_000_000)
    found = await asyncio.to_thread(dovecot.run, "user", "ann@example.com")
    assert found.returncode == 0, (found.stdout, found.stderr, dovecot.log())
    fields = userdb(found.stdout)
    vmail = pwd.getpwnam("vmail")
    assert (fields["uid"], fields["gid"]) == (str(vmail.pw_uid), str(vmail.pw_gid))
    assert fields["home"] == "/var/vmail/example.com/ann"
    assert fields["mail"] == "maildir:/var/vmail/example.com/ann/Maildir"
    assert fields["quota_rule"] == "*:bytes=1000000"
    status, _ = await daemon.api("PUT", "/users/ann@example.com/quota", {"quota_bytes": None})
    assert status == 200
    fields = userdb((await asyncio.to_thread(dovecot.run, "user", "ann@example.com")).stdout)
    assert fields["quota_rule"] == "*:storage=0"  # unlimited
    missing = await asyncio.to_thread(dovecot.run, "user", "nobody@example.com")
    assert missing.returncode != 0


async def test_password_change_and_deactivation_reach_dovecot(
        daemon_and_dovecot: tuple[Daemon, PrivateDovecot]) -> None:
    daemon, dovecot = daemon_and_dovecot
    await daemon.domain("example.com")
    await mailbox(daemon, "eve@example.com")
    status, _ = await daemon.api("PUT", "/users/eve@example.com",
                                 {"password": "a new password 2"})
    assert status == 200
    new = await asyncio.to_thread(dovecot.auth, "eve@example.com",
                                  "a new password 2")
    assert new.returncode == 0, (new.stdout, new.stderr, dovecot.log())
    old = await asyncio.to_thread(dovecot.auth, "eve@example.com", PASSWORD)
    assert old.returncode != 0 and "auth failed" in old.stdout
    status, _ = await daemon.api("PUT", "/users/eve@example.com", {"active": False})
    assert status == 200
    off = await asyncio.to_thread(dovecot.auth, "eve@example.com",
                                  "a new password 2")
    assert off.returncode != 0 and "auth failed" in off.stdout  # inactive: no login


async def test_a_suspended_domain_cannot_log_in_until_activated(
        daemon_and_dovecot: tuple[Daemon, PrivateDovecot]) -> None:
    daemon, dovecot = daemon_and_dovecot
    await daemon.domain("frozen.example")
    await mailbox(daemon, "kim@frozen.example", quota_bytes=5000)
    status, _ = await daemon.api("PUT", "/domains/frozen.example/suspend")
    assert status == 200
    refused = await asyncio.to_thread(dovecot.auth, "kim@frozen.example", PASSWORD)
    assert refused.returncode != 0 and "auth failed" in refused.stdout
    # Mail held while suspended is still deliverable: the userdb keeps answering.
    found = await asyncio.to_thread(dovecot.run, "user", "kim@frozen.example")
    assert found.returncode == 0 and userdb(found.stdout)["quota_rule"] == "*:bytes=5000"
    status, _ = await daemon.api("PUT", "/domains/frozen.example/activate")
    assert status == 200
    ok = await asyncio.to_thread(dovecot.auth, "kim@frozen.example", PASSWORD)
    assert ok.returncode == 0, (ok.stdout, ok.stderr, dovecot.log())
