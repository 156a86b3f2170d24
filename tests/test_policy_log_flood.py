"""Malformed policy requests from one address are logged once a minute with a count, while the
metric still counts each one (SPEC §8): a client looping on garbage cannot flood the journal."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import pytest

from policyd.policyserver import PolicyServer, _PeerLog
from tests.conftest import reply_until_closed


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answer(attrs: dict[str, str], peer: str, respond: Callable[[bytes], None]) -> None:
    respond(b"action=DUNNO\n\n")


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_one_line_per_address_per_minute_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="policyd.policyserver")
    clock, counted = Clock(), []
    server = PolicyServer(_answer, host="127.0.0.1", port=0, idle_timeout=300,
                          max_connections=100, on_protocol_error=counted.append, clock=clock)
    await server.start()
    try:
        for _ in range(30):
            assert await reply_until_closed(server.port, b"garbage without equals\n\n") == b""
        assert len(counted) == 30  # the metric sees every one
        assert len(_lines(caplog, "malformed request")) == 1
        # a good request still gets its answer
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"request=smtpd_access_policy\n\n")
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5) == b"action=DUNNO\n\n"
        writer.close()

        clock.now += _PeerLog.WINDOW + 1
        server._peer_log.flush()  # what the idle sweeper does every few seconds
        summary = _lines(caplog, "more malformed requests")
        assert summary == ["policy: 29 more malformed requests from 127.0.0.1 in the last "
                           "minute (last: no '=')"]
        assert await reply_until_closed(server.port, b"x\n\n") == b""  # a new window logs at once
        assert len(_lines(caplog, "closed: malformed request")) == 2
    finally:
        await server.stop()


def test_the_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    peers = _PeerLog(clock)
    for i in range(_PeerLog.MAX_PEERS + 500):
        assert peers.note(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "bad", "x")
        peers.note(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "bad", "x")
    assert len(peers._seen) == _PeerLog.MAX_PEERS
    # the evicted ones were reported, not lost
    assert len(_lines(caplog, "1 more bad")) == 500
