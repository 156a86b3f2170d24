"""kill -9 under load loses no increment answered DUNNO (SPEC §8).

`policyd serve` runs as a real process on its own ports; clients count the DUNNO replies they
got; the daemon is SIGKILLed mid-load; then the counter is read from the database file. Every
DUNNO was sent after its increment committed, so the counter holds at least as many, and at
most as many more as there were requests still unanswered at the kill.
"""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from tests.conftest import MASTER, outbound, request_bytes
from tests.daemon_process import (DaemonProcess, daemon_config, mark_ses_verified, sent_today,
                                  serving)

pytestmark = pytest.mark.slow  # a stress test: `pytest -m "not slow"` skips it

DOMAIN = "crash.example"
CLIENTS = 8
KILL_AFTER = 300  # DUNNO replies before the kill


@pytest.fixture
async def daemon_process(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    """A real `policyd serve` on free ports and a database in tmp_path."""
    async with serving(daemon_config(tmp_path, tmp_path / "policyd.sqlite3")) as daemon:
        yield daemon


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
    await mark_ses_verified(db_path, DOMAIN)


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
    counted = sent_today(db_path, DOMAIN)
    assert load.dunno <= counted <= load.dunno + load.in_flight, (counted, load.dunno)

