"""SES feedback through SNS: bounces and complaints, counted once, and the guillotine."""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from policyd.errors import Forbidden, Invalid, PolicydError, Unavailable
from policyd.runtime import Runtime
from policyd.sns import MailEvent, SnsError, mail_events, parse_envelope
from policyd.store import counters
from policyd.store import notifications as outbox
from policyd.store.domains import find_domain, update_fields
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

log = logging.getLogger(__name__)
GUILLOTINE = Scope(actor="system:guillotine")

# SNS retries a delivery only on 5xx (AWS SNS "HTTP/S delivery policy"), so failures that are
# ours or the network's answer 503; messages that are not genuine answer 403 and are dropped.
_RETRYABLE = frozenset({"cert_fetch", "confirm_failed"})


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The guillotine's settings: bounce rate limit and minimum monthly volume."""

    rate: float
    min_sent: int


@dataclass(frozen=True, slots=True)
class Counted:
    """What one SNS notification did: a duplicate, or recipients counted and domains blocked."""

    duplicate: bool
    counted: int = 0
    blocked: list[str] = field(default_factory=list)


def count_events(conn: sqlite3.Connection, message_id: str, events: list[MailEvent], day: str,
                 month: str, limits: Thresholds) -> Counted:
    """Count one SNS message's events (once per MessageId) and apply the guillotine."""
    if counters.seen_message(conn, message_id, iso(utcnow())):
        return Counted(duplicate=True)
    counted, blocked = 0, []
    for event in events:
        domain = find_domain(conn, event.source_domain)
        if domain is None:
            log.info("SES %s for unhosted domain %s ignored", event.kind, event.source_domain)
            continue
        n = len(event.recipients)
        totals = counters.add_feedback(conn, domain.id, day, month,
                                       n if event.kind == "bounce" else 0,
                                       n if event.kind == "complaint" else 0)
        counted += n
        if guillotine(conn, domain.name, totals, limits):
            blocked.append(domain.name)
    return Counted(duplicate=False, counted=counted, blocked=blocked)


def over_limit(bounces: int, sent: int, limits: Thresholds) -> bool:
    """True when bounces/sent reaches the rate with at least min_sent sent (exact arithmetic)."""
    # Fraction: 3 bounces of 100 sent is exactly 3%, whatever float rounding says.
    return sent >= max(limits.min_sent, 1) and bounces >= Fraction(str(limits.rate)) * sent


def guillotine(conn: sqlite3.Connection, name: str, totals: counters.Totals,
                limits: Thresholds) -> bool:
    """Block outbound when the month's bounce rate reaches the limit; queue the notice."""
    sent = totals.sent_month
    if not over_limit(totals.bounces, sent, limits):
        return False
    domain = find_domain(conn, name)
    if domain is None or domain.out_status != "active":
        return False
    update_fields(conn, GUILLOTINE, name, {"out_status": "blocked"}, "outbound.guillotine")
    rate = totals.bounces / sent
    outbox.enqueue(conn, domain.partner_id, "outbound_blocked", domain=name,
                   bounce_rate=round(rate, 6), bounces=totals.bounces, sent=sent)
    log.warning("guillotine: outbound of %s blocked (bounce rate %.4f = %d/%d over the month)",
                name, rate, totals.bounces, sent)
    return True


def thresholds(rt: Runtime) -> Thresholds:
    """The guillotine's configured rate and minimum volume."""
    return Thresholds(rt.config.outbound.bounce_rate_limit, rt.config.outbound.bounce_min_sent)


def sweep(conn: sqlite3.Connection, day: str, month: str, limits: Thresholds) -> list[str]:
    """Apply the guillotine to every active domain with bounces this month.

    Feedback is checked when it arrives; this catches a domain whose bounces came while it
    was still under bounce_min_sent and whose sending has since crossed it.
    """
    return [name for name, totals in counters.bounced_active(conn, day, month)
            if guillotine(conn, name, totals, limits)]


def _refusal(exc: SnsError) -> PolicydError:
    """The API error for a failed check: 400 malformed, 503 retryable, 403 not genuine."""
    if exc.reason == "bad_envelope":
        return Invalid(f"not an SNS message: {exc.detail or exc.reason}")
    if exc.reason in _RETRYABLE:
        return Unavailable(f"SNS message not processed, retry later: {exc.reason}")
    return Forbidden(f"SNS message refused: {exc.reason}")


async def _verified(rt: Runtime, body: bytes) -> dict[str, Any]:
    """Parse and verify an SNS body; raises the API error (and counts the refusal)."""
    try:
        msg = parse_envelope(body)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        log.warning("SNS message refused: %s", exc)
        raise _refusal(exc) from None
    try:
        await rt.sns.verify(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        log.warning("SNS message %s refused: %s", msg.get("MessageId"), exc)
        raise _refusal(exc) from None
    return msg


async def handle_sns(rt: Runtime, body: bytes) -> dict[str, object]:
    """Verify and process one SNS HTTP message; raises Invalid, Forbidden or Unavailable."""
    msg = await _verified(rt, body)
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        return await _confirm(rt, msg)
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS unsubscribe confirmation for topic %s", msg.get("TopicArn"))
        rt.metrics.webhooks.labels("unsubscribe").inc()
        return {"status": "logged"}
    day, month = rt.periods.keys(utcnow())
    limits = thresholds(rt)
    result = await rt.store.write(count_events, msg["MessageId"], mail_events(msg), day, month,
                                  limits)
    rt.metrics.webhooks.labels("duplicate" if result.duplicate else "counted").inc()
    if result.blocked and rt.notifier is not None:
        rt.notifier.wake()  # delivery runs in the notifier's task, never in this request
    return {"status": "duplicate" if result.duplicate else "ok", "counted": result.counted,
            "blocked": result.blocked}


async def _confirm(rt: Runtime, msg: dict[str, Any]) -> dict[str, object]:
    """Confirm a verified SubscriptionConfirmation by GETting its SubscribeURL."""
    try:
        await rt.sns.confirm_subscription(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        raise _refusal(exc) from None
    log.info("SNS subscription to %s confirmed", msg.get("TopicArn"))
    rt.metrics.webhooks.labels("subscribed").inc()
    return {"status": "confirmed"}
