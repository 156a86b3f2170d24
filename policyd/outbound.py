"""Outbound control: the outbound resource, its permission rules, REST increments, resets."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd import feedback, policy
from policyd.errors import Forbidden, Invalid, NotFound
from policyd.store import counters
from policyd.store import senders as sender_store
from policyd.store.domains import Domain, OutboundPatch, get_domain, patch_outbound
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


def _tier_values(tier: Any, domain: Domain, tiers: Tiers) -> dict[str, Any]:
    if isinstance(tier, str) and tier in tiers:
        daily, monthly = tiers[tier]
        return {"tier": tier, "daily_limit": daily, "monthly_limit": monthly}
    if isinstance(tier, str) and tier == domain.tier:
        return {}  # unchanged tier that the config no longer lists: keep the stored limits
    raise Invalid(f"tier must be one of {', '.join(sorted(tiers))}")


def patch_for(body: dict[str, Any], domain: Domain, tiers: Tiers) -> OutboundPatch:
    """Validate a PUT body into the change it asks for."""
    values: dict[str, Any] = {}
    if "tier" in body:  # the tier's limits first: limits in the same body then apply
        values.update(_tier_values(body["tier"], domain, tiers))
    for field in ("daily_limit", "monthly_limit"):
        if field in body:
            values[field] = _limit(body, field)
    if "enforcement" in body:
        if not isinstance(body["enforcement"], str) or body["enforcement"] not in ENFORCEMENTS:
            raise Invalid("enforcement must be hard, soft or off")
        values["enforcement"] = body["enforcement"]
    if "status" in body:
        if not isinstance(body["status"], str) or body["status"] not in STATUSES:
            raise Invalid("status must be active, blocked or suspended")
        values["status"] = body["status"]
    return OutboundPatch(**values)


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
    return patch_outbound(conn, scope, name, patch_for(body, domain, tiers))


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
                  oldest_month: str, now: str,
                  audited_by: Scope | None = None) -> dict[str, Any]:
    """Close ended days (daily) or freeze ended months into history (monthly), audited when
    someone asked for it. Idempotent."""
    name = "daily" if kind == "day" else "monthly"
    result: dict[str, Any] = {"kind": name, "day": today, "month": this_month}
    if kind == "day":
        result["closed_days"] = counters.close_days(conn, today)
    else:
        result["frozen_months"] = counters.freeze_months(conn, this_month, now)
        result["pruned_history"] = counters.prune_history(conn, oldest_month)
        counters.close_days(conn, today)
    sender_store.close_ended_days(conn, today)
    if audited_by is not None:
        audit(conn, audited_by, f"outbound.reset_{name}", None, None, result)
    return result
