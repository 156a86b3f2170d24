"""The policy server: Postfix's policy delegation protocol over asyncio streams.

One connection carries many requests (each smtpd process keeps one open), so a connection is
never closed after a good reply. Malformed input is logged and the connection closed: Postfix
retries, then applies its default action (SMTPD_POLICY_README). Idle connections are closed by
one sweeper task rather than a timer per read, which keeps the per-request cost at one await.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Awaitable, Callable

from policyd.protocol import MAX_ATTRS, MAX_REQUEST, ProtocolError, parse_line

log = logging.getLogger(__name__)
Handler = Callable[[dict[str, str], str], Awaitable[bytes]]


def parse_request(data: bytes) -> dict[str, str]:
    """Parse one complete request (ending with an empty line) into its attributes."""
    attrs: dict[str, str] = {}
    lines = data.split(b"\n")
    if len(lines) > MAX_ATTRS + 2:
        raise ProtocolError(f"more than {MAX_ATTRS} attributes")
    for line in lines:
        item = parse_line(line)
        if item is not None:
            attrs[item[0]] = item[1]
    return attrs


class _Conn:
    __slots__ = ("writer", "last", "busy", "peer")

    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer, self.peer = writer, peer
        self.last = time.monotonic()
        self.busy = False


class PolicyServer:
    """Accepts Postfix connections and answers each request with handler(attrs, peer)."""

    def __init__(self, handler: Handler, *, host: str, port: int, idle_timeout: float,
                 max_connections: int, on_count: Callable[[int], None] | None = None,
                 on_protocol_error: Callable[[str], None] | None = None) -> None:
        self._handler = handler
        self._host, self._port = host, port
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._on_count = on_count or (lambda n: None)
        self._on_protocol_error = on_protocol_error or (lambda reason: None)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start accepting."""
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, limit=MAX_REQUEST, backlog=1024,
            reuse_address=True)
        self._sweeper = asyncio.create_task(self._sweep(), name="policy-idle-sweeper")
        log.info("policy server listening on %s:%d", self._host, self.port)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace
        while any(c.busy for c in self._conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            conn.writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
        log.info("policy server stopped")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if len(self._conns) >= self._max_connections:
            log.warning("policy connection from %s refused: max_connections (%d) reached",
                        peer, self._max_connections)
            self._on_protocol_error("max_connections")
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(writer, peer)
        self._conns.add(conn)
        self._on_count(len(self._conns))
        try:
            await self._loop(conn, reader)
        finally:
            self._conns.discard(conn)
            self._on_count(len(self._conns))
            writer.close()

    async def _loop(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        writer, handler = conn.writer, self._handler
        while True:
            try:
                data = await reader.readuntil(b"\n\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    self._bad(conn, "connection closed inside a request")
                return
            except asyncio.LimitOverrunError:
                self._bad(conn, f"request over {MAX_REQUEST} bytes")
                return
            except (ConnectionError, OSError):
                return
            conn.busy = True
            try:
                attrs = parse_request(data)
            except ProtocolError as exc:
                self._bad(conn, str(exc))
                return
            reply = await handler(attrs, conn.peer)
            writer.write(reply)
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()  # a client that pipelines but never reads
            conn.last = time.monotonic()
            conn.busy = False

    def _bad(self, conn: _Conn, reason: str) -> None:
        log.warning("policy connection from %s closed: malformed request (%s)", conn.peer,
                    reason)
        self._on_protocol_error(reason.split(" ")[0] if reason else "malformed")

    async def _sweep(self) -> None:
        interval = min(5.0, max(0.05, self._idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - self._idle_timeout
            for conn in list(self._conns):
                if not conn.busy and conn.last < cutoff:
                    log.info("policy connection from %s closed after %.0f s idle", conn.peer,
                             self._idle_timeout)
                    conn.writer.close()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
