"""Postfix policy delegation wire format (SMTPD_POLICY_README): pure functions, no I/O.

A request is ``name=value`` lines ended by an empty line; the reply is ``action=...`` and an
empty line. Anything malformed raises ProtocolError: the server logs it and closes the
connection, and Postfix retries, then applies its default action.
"""
from __future__ import annotations

from dataclasses import dataclass

from idna import IDNAError

from policyd.names import to_a_labels

MAX_LINE = 65536  # bytes in one line, terminator excluded
MAX_ATTRS = 256  # attribute lines in one request (Postfix sends about 30)
MAX_REQUEST = 256 * 1024  # bytes in one request, terminators included
POLICY_REQUEST = "smtpd_access_policy"  # the only `request` value Postfix sends
MAX_SIZE = 2**40  # bytes in one message (SPEC §8): Postfix's message_size_limit is far below
MAX_RECIPIENTS = 10**6  # recipient_count of one message (SPEC §8)

_DUNNO_REPLY = b"action=DUNNO\n\n"


class ProtocolError(ValueError):
    """A malformed request; the message is a short reason fit for a log line."""


def parse_line(line: bytes) -> tuple[str, str] | None:
    """Parse one ``name=value`` line; None for the empty line that ends a request."""
    end = len(line)
    if end and line[end - 1] == 0x0A:  # b"\n", and b"\r\n"
        end -= 1
        if end and line[end - 1] == 0x0D:
            end -= 1
    if end == 0:
        return None
    if end > MAX_LINE:
        raise ProtocolError(f"line over {MAX_LINE} bytes")
    try:
        text = line[:end].decode("utf-8") if end != len(line) else line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not UTF-8") from None
    # Split on the FIRST '=' only: values (ccert_subject, sender...) may contain '='.
    name, sep, value = text.partition("=")
    if not sep:
        raise ProtocolError("no '='")
    if not name:
        raise ProtocolError("empty attribute name")
    return name, value


def parse_request(data: bytes) -> dict[str, str]:
    """Parse one complete request (ending with an empty line) into its attributes.

    The same rules as parse_line, line by line, but the request is decoded once: a UTF-8
    sequence cannot span a newline, so this accepts and refuses exactly what it does. Then
    the numbers Postfix sends are held to their bounds.
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
    _check_numbers(attrs)
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
    _check_numbers(attrs)
    return attrs


def _check_numbers(attrs: dict[str, str]) -> None:
    """Refuse a request whose size or recipient_count is past its bound (SPEC §8): no real
    message is that big, and size x recipients must stay far inside a 64-bit counter."""
    # A value no longer than the bound's shorter digits is within it: only a longer one
    # (rare: a real Postfix never sends it) is looked at closely. Per request, on the hot path.
    size, count = attrs.get("size"), attrs.get("recipient_count")
    if size is not None and len(size) > _SHORT_SIZE:
        _check_bound("size", size, MAX_SIZE)
    if count is not None and len(count) > _SHORT_COUNT:
        _check_bound("recipient_count", count, MAX_RECIPIENTS)


_SHORT_SIZE, _SHORT_COUNT = len(str(MAX_SIZE)) - 1, len(str(MAX_RECIPIENTS)) - 1


def _check_bound(name: str, value: str, bound: int) -> None:
    # parse_count's rule: only ASCII digits are a number (anything else counts as 0)
    if value.isdigit() and value.isascii():
        digits = value.lstrip("0")  # (int() refuses over 4,300 digits: look first)
        if len(digits) > 13 or int(digits or "0") > bound:
            raise ProtocolError(f"{name} over {bound}")


def format_reply(action: str) -> bytes:
    """Encode one reply: ``action=<action>`` and the empty line, ready for a single write."""
    if action == "DUNNO":
        return _DUNNO_REPLY
    if not action or action.isspace():
        raise ValueError("empty policy action")
    if "\n" in action or "\r" in action:  # a newline would end the reply early
        action = action.replace("\r", " ").replace("\n", " ")
    return f"action={action}\n\n".encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """The attributes of one request the daemon uses, typed and normalised."""

    request: str = ""
    protocol_state: str = ""
    sender: str = ""
    sender_domain: str = ""
    recipient: str = ""
    recipient_domain: str = ""
    recipient_count: int = 0
    size: int = 0
    sasl_username: str = ""
    sasl_domain: str = ""
    client_address: str = ""
    instance: str = ""
    queue_id: str = ""


def to_request(attrs: dict[str, str]) -> PolicyRequest:
    """Build a PolicyRequest from parsed attributes; never raises, unknown names ignored."""
    get = attrs.get
    sender = normalize_address(get("sender", ""))
    recipient = normalize_address(get("recipient", ""))
    sasl_username = get("sasl_username", "").strip().lower()
    sender_domain = domain_of(sender)
    # Hot path (once per request): the login is usually the sender address itself, whose
    # domain is already normalised, and the fields go in positionally (a frozen dataclass'
    # keyword __init__ costs a microsecond more). Same values as domain_of() on each.
    return PolicyRequest(
        get("request", ""),  # request
        get("protocol_state", "").upper(),  # protocol_state
        sender,
        sender_domain,
        recipient,
        domain_of(recipient) if recipient else "",  # recipient_domain
        parse_count(get("recipient_count", "")),  # recipient_count
        parse_count(get("size", "")),  # size
        sasl_username,
        sender_domain if sasl_username == sender else domain_of(sasl_username),  # sasl_domain
        get("client_address", ""),  # client_address
        get("instance", ""),  # instance
        get("queue_id", ""),  # queue_id
    )


def normalize_address(value: str) -> str:
    """Lowercase an address, drop enclosing <>; the null sender ``<>`` becomes ''."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value.lower()


def domain_of(address: str) -> str:
    """The normalised domain after the last '@' of an address, or '' without one."""
    at = address.rfind("@")
    return fold_domain(address[at + 1:]) if at >= 0 else ""


def fold_domain(name: str) -> str:
    """A domain as a request names it, folded as hosted names are stored (lowercase, no
    trailing dots, IDNA A-labels); never refused: one IDNA fails on is left as is, and then
    matches no hosted domain. (policyd.names.normalize_domain is the strict twin that
    validates what the API stores.)"""
    name = name.strip().rstrip(".").lower()
    return name if name.isascii() else _to_a_label(name)


# The other dots IDNA (RFC 3490 §3.1) treats as label separators.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def _to_a_label(name: str) -> str:
    # The same IDNA 2008 conversion as policyd.names, so stored and requested names agree.
    name = name.translate(_IDNA_DOTS).rstrip(".")
    try:
        return to_a_labels(name)
    except (IDNAError, UnicodeError):
        return name  # matches no hosted domain (those are stored as A-labels)


def parse_count(value: str) -> int:
    """A non-negative decimal attribute (recipient_count, size); garbage or missing gives 0."""
    # isascii(): int() would accept other scripts' digits; 18 digits: cheap, fits int64.
    if value.isdigit() and value.isascii() and len(value) <= 18:
        return int(value)
    return 0
