"""kill -9 under load loses no increment answered DUNNO (SPEC §8).

`policyd serve` runs as a real process on its own ports; clients count the DUNNO replies they
got; the daemon is SIGKILLed mid-load; then the counter is read from the database file. Every
DUNNO was sent after its increment committed, so the counter holds at least as many, and at
most as many more as there were requests still unanswered at the kill.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from policyd.ses import SesStatus
from policyd.sesflow import _store_status
from policyd.store import Store, connect
from policyd.store import counters
from policyd.store import domains as domain_store
from policyd.timeutil import Periods, utcnow
from tests.conftest import MASTER, outbound, request_bytes, write_config
from tests.ports import free_port

pytestmark = pytest.mark.slow  # a stress test: `pytest -m "not slow"` skips it

DOMAIN = "crash.example"
CLIENTS = 8
KILL_AFTER = 300  # DUNNO replies before the kill
START_WAIT = 30.0  # bound on the daemon's start (never reached when all is well)


class DaemonProcess:
    """`policyd serve` as a child process, its log drained (it logs every decision)."""

    def __init__(self, proc: asyncio.subprocess.Process, policy_port: int, api_port: int):
        self.proc, self.policy_port, self.api_port = proc, policy_port, api_port
        self.listening = {"policy server listening": asyncio.Event(),
                          "API listening": asyncio.Event()}
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            for marker, event in self.listening.items():
                if marker.encode() in line:
                    event.set()

    async def started(self) -> None:
        """Wait until both servers listen, or fail if the process exits first."""
        ready = asyncio.gather(*(e.wait() for e in self.listening.values()))
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({ready, exited}, timeout=START_WAIT,
                                     return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        assert ready in done, f"daemon did not start (exit code {self.proc.returncode})"


@pytest.fixture
async def daemon_process(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    """A real `policyd serve` on free ports and a database in tmp_path."""
    policy_port, api_port = free_port(), free_port()
    config = write_config(tmp_path / "policyd.ini", {
        "database": {"path": str(tmp_path / "policyd.sqlite3")},
        "policy": {"listen": f"127.0.0.1:{policy_port}"},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "auth": {"master_token": MASTER},
        "ses": {"auto_verify": "false", "endpoint_url": "http://127.0.0.1:9"},
        "scheduler": {"enabled": "false"},
    })
    env = {k: v for k, v in os.environ.items() if k != "POLICYD_MASTER_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "policyd", "serve", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    daemon = DaemonProcess(proc, policy_port, api_port)
    try:
        await daemon.started()
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await daemon.drain


async def seed_domain(daemon: DaemonProcess, db_path: Path) -> None:
    """Create the domain through the daemon's API, no limits; SES-verify it via the store."""
    headers = {"Authorization": f"Bearer {MASTER}"}
    base = f"http://127.0.0.1:{daemon.api_port}"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/domains/", json={"name": DOMAIN}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.put(f"{base}/domains/{DOMAIN}/outbound",
                            json={"tier": "unlimited"}) as resp:
            assert resp.status == 200, await resp.text()
    store = Store(db_path)  # a second writer process on the same WAL database
    await store.open()
    try:
        await store.write(_store_status, DOMAIN,
                          SesStatus("success", "Success", "tok", ("a", "b", "c")))
    finally:
        await store.close()


class Load:
    """Clients that count DUNNO replies and SIGKILL the daemon after KILL_AFTER of them."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.dunno = 0
        self.other: list[bytes] = []
        self.in_flight = 0  # requests sent and never answered

    async def client(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.daemon.policy_port)
        request = request_bytes(**outbound(f"user@{DOMAIN}"))
        try:
            while True:
                writer.write(request)
                try:
                    reply = await reader.readuntil(b"\n\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.in_flight += 1
                    return
                if reply != b"action=DUNNO\n\n":
                    self.other.append(reply)
                    continue
                self.dunno += 1
                if self.dunno == KILL_AFTER:
                    self.daemon.proc.send_signal(signal.SIGKILL)
        finally:
            writer.close()


def sent_today(db_path: Path) -> int:
    """The domain's counter for today, read from the file the dead daemon left."""
    conn = connect(db_path, readonly=True)
    try:
        domain = domain_store.find_domain(conn, DOMAIN)
        assert domain is not None
        day, month = Periods("UTC").keys(utcnow())
        return counters.totals(conn, domain.id, day, month).sent_today
    finally:
        conn.close()


async def test_kill_9_under_load_loses_no_dunno_increment(daemon_process: DaemonProcess,
                                                           tmp_path: Path) -> None:
    db_path = tmp_path / "policyd.sqlite3"
    await seed_domain(daemon_process, db_path)
    load = Load(daemon_process)
    await asyncio.wait_for(asyncio.gather(*(load.client() for _ in range(CLIENTS))), 120)
    assert await daemon_process.proc.wait() == -signal.SIGKILL
    assert load.other == []
    assert load.dunno >= KILL_AFTER
    assert load.in_flight <= CLIENTS
    counted = sent_today(db_path)
    assert load.dunno <= counted <= load.dunno + load.in_flight, (counted, load.dunno)

