"""SES feedback through SNS: bounces and complaints, counted once, and the guillotine."""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from fractions import Fraction

from policyd.errors import Forbidden, Invalid
from policyd.runtime import Runtime
from policyd.sns import MailEvent, SnsError, mail_events, parse_envelope
from policyd.store import counters
from policyd.store import notifications as outbox
from policyd.store.domains import find_domain, update_fields
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

log = logging.getLogger(__name__)
GUILLOTINE = Scope(actor="system:guillotine")


@dataclass(frozen=True, slots=True)
class Thresholds:
    rate: float
    min_sent: int


def count_events(conn: sqlite3.Connection, message_id: str, events: list[MailEvent], day: str,
                 month: str, limits: Thresholds) -> dict[str, object]:
    """Count one SNS message's events (once per MessageId) and apply the guillotine."""
    if counters.seen_message(conn, message_id, iso(utcnow())):
        return {"duplicate": True, "counted": 0}
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
        if _guillotine(conn, domain.name, totals, limits):
            blocked.append(domain.name)
    return {"duplicate": False, "counted": counted, "blocked": blocked}


def _guillotine(conn: sqlite3.Connection, name: str, totals: counters.Totals,
                limits: Thresholds) -> bool:
    """Block outbound when bounces/sent over the month reach the rate with enough volume."""
    sent = totals.sent_month
    # exact arithmetic: 3 bounces of 100 sent is exactly 3%, whatever float rounding says
    if sent < max(limits.min_sent, 1) or totals.bounces < Fraction(str(limits.rate)) * sent:
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


async def handle_sns(rt: Runtime, body: bytes) -> dict[str, object]:
    """Verify and process one SNS HTTP message; raises Invalid (400) or Forbidden (403)."""
    try:
        msg = parse_envelope(body)
    except SnsError as exc:
        rt.metrics.webhooks.labels("invalid").inc()
        raise Invalid(f"not an SNS message: {exc.reason}") from None
    try:
        await rt.sns.verify(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        log.warning("SNS message %s refused: %s", msg.get("MessageId"), exc.reason)
        raise Forbidden(f"SNS message refused: {exc.reason}") from None
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        return await _confirm(rt, msg)
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS unsubscribe confirmation for topic %s", msg.get("TopicArn"))
        rt.metrics.webhooks.labels("unsubscribe").inc()
        return {"status": "logged"}
    day, month = rt.periods.keys(utcnow())
    limits = Thresholds(rt.config.outbound.bounce_rate_limit, rt.config.outbound.bounce_min_sent)
    result = await rt.store.write(count_events, msg["MessageId"], mail_events(msg), day, month,
                                  limits)
    rt.metrics.webhooks.labels("duplicate" if result["duplicate"] else "counted").inc()
    if result.get("blocked") and rt.notifier is not None:
        rt.notifier.wake()
    return {"status": "duplicate" if result["duplicate"] else "ok", "counted": result["counted"]}


async def _confirm(rt: Runtime, msg: dict[str, object]) -> dict[str, object]:
    try:
        await rt.sns.confirm_subscription(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        raise Forbidden(f"subscription not confirmed: {exc.reason}") from None
    log.info("SNS subscription to %s confirmed", msg.get("TopicArn"))
    rt.metrics.webhooks.labels("subscribed").inc()
    return {"status": "confirmed"}
