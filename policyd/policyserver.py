"""The policy server: Postfix's policy delegation protocol over asyncio streams.

One connection carries many requests (each smtpd process keeps one open), so a connection is
never closed after a good reply. Malformed input is logged and the connection closed: Postfix
retries, then applies its default action (SMTPD_POLICY_README). Idle connections are closed by
one sweeper task rather than a timer per read.

The handler answers through a callback, not a return value: the reply is written the moment
its batch commits, in the same turn of the event loop, instead of one turn later when an
awaiting task would wake up. The connection's task meanwhile waits for the next request
(Postfix sends it only after the reply; a client that sends early gets its replies in order).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from policyd.protocol import MAX_ATTRS, MAX_LINE, MAX_REQUEST, ProtocolError, parse_line

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
Handler = Callable[[dict[str, str], str, Respond], None]


def parse_request(data: bytes) -> dict[str, str]:
    """Parse one complete request (ending with an empty line) into its attributes.

    The same rules as protocol.parse_line, line by line, but the request is decoded once: a
    UTF-8 sequence cannot span a newline, so this accepts and refuses exactly what it does.
    """
    if len(data) > MAX_LINE:  # some line may be too long: let parse_line say which
        return _parse_slowly(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not UTF-8") from None
    lines = text.split("\n")
    if len(lines) > MAX_ATTRS + 2:
        raise ProtocolError(f"more than {MAX_ATTRS} attributes")
    if "\r" in text:  # CRLF line ends (Postfix sends LF only)
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    attrs: dict[str, str] = {}
    for line in lines:
        if line:
            # Split on the FIRST '=' only: values (ccert_subject, sender...) may contain '='.
            name, sep, value = line.partition("=")
            if not sep or not name:
                raise ProtocolError("no '='" if not sep else "empty attribute name")
            attrs[name] = value
    return attrs


def _parse_slowly(data: bytes) -> dict[str, str]:
    attrs: dict[str, str] = {}
    lines = data.split(b"\n")
    if len(lines) > MAX_ATTRS + 2:
        raise ProtocolError(f"more than {MAX_ATTRS} attributes")
    for line in lines:
        item = parse_line(line + b"\n")  # with its newline, so a CR before it goes too
        if item is not None:
            attrs[item[0]] = item[1]
    return attrs


class _Conn:
    """One Postfix connection, and whether a request of it is waiting for its reply."""

    __slots__ = ("writer", "peer", "last", "busy", "waiter", "server")

    def __init__(self, writer: asyncio.StreamWriter, peer: str, server: PolicyServer) -> None:
        self.writer, self.peer, self.server = writer, peer, server
        self.last = time.monotonic()
        self.busy = False
        self.waiter: asyncio.Future[None] | None = None

    def respond(self, reply: bytes) -> None:
        """Send the reply to the request in progress, in one write (called once for it)."""
        if not self.writer.is_closing():
            self.writer.write(reply)
        self.release()

    def release(self) -> None:
        """The request in progress is over."""
        self.last = time.monotonic()
        self.busy = False
        self.server.answered()
        if self.waiter is not None:
            self.waiter.set_result(None)
            self.waiter = None

    async def replied(self) -> None:
        """Wait until the request in progress has its reply."""
        while self.busy:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter


class PolicyServer:
    """Accepts Postfix connections; handler(attrs, peer, respond) answers each request by
    calling respond(reply) once, now or later (when its batch has committed)."""

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
        self._in_flight = 0  # requests waiting for their reply
        self._all_answered = asyncio.Event()

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
        """Stop accepting, let in-flight requests get their reply, close every connection."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace
        if self._in_flight:
            try:
                await asyncio.wait_for(self._all_answered.wait(), grace)
            except TimeoutError:
                log.warning("policy server stopping with %d requests unanswered",
                            self._in_flight)
        for conn in list(self._conns):
            conn.writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
        log.info("policy server stopped")

    def answered(self) -> None:
        """One request got its reply."""
        self._in_flight -= 1
        if not self._in_flight:
            self._all_answered.set()

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
        conn = _Conn(writer, peer, self)
        self._conns.add(conn)
        self._on_count(len(self._conns))
        try:
            await self._loop(conn, reader)
        finally:
            self._conns.discard(conn)
            self._on_count(len(self._conns))
            writer.close()

    async def _loop(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        writer = conn.writer
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
            try:
                attrs = parse_request(data)
            except ProtocolError as exc:
                self._bad(conn, str(exc))
                return
            if conn.busy:  # Postfix waits for each reply; a client that does not gets them in order
                await conn.replied()
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()  # a client that sends but never reads
            if not self._ask(conn, attrs):
                return

    def _ask(self, conn: _Conn, attrs: dict[str, str]) -> bool:
        conn.busy = True
        self._in_flight += 1
        self._all_answered.clear()
        try:
            self._handler(attrs, conn.peer, conn.respond)
        except Exception:  # a bug: this connection ends, the others go on
            log.exception("policy request from %s failed", conn.peer)
            if conn.busy:
                conn.release()
            return False
        return True

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
