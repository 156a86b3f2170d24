"""Outbound control: the outbound resource, its permission rules, REST increments, resets."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd import feedback, policy
from policyd.errors import Forbidden, Invalid, NotFound
from policyd.store import counters
from policyd.store.domains import Domain, get_domain, update_fields
from policyd.store.changes import audit
from policyd.store.scope import Scope

ENFORCEMENTS = ("hard", "soft", "off")
STATUSES = ("active", "blocked", "suspended")
MASTER_FIELDS = ("tier", "enforcement", "status")
FIELDS = ("tier", "daily_limit", "monthly_limit", "enforcement", "status")
INHERITED = ("tier", "daily_limit", "monthly_limit", "enforcement")
# What GET shows besides FIELDS: accepted in a PUT (a client may PUT back what it read), ignored.
READ_ONLY = ("domain", "sent_today", "sent_month", "bytes_month", "bounces", "complaints",
             "bounce_rate", "complaint_rate", "inherited_from")
MAX_LIMIT = 2**62
Tiers = dict[str, tuple[int | None, int | None]]


def render(domain: Domain, totals: counters.Totals) -> dict[str, Any]:
    """The outbound resource of a domain (effective tier/limits/enforcement)."""
    sent = totals.sent_month
    return {
        **current_values(domain),
        "sent_today": totals.sent_today, "sent_month": sent,
        "bytes_month": totals.bytes_month,
        "bounces": totals.bounces, "complaints": totals.complaints,
        "bounce_rate": round(totals.bounces / sent, 6) if sent else 0.0,
        "complaint_rate": round(totals.complaints / sent, 6) if sent else 0.0,
        "inherited_from": domain.parent.name if domain.parent else None,
    }


def _is_limit(value: Any) -> bool:
    """A valid limit: a non-negative integer (not a bool) in range, or None (unlimited)."""
    return value is None or (not isinstance(value, bool) and isinstance(value, int)
                             and 0 <= value <= MAX_LIMIT)


def _is_count_or_none(value: Any) -> bool:
    """An integer (any size, not a bool) or None: comparable with a tier's ceiling."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _limit(body: dict[str, Any], field: str) -> int | None:
    value = body[field]
    if not _is_limit(value):
        raise Invalid(f"{field} must be a non-negative integer or null (unlimited)")
    return value


def _within(value: int | None, ceiling: int | None) -> bool:
    if ceiling is None:
        return True
    return value is not None and value <= ceiling


def current_values(domain: Domain) -> dict[str, Any]:
    """The settable fields as GET shows them (tier/limits/enforcement effective)."""
    sending = domain.effective
    return {"tier": sending.tier, "daily_limit": sending.daily_limit,
            "monthly_limit": sending.monthly_limit, "enforcement": sending.enforcement,
            "status": domain.out_status}


def _same(a: Any, b: Any) -> bool:
    # Strict: True is not 1 and 1.0 is not 1, so a wrong type is never mistaken for "unchanged".
    return type(a) is type(b) and a == b


def changes(body: dict[str, Any], domain: Domain) -> dict[str, Any]:
    """The fields of body whose value differs from the domain's current one."""
    current = current_values(domain)
    return {f: v for f, v in body.items() if f in FIELDS and not _same(v, current[f])}


def check_permission(scope: Scope, domain: Domain, body: dict[str, Any], tiers: Tiers) -> None:
    """Clients may not change tier/enforcement/status, nor raise limits above their tier's.

    Checked before validation: a forbidden field is 403 even when its value is also invalid.
    Sending a field's current value is not a change.
    """
    if scope.is_master:
        return
    changed = changes(body, domain)
    for field in MASTER_FIELDS:
        if field in changed:
            raise Forbidden(f"only the master can change {field}")
    sending = domain.effective
    tier = sending.tier
    # A tier no longer in the config: the client may only lower what the domain has now.
    ceilings = tiers.get(tier, (sending.daily_limit, sending.monthly_limit))
    for field, ceiling in zip(("daily_limit", "monthly_limit"), ceilings):
        value = changed.get(field)
        if field in changed and _is_count_or_none(value) and not _within(value, ceiling):
            shown = "unlimited" if ceiling is None else ceiling
            raise Forbidden(f"{field} may not exceed the {tier} tier's limit ({shown})")


def _check_inherited(domain: Domain, changed: dict[str, Any]) -> None:
    """A linked subdomain's tier, limits and enforcement are its parent's: change the parent."""
    if domain.parent is None:
        return
    fields = sorted(set(changed) & set(INHERITED))
    if fields:
        raise Invalid(f"{', '.join(fields)} of {domain.name} are inherited from its wildcard "
                      f"parent {domain.parent.name}; change the parent instead")


def _tier_columns(tier: Any, domain: Domain, tiers: Tiers) -> dict[str, Any]:
    if isinstance(tier, str) and tier in tiers:
        daily, monthly = tiers[tier]
        return {"out_tier": tier, "out_daily_limit": daily, "out_monthly_limit": monthly}
    if isinstance(tier, str) and tier == domain.tier:
        return {}  # unchanged tier that the config no longer lists: keep the stored limits
    raise Invalid(f"tier must be one of {', '.join(sorted(tiers))}")


def columns_for(body: dict[str, Any], domain: Domain, tiers: Tiers) -> dict[str, Any]:
    """Validate a PUT body and return the domain columns it sets."""
    fields: dict[str, Any] = {}
    if "tier" in body:  # the tier's limits first: limits in the same body then apply
        fields.update(_tier_columns(body["tier"], domain, tiers))
    for field in ("daily_limit", "monthly_limit"):
        if field in body:
            fields[f"out_{field}"] = _limit(body, field)
    if "enforcement" in body:
        if not isinstance(body["enforcement"], str) or body["enforcement"] not in ENFORCEMENTS:
            raise Invalid("enforcement must be hard, soft or off")
        fields["out_enforcement"] = body["enforcement"]
    if "status" in body:
        if not isinstance(body["status"], str) or body["status"] not in STATUSES:
            raise Invalid("status must be active, blocked or suspended")
        fields["out_status"] = body["status"]
    return fields


def put_outbound(conn: sqlite3.Connection, scope: Scope, name: str, body: dict[str, Any],
                 tiers: Tiers) -> Domain:
    """Apply a permitted, validated outbound PUT in one transaction."""
    domain = get_domain(conn, scope, name)
    check_permission(scope, domain, body, tiers)
    changed = changes(body, domain)
    _check_inherited(domain, changed)
    if not scope.is_master or domain.parent is not None:
        # A value sent back unchanged is no change: a client resending its tier must not
        # reset limits the master chose, and inherited fields stay the parent's.
        body = changed
    fields = columns_for(body, domain, tiers)
    return update_fields(conn, scope, name, fields, "outbound.update")[1]


@dataclass(frozen=True, slots=True)
class IncrementResult:
    """The answer to a REST increment."""

    allowed: bool
    sent_today: int
    sent_month: int
    reason: str | None


def increment(conn: sqlite3.Connection, scope: Scope, name: str, count: int, nbytes: int,
              day: str, month: str,
              limits: feedback.Thresholds | None = None) -> IncrementResult:
    """The REST twin of the policy path: the same checks and one atomic, conditional add.

    With limits, the guillotine looks at the domain once the count is in: bounces that came
    while it sent too little to judge count as soon as its volume is enough.
    """
    domain = get_domain(conn, scope, name)
    found = counters.domain_facts(conn, domain.name, day, month)
    if found is None:  # cannot happen inside this transaction; never an assert (python -O)
        raise NotFound(f"domain {name} not found")
    domain_id, facts, usage = found
    reason = policy.domain_refusal(facts)
    allowed = reason is None
    if allowed:
        allowed, reason = policy.quota_verdict(usage, count, nbytes, facts)
    if allowed:
        counters.add(conn, domain_id, day, month, count, nbytes)
        usage = usage.plus(count, nbytes)
        if limits is not None:
            feedback.guillotine(conn, domain.name, counters.totals(conn, domain_id, day, month),
                                limits)
    return IncrementResult(allowed, usage.sent_today, usage.sent_month, reason)


def reset_current(conn: sqlite3.Connection, scope: Scope, name: str, kind: str, day: str,
                  month: str) -> dict[str, Any]:
    """Zero one domain's running day or month (a manual, audited reset)."""
    domain = get_domain(conn, scope, name)
    period = day if kind == "day" else month
    before = counters.totals(conn, domain.id, day, month)
    sent = before.sent_today if kind == "day" else before.sent_month
    counters.zero_current(conn, domain.id, kind, period)
    audit(conn, scope, f"outbound.reset_{'daily' if kind == 'day' else 'monthly'}", name,
          {"period": period, "sent": sent}, {"period": period, "sent": 0})
    after = counters.totals(conn, domain.id, day, month)
    return {"domain": name, "current": True, "period": period,
            "sent_today": after.sent_today, "sent_month": after.sent_month}


def close_periods(conn: sqlite3.Connection, kind: str, today: str, this_month: str,
                  oldest_month: str, now: str) -> dict[str, Any]:
    """Close ended days (daily) or freeze ended months into history (monthly). Idempotent."""
    if kind == "day":
        return {"closed_days": counters.close_days(conn, today)}
    frozen = counters.freeze_months(conn, this_month, now)
    pruned = counters.prune_history(conn, oldest_month)
    counters.close_days(conn, today)
    return {"frozen_months": frozen, "pruned_history": pruned}
