"""A reference parser for the policy wire format, line by line, kept as a test oracle: the
server's one parser (policyd.protocol.parse_request) must accept and refuse exactly what this
straightforward reading of SMTPD_POLICY_README does."""
from __future__ import annotations

from policyd.protocol import MAX_ATTRS, MAX_REQUEST, ProtocolError, parse_line


class RequestBuilder:
    """Accumulates the lines of one request on a connection, enforcing the size caps."""

    __slots__ = ("_attrs", "_lines", "_size")

    def __init__(self) -> None:
        self._attrs: dict[str, str] = {}
        self._lines = 0
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while a request has started but not yet ended."""
        return self._size > 0

    def add(self, line: bytes) -> dict[str, str] | None:
        """Add one raw line; return the finished attributes on the empty line, else None."""
        self._size += len(line)
        if self._size > MAX_REQUEST:
            raise ProtocolError(f"request over {MAX_REQUEST} bytes")
        item = parse_line(line)
        if item is None:
            attrs = self._attrs
            self.reset()
            return attrs  # {} for a stray empty line: answered as a request with no rule
        self._lines += 1
        if self._lines > MAX_ATTRS:
            raise ProtocolError(f"more than {MAX_ATTRS} attributes")
        self._attrs[item[0]] = item[1]  # a repeated attribute: the last one wins
        return None

    def reset(self) -> None:
        """Forget any partial request."""
        self._attrs = {}
        self._lines = 0
        self._size = 0
