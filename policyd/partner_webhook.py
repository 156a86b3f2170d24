"""The partner webhook: an outbox event POSTed to a partner's notify_url, signed with its
notify_secret (X-Policyd-Signature, SPEC §5)."""
from __future__ import annotations

import hashlib
import hmac
import logging
import random

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Policyd-Signature"
_PREFIX = "sha256="
_MAX_EXPONENT = 64  # keeps 2**n finite for absurd attempt counts


class DeliveryError(Exception):
    """A notification could not be delivered (bad URL, non-2xx, timeout, connection error)."""


def sign(body: bytes, secret: str) -> str:
    """Return the signature header value: "sha256=" + hex HMAC-SHA256 of body."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return _PREFIX + digest


def backoff_delay(
    attempts: int, *, base: float = 30.0, cap: float = 3600.0, jitter: float = 0.0
) -> float:
    """Seconds to wait after `attempts` failed deliveries: base * 2**(attempts-1), capped."""
    exponent = min(max(attempts - 1, 0), _MAX_EXPONENT)
    delay = base * 2**exponent
    if jitter:
        delay *= 1 + jitter * random.random()
    return min(delay, cap)


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    secret: str,
    *,
    timeout: float = 10.0,
) -> None:
    """POST a signed body to url; raise DeliveryError unless the receiver answers 2xx."""
    target = _checked_url(url)
    shown = _redacted(target)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(body, secret),
        "User-Agent": "policyd",
    }
    try:
        async with session.post(
            target,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # a redirect would resend the signed body somewhere else
        ) as response:
            status = response.status
    except TimeoutError as exc:
        raise DeliveryError(f"POST {shown}: timed out after {timeout:g}s") from exc
    except aiohttp.ClientError as exc:
        raise DeliveryError(f"POST {shown}: {type(exc).__name__}") from exc
    if not 200 <= status < 300:
        raise DeliveryError(f"POST {shown}: HTTP {status}")
    log.info("notify: delivered %d bytes to %s (HTTP %d)", len(body), shown, status)


def _checked_url(url: str) -> URL:
    try:
        target = URL(url)
    except (TypeError, ValueError) as exc:
        raise DeliveryError("invalid notify URL") from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise DeliveryError(f"notify URL must be http or https, got scheme {target.scheme!r}")
    return target


def _redacted(target: URL) -> str:
    """The URL as safe to log: no userinfo, no query string (either may carry tokens)."""
    return str(target.with_user(None).with_query(None).with_fragment(None))
