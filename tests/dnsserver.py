"""A small real DNS server on loopback (UDP and TCP) for tests.

Zone data is a dict ``records`` mapping ``(name, rdtype)`` to rdata texts in zone-file
presentation format, e.g. ``("example.com", "MX") -> ["10 mx1.mail.test."]``. Names are
matched case-insensitively with or without the trailing dot. TXT values that do not start
with a double quote are taken as one plain string (``"v=spf1 -all"``), so tests need no
quoting; a value starting with ``"`` is parsed as presentation format (several strings).

Answers: the records for a known name and type (following in-zone CNAMEs like an
authoritative server), NOERROR with an empty answer for a known name and another type,
NXDOMAIN for an unknown name, SERVFAIL for names in ``servfail_names``, and nothing at all
when ``silent`` is true or the name is in ``silent_names`` (to test timeouts). A UDP answer
larger than the client's payload (512 bytes without EDNS) is truncated with TC set, and the
client retries over TCP, which the server also answers.

Use it through the ``dns_server`` fixture (``from tests.dnsserver import dns_server``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest_asyncio

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TTL = 60
MAX_CNAME_CHAIN = 8
BIND_ATTEMPTS = 20


def _norm(name: str) -> str:
    """Lowercase a name and drop its trailing dot."""
    return name.strip().rstrip(".").lower()


def _rdata_texts(rdtype: str, values: list[str]) -> list[str]:
    """Quote plain TXT strings (split in 255-byte chunks, RFC 1035 §3.3.14)."""
    if rdtype != "TXT":
        return values
    return [v if v.startswith('"') else _quote_txt(v) for v in values]


def _quote_txt(value: str) -> str:
    """Turn one plain string into TXT presentation format, escaping as \\DDD."""
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + "".join(map(_escape_byte, chunk)) + '"' for chunk in chunks)


def _escape_byte(byte: int) -> str:
    """One byte of a TXT string in presentation format (RFC 1035 §5.1)."""
    char = chr(byte)
    return char if 0x20 <= byte < 0x7F and char not in '"\\' else f"\\{byte:03d}"


class DnsServer:
    """Authoritative-ish DNS responder for a tiny in-memory zone, on 127.0.0.1 port 0."""

    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None) -> None:
        self.records: dict[tuple[str, str], list[str]] = dict(records or {})
        self.silent = False
        self.silent_names: set[str] = set()
        self.servfail_names: set[str] = set()
        self.queries = 0
        self.tcp_queries = 0
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    def add(self, name: str, rdtype: str, *values: str) -> None:
        """Append rdata texts to ``(name, rdtype)``."""
        self.records.setdefault((_norm(name), rdtype.upper()), []).extend(values)

    async def start(self) -> None:
        """Bind UDP on an ephemeral port, then TCP on the same port (retrying if taken)."""
        loop = asyncio.get_running_loop()
        for attempt in range(BIND_ATTEMPTS):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(HOST, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, HOST, port)
            except OSError:  # the TCP port of that number is in use elsewhere
                transport.close()
                if attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            self._udp, self.port = transport, port
            log.debug("dns server on %s:%d", HOST, self.port)
            return

    async def stop(self) -> None:
        """Close UDP, the TCP listener and every open TCP connection."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()

    def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        """Build the wire reply to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            log.debug("dns server: unparsable query")
            return None
        self.queries += 1
        if not query.question:
            return None
        qname = _norm(query.question[0].name.to_text())
        if self.silent or qname in {_norm(n) for n in self.silent_names}:
            return None
        response = dns.message.make_response(query)
        self._fill(response, qname, dns.rdatatype.to_text(query.question[0].rdtype))
        if tcp:
            return response.to_wire(max_size=65535)
        # UDP replies fit the client's EDNS payload, else 512 bytes (RFC 1035 §4.2.1);
        # prefer_truncation sets TC instead of raising, so the client retries over TCP.
        limit = query.payload if query.edns >= 0 else 512
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _fill(self, response: dns.message.Message, qname: str, rdtype: str) -> None:
        """Put the answer (with in-zone CNAME chain) and rcode into ``response``."""
        if qname in {_norm(n) for n in self.servfail_names}:
            response.set_rcode(dns.rcode.SERVFAIL)
            return
        zone = {(_norm(n), t.upper()): v for (n, t), v in self.records.items()}
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            if (name, rdtype) in zone:
                response.answer.append(self._rrset(name, rdtype, zone[(name, rdtype)]))
                return
            if rdtype == "CNAME" or (name, "CNAME") not in zone:
                break
            cname = self._rrset(name, "CNAME", zone[(name, "CNAME")])
            response.answer.append(cname)
            name = _norm(cname[0].target.to_text())
        if name == qname and not self._exists(zone, qname):
            response.set_rcode(dns.rcode.NXDOMAIN)

    @staticmethod
    def _exists(zone: dict[tuple[str, str], list[str]], name: str) -> bool:
        """True if the name or a name below it has records (RFC 8020 empty non-terminals)."""
        return any(n == name or n.endswith("." + name) for n, _ in zone)

    @staticmethod
    def _rrset(name: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        """One RRset from rdata texts; relative names are taken as absolute."""
        return dns.rrset.from_text_list(
            name + ".",
            TTL,
            "IN",
            rdtype,
            _rdata_texts(rdtype, values),
            origin=dns.name.root,
            relativize=False,
        )

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer length-prefixed queries on one TCP connection (RFC 7766)."""
        self._tcp_writers.add(writer)
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                wire = await reader.readexactly(size)
                self.tcp_queries += 1
                reply = self.answer(wire, tcp=True)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    """Hands each datagram to the server and sends back its reply, if any."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A started DnsServer with an empty zone, stopped after the test."""
    server = DnsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
