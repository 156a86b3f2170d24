"""The policy server: Postfix's policy delegation protocol over asyncio.

One connection carries many requests (each smtpd process keeps one open), so a connection is
never closed after a good reply. Malformed input is logged and the connection closed: Postfix
retries, then applies its default action (SMTPD_POLICY_README). Idle connections are closed by
one sweeper task rather than a timer per read.

Each connection is an asyncio.Protocol: a request is parsed and handed to the handler in the
callback that read it. The handler answers through a callback, not a return value: the reply is
written the moment its batch commits, in the same turn of the event loop, instead of one turn
later when an awaiting task would wake up. Postfix sends the next request only after the reply;
a client that sends early gets its replies in order.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Callable

from policyd.protocol import MAX_REQUEST, ProtocolError, parse_request

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
Handler = Callable[[dict[str, str], str, Respond], None]


class _PeerLog:
    """Logs a repeated event of one peer address once a window (a minute) with a count, so a
    client sending garbage in a loop cannot flood the log; bounded in memory."""

    WINDOW = 60.0  # seconds
    MAX_PEERS = 10_000

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # (address, event) -> [window start, events not logged, last detail], oldest first
        self._seen: dict[tuple[str, str], list[Any]] = {}

    def note(self, address: str, event: str, detail: str) -> bool:
        """Record one event; True when it should be logged now (the first of its window)."""
        now, key = self._clock(), (address, event)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.WINDOW:
            entry[1] += 1
            entry[2] = detail
            return False
        if entry is not None:
            self._report(key, entry)
            del self._seen[key]  # re-inserted last: the dict stays in window order
        elif len(self._seen) >= self.MAX_PEERS:
            oldest = next(iter(self._seen))
            self._report(oldest, self._seen.pop(oldest))
        self._seen[key] = [now, 0, detail]
        return True

    def flush(self) -> None:
        """Report and forget the windows that have ended."""
        cutoff = self._clock() - self.WINDOW
        while self._seen:
            key, entry = next(iter(self._seen.items()))
            if entry[0] > cutoff:
                break
            self._report(key, entry)
            del self._seen[key]

    @staticmethod
    def _report(key: tuple[str, str], entry: list[Any]) -> None:
        if entry[1]:
            log.warning("policy: %d more %s from %s in the last minute (last: %s)", entry[1],
                        key[1], key[0], entry[2])


class _Conn(asyncio.Protocol):
    """One Postfix connection, read straight off the socket.

    A protocol, not a StreamReader and a task: a request is parsed and handed to the handler
    in the very callback that received it. That saves a future, a task wake-up and a loop turn
    per request (a good part of its cost), and the requests read in one turn go to the store
    in one batch. One request at a time is in progress; bytes that come early (a client that
    does not wait for its reply) wait in the buffer and are handled after that reply.
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = self.address = "?"
        self.last = time.monotonic()
        self.busy = False  # a request is waiting for its reply
        self._buffer = b""
        self._handling = False  # inside _handle_buffered (release() must not re-enter it)
        self._write_paused = False  # the client does not read its replies
        self._read_paused = False
        self._refused = False
        self._failed = False  # closed for a malformed request (reported once)

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.address, self.peer = _peer(transport)
        if not self.server.opened(self):
            self._refused = True
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A client that sends but never reads: stop taking its requests past 1 MB of replies
        # (pause_writing), as StreamWriter.drain() did.
        transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if not self.busy and not self._write_paused:
            self._handle_buffered()
        elif len(self._buffer) > 2 * MAX_REQUEST:  # not taking requests now: read no further
            self._pause_reading()

    def eof_received(self) -> bool:
        return False  # the client is done: close (a reply still due is dropped)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        if exc is None and not self._failed and self._buffer.strip():
            self._bad("connection closed inside a request")
        self.server.closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self.busy:
            self._handle_buffered()

    # --- requests ------------------------------------------------------------------------
    def _handle_buffered(self) -> None:
        """Hand complete requests in the buffer to the handler, one at a time: the next one
        once the last is answered (at once, or later when release() calls this again)."""
        if self._handling:
            return
        self._handling = True
        try:
            while not self.busy and not self._write_paused and self._buffer:
                data = self._take_request()
                if data is None:
                    break
                try:
                    attrs = parse_request(data)
                except ProtocolError as exc:
                    self._bad(str(exc))
                    return
                if not self.server.ask(self, attrs):
                    self._close()
                    return
            if self._read_paused and not self._write_paused and \
                    len(self._buffer) <= 2 * MAX_REQUEST:
                self._read_paused = False
                assert self.transport is not None
                self.transport.resume_reading()
        finally:
            self._handling = False

    def _take_request(self) -> bytes | None:
        """The next complete request (through its empty line), None if there is none yet;
        the size cap is StreamReader.readuntil's (limit MAX_REQUEST)."""
        buffer = self._buffer
        end = buffer.find(b"\n\n")
        size = 2
        if b"\r" in buffer:  # CRLF line ends: the empty line may be "\r\n"
            crlf = buffer.find(b"\n\r\n")
            if crlf >= 0 and (end < 0 or crlf < end):
                end, size = crlf, 3
        if end < 0:
            if len(buffer) - 1 > MAX_REQUEST:
                self._bad(f"request over {MAX_REQUEST} bytes")
            return None
        if end > MAX_REQUEST:
            self._bad(f"request over {MAX_REQUEST} bytes")
            return None
        end += size
        if end == len(buffer):  # the usual case: one request per read
            self._buffer = b""
            return buffer
        self._buffer = buffer[end:]
        return buffer[:end]

    def respond(self, reply: bytes) -> None:
        """Send the reply to the request in progress, in one write (called once for it)."""
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            transport.write(reply)
        self.release()

    def release(self) -> None:
        """The request in progress is over: take the next one, if it is already here."""
        self.last = time.monotonic()
        self.busy = False
        self.server.answered()
        if self._buffer:
            assert self.transport is not None
            if not self.transport.is_closing():
                self._handle_buffered()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _bad(self, reason: str) -> None:
        if self._failed:
            return
        self._failed = True
        self._buffer = b""
        self.server.bad(self, reason)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class PolicyServer:
    """Accepts Postfix connections; handler(attrs, peer, respond) answers each request by
    calling respond(reply) once, now or later (when its batch has committed)."""

    def __init__(self, handler: Handler, *, host: str, port: int, idle_timeout: float,
                 max_connections: int, on_count: Callable[[int], None] | None = None,
                 on_protocol_error: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._handler = handler
        self._host, self._port = host, port
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._on_count = on_count or (lambda n: None)
        self._on_protocol_error = on_protocol_error or (lambda reason: None)
        self._peer_log = _PeerLog(clock)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._in_flight = 0  # requests waiting for their reply
        self._all_answered = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start accepting."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self._host, self._port, backlog=1024, reuse_address=True)
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
            conn._close()
        if self._conns:
            try:
                await asyncio.wait_for(self._all_closed.wait(),
                                       max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                pass
        log.info("policy server stopped")

    def opened(self, conn: _Conn) -> bool:
        """Register a new connection; False (refused) past max_connections."""
        if len(self._conns) >= self._max_connections:
            if self._peer_log.note(conn.address, "connections refused", "max_connections"):
                log.warning("policy connection from %s refused: max_connections (%d) reached",
                            conn.peer, self._max_connections)
            self._on_protocol_error("max_connections")
            return False
        self._conns.add(conn)
        self._all_closed.clear()
        self._on_count(len(self._conns))
        return True

    def closed(self, conn: _Conn) -> None:
        """A registered connection is gone."""
        self._conns.discard(conn)
        self._on_count(len(self._conns))
        if not self._conns:
            self._all_closed.set()

    def answered(self) -> None:
        """One request got its reply."""
        self._in_flight -= 1
        if not self._in_flight:
            self._all_answered.set()

    def ask(self, conn: _Conn, attrs: dict[str, str]) -> bool:
        """Hand one request to the handler; False if it failed (a bug: close the connection)."""
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

    def bad(self, conn: _Conn, reason: str) -> None:
        """A malformed request: counted, and logged once a minute per address with a count
        (the connection closes it)."""
        if self._peer_log.note(conn.address, "malformed requests", reason):
            log.warning("policy connection from %s closed: malformed request (%s)", conn.peer,
                        reason)
        self._on_protocol_error(reason or "malformed")

    async def _sweep(self) -> None:
        interval = min(5.0, max(0.05, self._idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self._peer_log.flush()
            cutoff = time.monotonic() - self._idle_timeout
            for conn in list(self._conns):
                if not conn.busy and conn.last < cutoff:
                    log.info("policy connection from %s closed after %.0f s idle", conn.peer,
                             self._idle_timeout)
                    conn._close()


def _peer(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(address, address:port) of the client."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), f"{peer[0]}:{peer[1]}"
    return str(peer), str(peer)
