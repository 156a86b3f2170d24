"""Every 4xx the API's HTTP server answers is JSON in the one error shape (SPEC §8), including
what aiohttp's own parser refuses before any middleware runs: a header or request line over the
limit, a garbage request line, a broken Content-Length."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.conftest import Daemon


async def _raw(daemon: Daemon, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the API port; (status, headers, body) of the reply."""
    host, port = daemon.client.server.host, daemon.client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("payload", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    b"G\x00T /health HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["header-too-long", "line-too-long", "garbage", "content-length", "version",
        "too-many-headers", "nul-in-method"])
async def test_parser_errors_are_json(daemon: Daemon, payload: bytes,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    status, headers, body = await _raw(daemon, payload)
    assert 400 <= status < 500, (status, body)
    assert headers["Content-Type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and error["code"] == "invalid"
    assert b"aaaa" not in body  # the client's bytes are never echoed back
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(r.exc_info is None and "\n" not in r.getMessage()
                           for r in refused)


async def test_the_server_still_answers_after_parser_errors(daemon: Daemon) -> None:
    for _ in range(3):
        await _raw(daemon, b"GARBAGE\r\n\r\n")
    status, _, body = await _raw(daemon, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                         b"Connection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"
