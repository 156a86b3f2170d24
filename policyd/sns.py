"""Amazon SNS HTTP(S) notification verification and SES bounce/complaint parsing.

Pure of storage: nothing here touches the database. The webhook handler (api/webhooks.py)
parses the body with `parse_envelope`, calls `SnsVerifier.verify`, then either
`confirm_subscription` or policyd.feedback's `mail_events`. AWS reference:
https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from policyd.timeutil import parse_iso, utcnow

log = logging.getLogger(__name__)

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"

# AWS's fixed (alphabetical) field order for the string to sign; Subject only when present.
_SUBSCRIPTION_FIELDS = (
    "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
)
_SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: _SUBSCRIPTION_FIELDS,
    UNSUBSCRIBE_CONFIRMATION: _SUBSCRIPTION_FIELDS,
}
_ENVELOPE_KEYS = ("Type", "MessageId", "TopicArn", "Timestamp", "Message")
_SUBSCRIPTION_KEYS = ("Token", "SubscribeURL")
_SIGNING_KEYS = ("SignatureVersion", "Signature", "SigningCertURL")

# SignatureVersion 1 = SHA1withRSA, 2 = SHA256withRSA (both PKCS#1 v1.5).
_SIGNATURE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}

HTTP_TIMEOUT = 5.0
# How long MessageIds are remembered (counted once); older messages are refused (SPEC §8).
MESSAGE_ID_MEMORY = timedelta(days=14)
MAX_CLOCK_SKEW = timedelta(minutes=5)  # how far in the future a Timestamp may be
CERT_MAX_BYTES = 64 * 1024
CERT_CACHE_MAX = 32
_HOST_RE = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


class SnsError(Exception):
    """An SNS message failed parsing or verification; `reason` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_envelope(body: bytes) -> dict[str, Any]:
    """Parse and shape-check an SNS HTTP POST body; raise SnsError if malformed."""
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise SnsError("bad_envelope", "body is not JSON") from exc
    if not isinstance(msg, dict):
        raise SnsError("bad_envelope", "body is not a JSON object")
    msg_type = msg.get("Type")
    if not isinstance(msg_type, str) or msg_type not in _SIGNED_FIELDS:
        raise SnsError("bad_envelope", "unknown Type")
    required: tuple[str, ...] = _ENVELOPE_KEYS
    if msg_type != NOTIFICATION:
        required += _SUBSCRIPTION_KEYS
    _require_strings(msg, required, "bad_envelope")
    _require_strings(msg, _SIGNING_KEYS, "unsigned")
    subject = msg.get("Subject")
    if subject is not None and not isinstance(subject, str):
        raise SnsError("bad_envelope", "Subject is not a string")
    return msg


def _require_strings(msg: dict[str, Any], keys: tuple[str, ...], reason: str) -> None:
    """Raise SnsError(reason) unless every key holds a non-empty string."""
    for key in keys:
        value = msg.get(key)
        if not isinstance(value, str) or not value:
            raise SnsError(reason, f"{key} missing or not a non-empty string")


def string_to_sign(msg: dict[str, Any]) -> bytes:
    """Build AWS's canonical "Key\\nValue\\n" string that SNS signed for this message."""
    msg_type = msg.get("Type")
    fields = _SIGNED_FIELDS.get(msg_type) if isinstance(msg_type, str) else None
    if fields is None:
        raise SnsError("bad_envelope", "unknown Type")
    parts = []
    for key in fields:
        value = msg.get(key)
        if key == "Subject" and value is None:
            continue
        if not isinstance(value, str):
            raise SnsError("bad_envelope", f"{key} missing or not a string")
        parts.append(f"{key}\n{value}\n")
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON "\ud800" escapes
        raise SnsError("bad_envelope", "field is not valid Unicode") from exc


def _decode_signature(value: object) -> bytes:
    """Decode the base64 Signature field strictly."""
    if not isinstance(value, str) or not value:
        raise SnsError("unsigned", "no Signature")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnsError("bad_signature", "Signature is not base64") from exc


def _signature_hash(value: object) -> hashes.HashAlgorithm:
    """Map SignatureVersion to its hash algorithm; anything else is rejected."""
    algorithm = _SIGNATURE_HASHES.get(value) if isinstance(value, str) else None
    if algorithm is None:
        raise SnsError("signature_version", f"unsupported SignatureVersion {value!r}")
    return algorithm()


def _rsa_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """Extract the RSA public key from a PEM X.509 certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        key = cert.public_key()
    except ValueError as exc:
        raise SnsError("bad_cert", "not a PEM X.509 certificate") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise SnsError("bad_cert", "certificate key is not RSA")
    return key


def allowed_url(raw: object, pattern_labels: list[str], schemes: tuple[str, ...]) -> URL:
    """raw parsed once (the same object is fetched), if its scheme and host are allowed (the
    rule for the SigningCertURL and the SubscribeURL); else SnsError."""
    if not isinstance(raw, str):
        raise SnsError("cert_host", "URL is not a string")
    try:
        url = URL(raw)
    except (ValueError, TypeError) as exc:
        raise SnsError("cert_host", "unparsable URL") from exc
    if url.scheme not in schemes:
        raise SnsError("cert_scheme", f"scheme {url.scheme!r} not allowed")
    if url.user is not None or url.password is not None:
        raise SnsError("cert_host", "userinfo not allowed in URL")
    host = (url.raw_host or "").lower()
    if not _HOST_RE.fullmatch(host):
        raise SnsError("cert_host", f"bad host {host!r}")
    # An explicit port must be matched by the pattern too ("127.0.0.1:*" in tests).
    target = host if url.explicit_port is None else f"{host}:{url.explicit_port}"
    if not _host_matches(target, pattern_labels):
        raise SnsError("cert_host", f"host {target!r} does not match the pattern")
    return url


def _host_matches(host: str, pattern_labels: list[str]) -> bool:
    """Glob-match label by label, so '*' never spans a dot (blocks sns.evil.s3.amazonaws.com)."""
    labels = host.split(".")
    return len(labels) == len(pattern_labels) and all(
        label and fnmatch.fnmatchcase(label, pattern)
        for label, pattern in zip(labels, pattern_labels)
    )


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a response body, refusing anything larger than limit bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise SnsError("cert_fetch", "certificate too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise SnsError("cert_fetch", "certificate too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _default_session() -> aiohttp.ClientSession:
    """Create the HTTP client session used when no factory is given."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))


class SnsVerifier:
    """Verifies SNS signatures against certificates fetched (and cached) from allowed hosts."""

    def __init__(
        self,
        *,
        cert_host_pattern: str = "sns.*.amazonaws.com",
        insecure_http_certs: bool = False,
        allowed_topic_arns: tuple[str, ...] = (),
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        cert_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._pattern_labels = cert_host_pattern.lower().split(".")
        self._schemes = ("https", "http") if insecure_http_certs else ("https",)
        self._allowed_topics = frozenset(allowed_topic_arns)
        self._any_topic = "*" in self._allowed_topics
        self._wall_clock = wall_clock
        self._session_factory = session_factory or _default_session
        self._session: aiohttp.ClientSession | None = None
        self._cert_ttl = cert_ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, rsa.RSAPublicKey]] = {}
        self._inflight: dict[str, asyncio.Task[rsa.RSAPublicKey]] = {}

    async def verify(self, msg: dict[str, Any]) -> None:
        """Raise SnsError unless msg is for an allowed topic, fresh and correctly signed."""
        self._check_topic(msg.get("TopicArn"))
        self._check_timestamp(msg.get("Timestamp"))
        algorithm = _signature_hash(msg.get("SignatureVersion"))
        signature = _decode_signature(msg.get("Signature"))
        cert_url = msg.get("SigningCertURL")
        if not isinstance(cert_url, str) or not cert_url:
            raise SnsError("unsigned", "no SigningCertURL")
        data = string_to_sign(msg)
        public_key = await self._public_key(self._checked_url(cert_url))
        try:
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise SnsError("bad_signature", "signature does not match") from None

    async def confirm_subscription(self, msg: dict[str, Any]) -> None:
        """Confirm a verified SubscriptionConfirmation by GETting its SubscribeURL."""
        if msg.get("Type") != SUBSCRIPTION_CONFIRMATION:
            raise SnsError("bad_envelope", "not a SubscriptionConfirmation")
        self._check_topic(msg.get("TopicArn"))
        url = self._checked_url(msg.get("SubscribeURL"))
        try:
            # No redirects: a redirect could lead anywhere, past the host check.
            async with self._get_session().get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
            ) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SnsError("confirm_failed", type(exc).__name__) from exc
        if not 200 <= status < 300:
            raise SnsError("confirm_failed", f"HTTP {status}")
        # The SubscribeURL carries the confirmation token: log the topic only.
        log.info("confirmed SNS subscription topic=%s", msg.get("TopicArn"))

    async def close(self) -> None:
        """Cancel in-flight certificate fetches and close the HTTP session."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _check_topic(self, topic_arn: object) -> None:
        """Raise SnsError unless the topic is allowed: listed, or the list holds '*' (an
        empty list allows none: a forgotten setting must not open the webhook to anyone)."""
        if not self._any_topic and topic_arn not in self._allowed_topics:
            raise SnsError("topic_not_allowed", f"topic {topic_arn!r} not allowed")

    def _check_timestamp(self, value: object) -> None:
        """Raise SnsError unless Timestamp is at most MAX_CLOCK_SKEW ahead and younger than
        the MessageId memory: an older message could be counted again once its id is
        forgotten (a replay), and one from the future is not SNS's."""
        try:
            moment = parse_iso(value)  # type: ignore[arg-type]
        except (ValueError, OverflowError):
            raise SnsError("bad_timestamp", "Timestamp is not an ISO-8601 time") from None
        now = self._wall_clock()
        if moment > now + MAX_CLOCK_SKEW:
            raise SnsError("bad_timestamp", f"Timestamp {value} is in the future")
        if moment < now - MESSAGE_ID_MEMORY:
            raise SnsError("bad_timestamp", f"Timestamp {value} is older than "
                                            f"{MESSAGE_ID_MEMORY.days} days")

    def _checked_url(self, raw: object) -> URL:
        return allowed_url(raw, self._pattern_labels, self._schemes)

    async def _public_key(self, url: URL) -> rsa.RSAPublicKey:
        """Return the cached key for url, or join/start the single fetch for it."""
        key = str(url)
        cached = self._cache.get(key)
        if cached is not None and self._clock() < cached[0]:
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_key(url))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # shield: one cancelled caller must not cancel the fetch the others wait on.
        return await asyncio.shield(task)

    def _forget(self, key: str, task: asyncio.Task[rsa.RSAPublicKey]) -> None:
        """Drop a finished fetch; mark its exception retrieved even if every waiter left."""
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()

    async def _fetch_key(self, url: URL) -> rsa.RSAPublicKey:
        """Fetch, parse and cache the signing certificate at url."""
        try:
            pem = await self._fetch_pem(url)
        except SnsError as exc:
            log.warning("SNS certificate fetch failed host=%s error=%s", url.host, exc)
            raise
        public_key = _rsa_public_key(pem)
        self._store(str(url), public_key)
        log.info("fetched SNS signing certificate url=%s", url)
        return public_key

    async def _fetch_pem(self, url: URL) -> bytes:
        """GET the certificate bytes (no redirects, time and size capped)."""
        try:
            async with self._get_session().get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
            ) as resp:
                if resp.status != 200:
                    raise SnsError("cert_fetch", f"HTTP {resp.status}")
                return await _read_capped(resp, CERT_MAX_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SnsError("cert_fetch", type(exc).__name__) from exc

    def _store(self, key: str, public_key: rsa.RSAPublicKey) -> None:
        """Cache a key with its expiry, dropping expired and then oldest entries."""
        now = self._clock()
        for stale in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[stale]
        while len(self._cache) >= CERT_CACHE_MAX:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self._cert_ttl, public_key)

    def _get_session(self) -> aiohttp.ClientSession:
        """Create the HTTP session on first use (inside the running loop)."""
        if self._session is None:
            self._session = self._session_factory()
        return self._session
