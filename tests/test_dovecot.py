"""conf/dovecot against a real Dovecot: logins and user lookups on the daemon's own database.

A private Dovecot instance (own base_dir, no listeners but its auth sockets) reads the SQLite
file a running daemon writes, through conf/dovecot/10-auth-policyd.conf and
dovecot-sql.conf.ext with only their two paths changed. Mailboxes are created through the API
(bcrypt in our thread, stored as {BLF-CRYPT}); `doveadm auth test` and `doveadm user` are what
an operator would run.
"""
from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from policyd.config import Config
from tests.conftest import Daemon, start_daemon

CONF = Path(__file__).resolve().parent.parent / "conf" / "dovecot"
DOVECOT, DOVEADM = shutil.which("dovecot"), shutil.which("doveadm")
SQLITE_DRIVER = Path("/usr/lib/dovecot/modules/libdriver_sqlite.so")


def _vmail_exists() -> bool:
    try:
        pwd.getpwnam("vmail")
        grp.getgrnam("vmail")
    except KeyError:
        return False
    return True


pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.skipif(
        not (DOVECOT and DOVEADM and SQLITE_DRIVER.exists() and os.geteuid() == 0
             and _vmail_exists()),
        reason="needs Dovecot with its SQLite driver (dovecot-core, dovecot-sqlite), root, and "
               "the vmail user and group the snippets name (./test.sh sets these up as root)"),
]
PASSWORD = "correct horse battery"


class Dovecot:
    """A private Dovecot: its config, started and stopped with -c."""

    def __init__(self, workdir: Path, database: Path) -> None:
        self.dir = workdir
        self._attempts = 0
        self.config = workdir / "dovecot.conf"
        sql = workdir / "dovecot-sql.conf.ext"
        sql.write_text((CONF / "dovecot-sql.conf.ext").read_text().replace(
            "connect = /var/lib/policyd/policyd.sqlite3", f"connect = {database}"))
        auth = workdir / "10-auth-policyd.conf"
        auth.write_text((CONF / "10-auth-policyd.conf").read_text().replace(
            "/etc/dovecot/dovecot-sql.conf.ext", str(sql)))
        self.config.write_text(
            f"base_dir = {workdir}/run\n"
            f"state_dir = {workdir}/state\n"
            f"log_path = {workdir}/dovecot.log\n"
            "protocols =\n"
            "ssl = no\n"
            f"!include {auth}\n"
            "auth_failure_delay = 0\n")  # a refused login answers at once (default: 2 s)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert DOVEADM is not None
        return subprocess.run([DOVEADM, "-c", str(self.config), *args], capture_output=True,
                              text=True, timeout=30)

    def auth(self, user: str, password: str) -> subprocess.CompletedProcess[str]:
        """`doveadm auth test`, each from a remote IP of its own: Dovecot delays the next
        attempt from an address after a failed one (its auth penalty), seconds per test."""
        self._attempts += 1
        return self.run("auth", "test", "-x", f"rip=192.0.2.{self._attempts}", user, password)

    def start(self) -> None:
        """Start it (it forks into the background: its output goes to a file, not a pipe
        that would stay open), and wait until its auth socket is there."""
        assert DOVECOT is not None
        with open(self.dir / "start.out", "w") as out:
            subprocess.run([DOVECOT, "-c", str(self.config)], check=True, stdout=out,
                           stderr=subprocess.STDOUT, timeout=30)
        socket = self.dir / "run" / "auth-client"
        for _ in range(200):
            if socket.exists():
                return
            time.sleep(0.05)
        raise AssertionError(f"dovecot did not start: {self.log()}")

    def stop(self) -> None:
        """SIGTERM to its master process, then wait for it to be gone (`dovecot stop` would
        also do, but sleeps seconds before it checks)."""
        try:
            pid = int((self.dir / "run" / "master.pid").read_text())
        except (OSError, ValueError):
            return
        os.killpg(pid, signal.SIGTERM)  # the master and its children at once
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
async def daemon_and_dovecot(make_config: Callable[..., Config],
                             tmp_path: Path) -> AsyncIterator[tuple[Daemon, Dovecot]]:
    config = make_config()
    daemon = await start_daemon(config)
    workdir = tmp_path / "dovecot"
    workdir.mkdir()
    dovecot = Dovecot(workdir, Path(config.db_path))
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
        daemon_and_dovecot: tuple[Daemon, Dovecot]) -> None:
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
        daemon_and_dovecot: tuple[Daemon, Dovecot]) -> None:
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
        daemon_and_dovecot: tuple[Daemon, Dovecot]) -> None:
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
