"""The Postfix policy wire format: parsing lines and requests, replies, normalisation."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.names import InvalidName
from policyd.names import normalize_domain as api_normalize_domain
from policyd.protocol import (
    MAX_ATTRS,
    MAX_LINE,
    PolicyRequest,
    ProtocolError,
    format_reply,
    fold_domain,
    parse_line,
    parse_request,
    to_request,
)
from tests.protocol_oracle import RequestBuilder


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"request=smtpd_access_policy\n", ("request", "smtpd_access_policy")),
        (b"ccert_subject=CN=mx,O=Example\n", ("ccert_subject", "CN=mx,O=Example")),
        (b"a==\n", ("a", "=")),
        (b"sender=\n", ("sender", "")),
        (b"size=1000\r\n", ("size", "1000")),
        (b"size=1000", ("size", "1000")),
        (b"a=b\r\r\n", ("a", "b\r")),
        (b"x_unknown=whatever\n", ("x_unknown", "whatever")),
        (b"sender=j\xc3\xb6rg@b\xc3\xbccher.example\n", ("sender", "jörg@bücher.example")),
        (b"\n", None),
        (b"\r\n", None),
        (b"", None),
    ],
    ids=["plain", "value-with-equals", "value-is-equals", "empty-value", "crlf", "no-newline",
         "one-cr-stripped", "unknown-attr", "utf8", "end-lf", "end-crlf", "end-eof"],
)
def test_parse_line(line: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"garbage\n", "no '='"),
        (b"garbage", "no '='"),
        (b"=value\n", "empty attribute name"),
        (b"sender=\xff\xfe\n", "not UTF-8"),
        (b"sender=j\xf6rg@example.com\n", "not UTF-8"),  # Latin-1
        (b"sender=\xc3\n", "not UTF-8"),  # truncated sequence
        (b"a=" + b"x" * MAX_LINE + b"\n", "line over"),
    ],
    ids=["no-equals", "no-equals-eof", "empty-name", "invalid-bytes", "latin1", "truncated",
         "oversize"],
)
def test_parse_line_rejects(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_line(line)


def test_parse_line_accepts_exactly_max_line() -> None:
    line = b"a=" + b"x" * (MAX_LINE - 2)
    assert parse_line(line + b"\r\n") == ("a", "x" * (MAX_LINE - 2))


@given(st.binary(max_size=300))
def test_parse_line_raises_only_protocol_error(data: bytes) -> None:
    try:
        result = parse_line(data)
    except ProtocolError:
        return
    assert result is None or (result[0] and "=" not in result[0])


_NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=\r\n"),
                min_size=1, max_size=20)
_VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                 max_size=40)


@given(_NAME, _VALUE)
def test_parse_line_round_trips(name: str, value: str) -> None:
    assert parse_line(f"{name}={value}\n".encode()) == (name, value)


def test_parse_request_keeps_the_last_of_a_repeated_attribute() -> None:
    data = b"request=smtpd_access_policy\nprotocol_state=RCPT\nx_future=1\nsize=1\nsize=2\n\n"
    assert parse_request(data) == {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                   "x_future": "1", "size": "2"}
    assert parse_request(b"\n") == {}  # a stray empty line: a request with no rule


def test_parse_request_attribute_cap() -> None:
    lines = b"".join(f"a{i}=v\n".encode() for i in range(MAX_ATTRS))
    assert len(parse_request(lines + b"\n")) == MAX_ATTRS
    with pytest.raises(ProtocolError, match="attributes"):
        parse_request(lines + b"one_too_many=v\n\n")


def test_parse_request_refuses_a_malformed_line() -> None:
    with pytest.raises(ProtocolError, match="no '='"):
        parse_request(b"request=smtpd_access_policy\ngarbage\n\n")


@given(st.lists(st.binary(max_size=80), max_size=20))
def test_parse_request_raises_only_protocol_error(lines: list[bytes]) -> None:
    data = b"\n".join(line.replace(b"\n", b"") for line in lines) + b"\n\n"
    try:
        assert isinstance(parse_request(data), dict)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("DUNNO", b"action=DUNNO\n\n"),
        ("REJECT 5.7.1 Sender domain example.com is not hosted here",
         b"action=REJECT 5.7.1 Sender domain example.com is not hosted here\n\n"),
        ("DEFER 4.7.1 a\r\nb", b"action=DEFER 4.7.1 a  b\n\n"),
        ("WARN x\ny\rz", b"action=WARN x y z\n\n"),
        ("HOLD D\xf6main", "action=HOLD D\xf6main\n\n".encode()),
    ],
    ids=["dunno", "reject", "crlf", "lf-and-cr", "utf8"],
)
def test_format_reply(action: str, expected: bytes) -> None:
    reply = format_reply(action)
    assert reply == expected
    assert reply.count(b"\n") == 2


@pytest.mark.parametrize("action", ["", "   ", "\r\n"])
def test_format_reply_refuses_empty_action(action: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        format_reply(action)


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"sender": "<>"}, {"sender": "", "sender_domain": ""}),
        ({"sender": ""}, {"sender": "", "sender_domain": ""}),
        ({}, {"sender": "", "request": "", "protocol_state": "", "recipient_count": 0}),
        ({"sender": "User@Example.COM"}, {"sender": "user@example.com",
                                          "sender_domain": "example.com"}),
        ({"sender": "<a@example.com>"}, {"sender": "a@example.com",
                                         "sender_domain": "example.com"}),
        ({"sender": "a@Example.com."}, {"sender_domain": "example.com"}),
        ({"sender": "a@bücher.example"}, {"sender_domain": "xn--bcher-kva.example"}),
        ({"sender": "a@BÜCHER.Example."}, {"sender_domain": "xn--bcher-kva.example"}),
        ({"sender": "a@bücher.example\u3002"}, {"sender_domain": "xn--bcher-kva.example"}),
        ({"sender": "a@bücher\uff0eexample"}, {"sender_domain": "xn--bcher-kva.example"}),
        ({"sender": "a@xn--bcher-kva.example"}, {"sender_domain": "xn--bcher-kva.example"}),
        ({"sender": "a@" + "ü" * 70 + ".example"}, {"sender_domain": "ü" * 70 + ".example"}),
        ({"sender": "a@ü..example"}, {"sender_domain": "ü..example"}),
        ({"sender": "\"a@b\"@c.example"}, {"sender_domain": "c.example"}),
        ({"sender": "postmaster"}, {"sender": "postmaster", "sender_domain": ""}),
        ({"recipient": "B@Dest.ORG"}, {"recipient": "b@dest.org", "recipient_domain": "dest.org"}),
        ({"recipient_count": "3", "size": "12345"}, {"recipient_count": 3, "size": 12345}),
        ({"recipient_count": "abc"}, {"recipient_count": 0}),
        ({"recipient_count": "-1"}, {"recipient_count": 0}),
        ({"recipient_count": " 2"}, {"recipient_count": 0}),
        ({"recipient_count": "\u0663"}, {"recipient_count": 0}),  # Arabic-Indic 3
        ({"recipient_count": "9" * 5000}, {"recipient_count": 0}),
        ({"size": "1.5"}, {"size": 0}),
        ({"sasl_username": "Alice@Example.COM"}, {"sasl_username": "alice@example.com",
                                                  "sasl_domain": "example.com"}),
        ({"sasl_username": "Alice"}, {"sasl_username": "alice", "sasl_domain": ""}),
        ({"protocol_state": "end-of-message"}, {"protocol_state": "END-OF-MESSAGE"}),
        ({"request": "junk"}, {"request": "junk"}),
        ({"client_address": "2001:db8::1", "instance": "a1.b2", "queue_id": "4Xyz"},
         {"client_address": "2001:db8::1", "instance": "a1.b2", "queue_id": "4Xyz"}),
        ({"x_unknown": "1", "sender": "a@b.example"}, {"sender_domain": "b.example"}),
    ],
    ids=["null-sender", "empty-sender", "nothing", "uppercase", "angle-brackets",
         "trailing-dot", "idn", "idn-uppercase-dot", "idn-ideographic-trailing-dot",
         "idn-fullwidth-dot", "a-label-kept", "idn-too-long-kept",
         "idn-empty-label-kept", "last-at", "no-domain", "recipient", "counts",
         "count-garbage", "count-negative", "count-space", "count-non-ascii-digit",
         "count-huge", "size-float", "sasl", "sasl-no-domain", "state-upper", "other-request",
         "passthrough", "unknown-ignored"],
)
def test_to_request(attrs: dict[str, str], expected: dict[str, object]) -> None:
    req = to_request(attrs)
    assert {name: getattr(req, name) for name in expected} == expected


def test_to_request_full_postfix_request() -> None:
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "192.0.2.7", "client_name": "mx.example.net", "helo_name": "mx",
        "sender": "Bob@Example.com", "recipient": "carol@dest.org", "recipient_count": "0",
        "queue_id": "", "instance": "123.456.7", "size": "2048", "sasl_method": "plain",
        "sasl_username": "bob@example.com", "ccert_subject": "CN=a=b",
    }
    assert to_request(attrs) == PolicyRequest(
        request="smtpd_access_policy", protocol_state="RCPT", sender="bob@example.com",
        sender_domain="example.com", recipient="carol@dest.org", recipient_domain="dest.org",
        recipient_count=0, size=2048, sasl_username="bob@example.com",
        sasl_domain="example.com", client_address="192.0.2.7", instance="123.456.7",
        queue_id="",
    )


@given(st.dictionaries(st.sampled_from(["sender", "recipient", "sasl_username", "size",
                                        "recipient_count", "protocol_state", "request"]),
                       st.text(max_size=80)))
def test_to_request_never_raises(attrs: dict[str, str]) -> None:
    req = to_request(attrs)
    assert req.recipient_count >= 0 and req.size >= 0
    assert not req.sender_domain.endswith(".")
    assert "@" not in req.sender_domain


@given(st.text(max_size=40))
def test_fold_domain_agrees_with_the_api(raw: str) -> None:
    """Wherever the API accepts a name, the policy side normalises it to the same form."""
    try:
        stored = api_normalize_domain(raw)
    except InvalidName:
        return
    assert fold_domain(raw) == stored


@pytest.mark.parametrize("raw", ["Bücher.Example.", "EXAMPLE.com", "ex-ample.co.uk",
                                 "straße.de", "例え.jp"])
def test_fold_domain_agrees_with_the_api_examples(raw: str) -> None:
    assert fold_domain(raw) == api_normalize_domain(raw)


# --- the request parser of the server agrees with the line parser ------------------------

@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b
                                              and b.rstrip(b"\r") != b""), max_size=12))
def test_parse_request_agrees_with_the_line_parser(lines: list[bytes]) -> None:
    data = b"".join(line + b"\n" for line in lines) + b"\n"
    builder = RequestBuilder()
    try:
        expected: dict[str, str] | None = None
        for line in lines:
            assert builder.add(line + b"\n") is None
        expected = builder.add(b"\n")
    except ProtocolError:
        with pytest.raises(ProtocolError):
            parse_request(data)
        return
    assert parse_request(data) == expected


def test_parse_request_long_lines_and_crlf() -> None:
    assert parse_request(b"a=b\r\nc=d=e\r\n\n") == {"a": "b", "c": "d=e"}
    assert parse_request(b"a=" + b"x" * 65530 + b"\r\nb=1\r\n\n")["b"] == "1"
    with pytest.raises(ProtocolError, match="line over"):
        parse_request(b"a=" + b"x" * 65540 + b"\n\n")
    with pytest.raises(ProtocolError, match="UTF-8"):
        parse_request(b"a=" + b"x" * 65530 + b"\nb=\xff\n\n")
