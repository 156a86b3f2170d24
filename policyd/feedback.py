"""SES feedback: the bounces and complaints in an SES notification, counted once per SNS
MessageId against the sending domain, and the guillotine."""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from fractions import Fraction
import json
from typing import Any

from policyd.config import OutboundConfig
from policyd.names import InvalidName, normalize_domain
from policyd.store import counters
from policyd.store import outbox
from policyd.store.domains import block_outbound, find_domain
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

log = logging.getLogger(__name__)
GUILLOTINE = Scope(actor="system:guillotine")

@dataclass(frozen=True, slots=True)
class Thresholds:
    """The guillotine's settings: bounce rate limit and minimum monthly volume."""

    rate: float
    min_sent: int

    @classmethod
    def of(cls, config: OutboundConfig) -> Thresholds:
        """The configured rate and minimum volume."""
        return cls(config.bounce_rate_limit, config.bounce_min_sent)


@dataclass(frozen=True)
class MailEvent:
    """A countable SES event: a permanent bounce or a complaint, per sending domain."""

    kind: str  # "bounce" | "complaint"
    source_domain: str
    recipients: tuple[str, ...]


# notificationType (identity notifications) / eventType (event publishing) -> (key, recipients)
_MAIL_EVENT_SHAPES = {
    "Bounce": ("bounce", "bouncedRecipients"),
    "Complaint": ("complaint", "complainedRecipients"),
}


def mail_events(msg: dict[str, Any]) -> list[MailEvent]:
    """Extract permanent bounces and complaints from an SES notification; [] otherwise."""
    inner = _inner_json(msg.get("Message") if isinstance(msg, dict) else None)
    if inner is None:
        return []
    type_name = inner.get("notificationType") or inner.get("eventType")
    shape = _MAIL_EVENT_SHAPES.get(type_name) if isinstance(type_name, str) else None
    if shape is None:
        return []
    kind, recipients_key = shape
    detail = inner.get(kind)
    if not isinstance(detail, dict):
        return []
    # Only hard bounces count; transient/undetermined ones are retried or unknown.
    if kind == "bounce" and detail.get("bounceType") != "Permanent":
        return []
    domain = _source_domain(inner.get("mail"))
    recipients = _recipient_addresses(detail.get(recipients_key))
    if not domain or not recipients:
        return []
    return [MailEvent(kind=kind, source_domain=domain, recipients=recipients)]


def _inner_json(message: object) -> dict[str, Any] | None:
    """Decode the SNS Message string as a JSON object, or None."""
    if not isinstance(message, str):
        return None
    try:
        inner = json.loads(message)
    except (ValueError, RecursionError):
        return None
    return inner if isinstance(inner, dict) else None


def _source_domain(mail: object) -> str:
    """Domain of mail.source (after the last '@'), normalised as hosted names are (case,
    trailing dot, IDNA A-labels); '' when unusable."""
    source = mail.get("source") if isinstance(mail, dict) else None
    if not isinstance(source, str) or "@" not in source:
        return ""
    try:
        return normalize_domain(source.rpartition("@")[2].rstrip(">"))
    except InvalidName:
        return ""


def _recipient_addresses(entries: object) -> tuple[str, ...]:
    """emailAddress of each well-formed recipient entry, deduplicated in order."""
    if not isinstance(entries, list):
        return ()
    addresses = (
        entry["emailAddress"].strip()
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("emailAddress"), str)
    )
    return tuple(dict.fromkeys(address for address in addresses if address))


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


def bounce_rate_reached(bounces: int, sent: int, limits: Thresholds) -> bool:
    """True when bounces/sent reaches the rate with at least min_sent sent (exact arithmetic)."""
    # Fraction: 3 bounces of 100 sent is exactly 3%, whatever float rounding says.
    return sent >= max(limits.min_sent, 1) and bounces >= Fraction(str(limits.rate)) * sent


def guillotine(conn: sqlite3.Connection, name: str, totals: counters.Totals,
                limits: Thresholds) -> bool:
    """Block outbound when the month's bounce rate reaches the limit; queue the notice."""
    sent = totals.sent_month
    if not bounce_rate_reached(totals.bounces, sent, limits):
        return False
    if not block_outbound(conn, GUILLOTINE, name, "outbound.guillotine"):
        return False  # gone, or not active (already blocked, or suspended by the master)
    domain = find_domain(conn, name)
    assert domain is not None  # blocked just now, in this transaction
    rate = totals.bounces / sent
    outbox.enqueue(conn, domain.partner_id, "outbound_blocked", domain=name,
                   bounce_rate=round(rate, 6), bounces=totals.bounces, sent=sent)
    log.warning("guillotine: outbound of %s blocked (bounce rate %.4f = %d/%d over the month)",
                name, rate, totals.bounces, sent)
    return True


def sweep(conn: sqlite3.Connection, day: str, month: str, limits: Thresholds) -> list[str]:
    """Apply the guillotine to every active domain with bounces this month.

    Feedback is checked when it arrives; this catches a domain whose bounces came while it
    was still under bounce_min_sent and whose sending has since crossed it.
    """
    return [name for name, totals in counters.bounced_active(conn, day, month)
            if guillotine(conn, name, totals, limits)]
