"""SNS envelope parsing, signature verification, cert fetching, confirmation and SES parsing."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.sns import (
    SnsError,
    SnsVerifier,
    allowed_url,
    parse_envelope,
    string_to_sign,
)
from tests.snsfake import (
    CERT_PEM,
    TOPIC_ARN,
    CertServer,
    encode,
    make_message,
    new_identity,
)

VerifierFactory = Callable[..., SnsVerifier]
AWS_CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
AWS_PATTERN = "sns.*.amazonaws.com".split(".")  # the default cert_host_pattern, by label
HTTPS = ("https",)


@pytest.fixture
async def make_verifier() -> AsyncIterator[VerifierFactory]:
    made: list[SnsVerifier] = []

    def factory(**kwargs: Any) -> SnsVerifier:
        kwargs.setdefault("cert_host_pattern", "127.0.0.1:*")
        kwargs.setdefault("insecure_http_certs", True)
        kwargs.setdefault("allowed_topic_arns", ("*",))
        verifier = SnsVerifier(**kwargs)
        made.append(verifier)
        return verifier

    yield factory
    for verifier in made:
        await verifier.close()


def _at(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def cert_url(server: CertServer, path: str = "/cert.pem") -> str:
    return server.base_url + path


def signed(server: CertServer, path: str = "/cert.pem", **kwargs: Any) -> dict[str, Any]:
    """A signed Notification whose certificate is served by server."""
    kwargs.setdefault("message", "m")
    return make_message(cert_url=cert_url(server, path), **kwargs)


async def reason_of(awaitable: Any) -> str:
    with pytest.raises(SnsError) as info:
        await awaitable
    return info.value.reason


# --- string to sign -------------------------------------------------------------------------


def test_string_to_sign_notification_with_and_without_subject() -> None:
    msg = {
        "Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:t", "Message": "a\nb",
        "Timestamp": "2024-01-02T03:04:05.678Z", "Signature": "x", "UnsubscribeURL": "u",
    }
    assert string_to_sign(msg) == (
        b"Message\na\nb\nMessageId\nm-1\nTimestamp\n2024-01-02T03:04:05.678Z\n"
        b"TopicArn\narn:t\nType\nNotification\n"
    )
    msg["Subject"] = "Hi"
    expected_prefix = b"Message\na\nb\nMessageId\nm-1\nSubject\nHi\nTimestamp\n"
    assert string_to_sign(msg).startswith(expected_prefix)


@pytest.mark.parametrize("type_", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
def test_string_to_sign_subscription_order(type_: str) -> None:
    msg = {
        "Type": type_, "MessageId": "m", "TopicArn": "t", "Message": "x", "Timestamp": "ts",
        "Token": "tok", "SubscribeURL": "https://s/", "Subject": "ignored",
    }
    assert string_to_sign(msg) == (
        b"Message\nx\nMessageId\nm\nSubscribeURL\nhttps://s/\nTimestamp\nts\n"
        b"Token\ntok\nTopicArn\nt\nType\n" + type_.encode() + b"\n"
    )


def test_string_to_sign_rejects_missing_field() -> None:
    with pytest.raises(SnsError) as info:
        string_to_sign({"Type": "Notification", "Message": "x"})
    assert info.value.reason == "bad_envelope"


# --- parse_envelope -------------------------------------------------------------------------


def test_parse_envelope_round_trips_a_signed_message() -> None:
    msg = make_message(message={"a": 1}, cert_url=AWS_CERT_URL, subject="S")
    assert parse_envelope(encode(msg)) == msg


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'"Notification"',
        b"[" * 100_000,
        b'{"Type": "Bogus"}',
        b'{"Type": ["Notification"]}',
    ],
)
def test_parse_envelope_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(SnsError) as info:
        parse_envelope(body)
    assert info.value.reason == "bad_envelope"


@pytest.mark.parametrize(
    ("type_", "drop", "reason"),
    [
        ("Notification", "Message", "bad_envelope"),
        ("Notification", "TopicArn", "bad_envelope"),
        ("SubscriptionConfirmation", "Token", "bad_envelope"),
        ("SubscriptionConfirmation", "SubscribeURL", "bad_envelope"),
        ("Notification", "Signature", "unsigned"),
        ("Notification", "SigningCertURL", "unsigned"),
        ("UnsubscribeConfirmation", "SignatureVersion", "unsigned"),
    ],
)
def test_parse_envelope_requires_keys_per_type(type_: str, drop: str, reason: str) -> None:
    msg = make_message(type_, message="m", cert_url=AWS_CERT_URL)
    del msg[drop]
    with pytest.raises(SnsError) as info:
        parse_envelope(encode(msg))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("key", "value"), [("MessageId", 7), ("Subject", ["x"]), ("Message", None)]
)
def test_parse_envelope_rejects_wrong_types(key: str, value: object) -> None:
    msg = make_message(message="m", cert_url=AWS_CERT_URL)
    msg[key] = value
    with pytest.raises(SnsError) as info:
        parse_envelope(encode(msg))
    assert info.value.reason == "bad_envelope"


def _parse_outcome(body: bytes) -> str:
    try:
        parse_envelope(body)
    except SnsError as exc:
        return exc.reason
    return "ok"


@given(st.binary(max_size=512))
def test_parse_envelope_only_raises_sns_error_on_any_bytes(body: bytes) -> None:
    assert _parse_outcome(body) in {"ok", "bad_envelope", "unsigned"}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
_envelope_keys = st.sampled_from(
    ["Type", "MessageId", "TopicArn", "Timestamp", "Message", "Subject", "Token", "SubscribeURL",
     "SignatureVersion", "Signature", "SigningCertURL"]
)
_type_values = st.sampled_from(["Notification", "SubscriptionConfirmation"])


@given(st.dictionaries(_envelope_keys, _json_values | _type_values))
def test_parse_envelope_only_raises_sns_error_on_any_object(obj: dict[str, Any]) -> None:
    outcome = _parse_outcome(json.dumps(obj).encode())
    assert outcome in {"ok", "bad_envelope", "unsigned"}
    if outcome == "ok":
        assert isinstance(string_to_sign(obj), bytes)


# --- signatures -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
async def test_verify_accepts_both_signature_versions(
    cert_server: CertServer, make_verifier: VerifierFactory, version: str,
) -> None:
    msg = parse_envelope(encode(signed(cert_server, version=version)))
    await make_verifier().verify(msg)
    assert cert_server.cert_hits == 1


@pytest.mark.parametrize("type_", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
async def test_verify_accepts_subscription_types(
    cert_server: CertServer, make_verifier: VerifierFactory, type_: str,
) -> None:
    msg = make_message(type_, message="join", cert_url=cert_url(cert_server), version="2")
    await make_verifier().verify(msg)
    assert cert_server.cert_hits == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Message", '{"notificationType": "Delivery"}'),
        ("Subject", "Changed"),
        ("Timestamp", _at(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))),
        ("MessageId", "other-id"),
        ("TopicArn", "arn:aws:sns:us-east-1:123456789012:other"),
    ],
)
async def test_verify_rejects_tampered_fields(
    cert_server: CertServer, make_verifier: VerifierFactory, key: str, value: object,
) -> None:
    msg = make_message(message="original", subject="Subject", cert_url=cert_url(cert_server))
    msg[key] = value
    assert await reason_of(make_verifier().verify(msg)) == "bad_signature"


async def test_verify_rejects_added_or_removed_subject(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier()
    added = signed(cert_server)
    added["Subject"] = "injected"
    removed = make_message(message="m", subject="signed", cert_url=cert_url(cert_server))
    del removed["Subject"]
    assert await reason_of(verifier.verify(added)) == "bad_signature"
    assert await reason_of(verifier.verify(removed)) == "bad_signature"


async def test_verify_rejects_signature_from_another_key(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    other = new_identity()
    assert other.cert_pem != CERT_PEM
    msg = signed(cert_server, identity=other)
    assert await reason_of(make_verifier().verify(msg)) == "bad_signature"


async def test_verify_rejects_version_swap(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    msg = signed(cert_server, version="1")
    msg["SignatureVersion"] = "2"
    assert await reason_of(make_verifier().verify(msg)) == "bad_signature"


@pytest.mark.parametrize("version", ["3", "0", "", 1, None])
async def test_verify_rejects_unknown_signature_version_without_fetching(
    cert_server: CertServer, make_verifier: VerifierFactory, version: object,
) -> None:
    msg = signed(cert_server)
    msg["SignatureVersion"] = version
    assert await reason_of(make_verifier().verify(msg)) == "signature_version"
    assert cert_server.cert_hits == 0


@pytest.mark.parametrize(
    ("signature", "reason"), [("", "unsigned"), ("not*base64!", "bad_signature")]
)
async def test_verify_rejects_bad_signature_encoding(
    cert_server: CertServer, make_verifier: VerifierFactory, signature: str, reason: str,
) -> None:
    msg = signed(cert_server)
    msg["Signature"] = signature
    assert await reason_of(make_verifier().verify(msg)) == reason


async def test_verify_rejects_missing_cert_url(make_verifier: VerifierFactory) -> None:
    msg = make_message(message="m", cert_url=AWS_CERT_URL)
    del msg["SigningCertURL"]
    assert await reason_of(make_verifier().verify(msg)) == "unsigned"


# --- URL rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        AWS_CERT_URL,
        "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
    ],
)
def test_allowed_url_accepts_sns_hosts(url: str) -> None:
    assert allowed_url(url, AWS_PATTERN, HTTPS).path.endswith(".pem")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://sns.us-east-1.amazonaws.com/x.pem", "cert_scheme"),
        ("ftp://sns.us-east-1.amazonaws.com/x.pem", "cert_scheme"),
        ("sns.us-east-1.amazonaws.com/x.pem", "cert_scheme"),
        ("https://evil.com/x.pem", "cert_host"),
        ("https://sns.us-east-1.amazonaws.com.evil.com/x.pem", "cert_host"),
        ("https://sns.evil.s3.amazonaws.com/x.pem", "cert_host"),
        ("https://sns..amazonaws.com/x.pem", "cert_host"),
        ("https://sns.us-east-1.amazonaws.com./x.pem", "cert_host"),
        ("https://sns.us-east-1.amazonaws.com@evil.com/x.pem", "cert_host"),
        ("https://evil.com@sns.us-east-1.amazonaws.com/x.pem", "cert_host"),
        ("https://u:p@sns.us-east-1.amazonaws.com/x.pem", "cert_host"),
        ("https://evil.com#@sns.us-east-1.amazonaws.com/", "cert_host"),
        ("https://evil.com\\@sns.us-east-1.amazonaws.com/", "cert_host"),
        ("https://sns.us-east-1.amazonaws.com%2eevil.com/", "cert_host"),
        ("https://sns.us-east-1.amazonaws.com:8443/x.pem", "cert_host"),
        ("https://[::1]/x.pem", "cert_host"),
        ("https:///x.pem", "cert_host"),
        ("", "cert_scheme"),
    ],
)
def test_allowed_url_rejects(url: str, reason: str) -> None:
    with pytest.raises(SnsError) as info:
        allowed_url(url, AWS_PATTERN, HTTPS)
    assert info.value.reason == reason


def test_insecure_flag_allows_http_and_keeps_https() -> None:
    schemes = ("https", "http")  # what insecure_http_certs = true gives
    allowed_url("http://sns.us-east-1.amazonaws.com/x.pem", AWS_PATTERN, schemes)
    allowed_url(AWS_CERT_URL, AWS_PATTERN, schemes)
    with pytest.raises(SnsError) as info:
        allowed_url("ftp://sns.us-east-1.amazonaws.com/x.pem", AWS_PATTERN, schemes)
    assert info.value.reason == "cert_scheme"


async def test_verify_requires_https_without_insecure_flag(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    msg = signed(cert_server)
    verifier = make_verifier(insecure_http_certs=False)
    assert await reason_of(verifier.verify(msg)) == "cert_scheme"
    assert cert_server.cert_hits == 0


async def test_verify_rejects_cert_host_mismatch_without_fetching(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    msg = signed(cert_server)
    verifier = make_verifier(cert_host_pattern="sns.*.amazonaws.com")
    assert await reason_of(verifier.verify(msg)) == "cert_host"
    assert cert_server.cert_hits == 0


# --- topics ---------------------------------------------------------------------------------


async def test_topic_allow_list(cert_server: CertServer, make_verifier: VerifierFactory) -> None:
    verifier = make_verifier(allowed_topic_arns=(TOPIC_ARN,))
    await verifier.verify(signed(cert_server))
    other = signed(cert_server, topic_arn=TOPIC_ARN + "-other")
    assert await reason_of(verifier.verify(other)) == "topic_not_allowed"
    assert cert_server.cert_hits == 1


async def test_star_allows_any_topic(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    msg = signed(cert_server, topic_arn="arn:aws:sns:eu-west-1:1:anything")
    await make_verifier(allowed_topic_arns=("*",)).verify(msg)
    assert cert_server.cert_hits == 1


async def test_empty_allow_list_allows_no_topic(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier(allowed_topic_arns=())
    assert await reason_of(verifier.verify(signed(cert_server))) == "topic_not_allowed"
    sub = subscription(cert_server)
    assert await reason_of(verifier.verify(sub)) == "topic_not_allowed"
    assert await reason_of(verifier.confirm_subscription(sub)) == "topic_not_allowed"
    assert cert_server.cert_hits == 0 and cert_server.confirm_hits == []


# --- timestamps: fresh, and never older than the MessageId memory -------------------------


@pytest.mark.parametrize(("offset", "ok"), [
    (dt.timedelta(0), True),
    (dt.timedelta(minutes=4, seconds=59), True),  # clock skew ahead
    (dt.timedelta(minutes=5, seconds=1), False),
    (-dt.timedelta(days=13, hours=23), True),  # SNS retries for hours, not weeks
    (-dt.timedelta(days=14, seconds=1), False),  # its MessageId may be forgotten: a replay
])
async def test_timestamp_window(cert_server: CertServer, make_verifier: VerifierFactory,
                                offset: dt.timedelta, ok: bool) -> None:
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc)
    verifier = make_verifier(wall_clock=lambda: now)
    msg = signed(cert_server, timestamp=_at(now + offset))
    if ok:
        await verifier.verify(msg)
    else:
        assert await reason_of(verifier.verify(msg)) == "bad_timestamp"


@pytest.mark.parametrize("value", ["yesterday", "", "2026-13-40T00:00:00Z"])
async def test_timestamp_must_parse(cert_server: CertServer, make_verifier: VerifierFactory,
                                    value: str) -> None:
    msg = signed(cert_server, timestamp=value)
    assert await reason_of(make_verifier().verify(msg)) == "bad_timestamp"
    assert cert_server.cert_hits == 0  # refused before any certificate is fetched


# --- certificate fetching and caching ------------------------------------------------------


async def test_cert_is_cached_across_verifies(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier()
    for version in ("1", "2", "1"):
        await verifier.verify(signed(cert_server, version=version))
    assert cert_server.cert_hits == 1


async def test_cert_cache_expires_after_ttl(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    now = [1000.0]
    verifier = make_verifier(cert_ttl=60.0, clock=lambda: now[0])
    msg = signed(cert_server)
    await verifier.verify(msg)
    now[0] += 59.0
    await verifier.verify(msg)
    assert cert_server.cert_hits == 1
    now[0] += 2.0
    await verifier.verify(msg)
    assert cert_server.cert_hits == 2


async def test_concurrent_verifies_share_one_fetch(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier(cert_ttl=0.0)  # nothing stays cached: only in-flight sharing helps
    msgs = [make_message(message=str(i), cert_url=cert_url(cert_server)) for i in range(5)]
    await asyncio.gather(*(verifier.verify(msg) for msg in msgs))
    assert cert_server.cert_hits == 1
    await verifier.verify(msgs[0])
    assert cert_server.cert_hits == 2


@pytest.mark.parametrize("path", ["/missing.pem", "/big.pem", "/redirect.pem"])
async def test_cert_fetch_failures(
    cert_server: CertServer, make_verifier: VerifierFactory, path: str,
) -> None:
    msg = make_message(message="m", cert_url=cert_url(cert_server, path))
    assert await reason_of(make_verifier().verify(msg)) == "cert_fetch"
    assert cert_server.cert_hits == 0  # the redirect was not followed


async def test_cert_fetch_connection_refused(make_verifier: VerifierFactory) -> None:
    server = CertServer()
    await server.start()
    url = cert_url(server)
    await server.stop()
    msg = make_message(message="m", cert_url=url)
    assert await reason_of(make_verifier().verify(msg)) == "cert_fetch"


async def test_bad_cert_is_rejected_and_not_cached(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier()
    msg = signed(cert_server)
    cert_server.cert_pem = b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    assert await reason_of(verifier.verify(msg)) == "bad_cert"
    cert_server.cert_pem = CERT_PEM
    await verifier.verify(msg)
    assert cert_server.cert_hits == 2


async def test_session_factory_is_used_once_and_closed(cert_server: CertServer) -> None:
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession())
        return sessions[-1]

    verifier = SnsVerifier(
        cert_host_pattern="127.0.0.1:*",
        insecure_http_certs=True,
        session_factory=factory,
        cert_ttl=0.0,
        allowed_topic_arns=(TOPIC_ARN,),
    )
    for _ in range(2):
        await verifier.verify(signed(cert_server))
    await verifier.close()
    await verifier.close()
    assert len(sessions) == 1
    assert sessions[0].closed
    assert cert_server.cert_hits == 2


# --- subscription confirmation --------------------------------------------------------------


def subscription(server: CertServer, **kwargs: Any) -> dict[str, Any]:
    url = server.base_url + "/confirm?Action=ConfirmSubscription&Token=tok123"
    kwargs.setdefault("subscribe_url", url)
    return make_message(
        "SubscriptionConfirmation", message="confirm", cert_url=cert_url(server), **kwargs
    )


async def test_confirm_subscription_gets_subscribe_url(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier(allowed_topic_arns=(TOPIC_ARN,))
    msg = subscription(cert_server)
    await verifier.verify(msg)
    await verifier.confirm_subscription(msg)
    assert cert_server.confirm_hits == [{"Action": "ConfirmSubscription", "Token": "tok123"}]


async def test_confirm_subscription_non_2xx_fails(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    cert_server.confirm_status = 403
    reason = await reason_of(make_verifier().confirm_subscription(subscription(cert_server)))
    assert reason == "confirm_failed"
    assert len(cert_server.confirm_hits) == 1


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"subscribe_url": "https://evil.com/confirm?Token=x"}, "cert_host"),
        ({"topic_arn": "arn:aws:sns:us-east-1:1:other"}, "topic_not_allowed"),
    ],
)
async def test_confirm_subscription_checks_before_get(
    cert_server: CertServer, make_verifier: VerifierFactory, kwargs: dict[str, Any], reason: str,
) -> None:
    verifier = make_verifier(allowed_topic_arns=(TOPIC_ARN,))
    msg = subscription(cert_server, **kwargs)
    assert await reason_of(verifier.confirm_subscription(msg)) == reason
    assert cert_server.confirm_hits == []


async def test_confirm_subscription_requires_https_without_insecure_flag(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    verifier = make_verifier(insecure_http_certs=False)
    msg = subscription(cert_server)
    assert await reason_of(verifier.confirm_subscription(msg)) == "cert_scheme"
    assert cert_server.confirm_hits == []


async def test_confirm_subscription_rejects_notifications(
    cert_server: CertServer, make_verifier: VerifierFactory,
) -> None:
    msg = signed(cert_server)
    assert await reason_of(make_verifier().confirm_subscription(msg)) == "bad_envelope"
