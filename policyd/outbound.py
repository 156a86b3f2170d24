"""Outbound control: the outbound resource, its permission rules, REST increments, resets."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd import policy
from policyd.errors import Forbidden, Invalid
from policyd.store import counters
from policyd.store.domains import Domain, get_domain, update_fields
from policyd.store.changes import audit
from policyd.store.scope import Scope

ENFORCEMENTS = ("hard", "soft", "off")
STATUSES = ("active", "blocked", "suspended")
MASTER_FIELDS = ("tier", "enforcement", "status")
FIELDS = ("tier", "daily_limit", "monthly_limit", "enforcement", "status")
Tiers = dict[str, tuple[int | None, int | None]]


def render(domain: Domain, totals: counters.Totals) -> dict[str, Any]:
    """The outbound resource of a domain (effective tier/limits/enforcement)."""
    tier, daily, monthly, enforcement = domain.effective
    sent = totals.sent_month
    return {
        "tier": tier, "daily_limit": daily, "monthly_limit": monthly,
        "enforcement": enforcement, "status": domain.out_status,
        "sent_today": totals.sent_today, "sent_month": sent,
        "bytes_month": totals.bytes_month,
        "bounces": totals.bounces, "complaints": totals.complaints,
        "bounce_rate": round(totals.bounces / sent, 6) if sent else 0.0,
        "complaint_rate": round(totals.complaints / sent, 6) if sent else 0.0,
        "inherited_from": domain.parent.name if domain.parent else None,
    }


def _limit(body: dict[str, Any], field: str) -> int | None:
    value = body[field]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0 or value > 2**62):
        raise Invalid(f"{field} must be a non-negative integer or null (unlimited)")
    return value


def _within(value: int | None, ceiling: int | None) -> bool:
    if ceiling is None:
        return True
    return value is not None and value <= ceiling


def check_permission(scope: Scope, domain: Domain, body: dict[str, Any], tiers: Tiers) -> None:
    """Clients may not change tier/enforcement/status, nor raise limits above their tier's.

    Checked before validation: a forbidden field is 403 even when its value is also invalid.
    Sending a field's current value is not a change.
    """
    if scope.is_master:
        return
    tier, daily, monthly, enforcement = domain.effective
    current = {"tier": tier, "enforcement": enforcement, "status": domain.out_status,
               "daily_limit": daily, "monthly_limit": monthly}
    for field in MASTER_FIELDS:
        if field in body and body[field] != current[field]:
            raise Forbidden(f"only the master can change {field}")
    ceilings = tiers.get(tier, (None, None))
    for field, ceiling in zip(("daily_limit", "monthly_limit"), ceilings):
        if field in body and body[field] != current[field]:
            if not _within(_limit(body, field), ceiling):
                shown = "unlimited" if ceiling is None else ceiling
                raise Forbidden(f"{field} may not exceed the {tier} tier's limit ({shown})")


def columns_for(body: dict[str, Any], domain: Domain, tiers: Tiers) -> dict[str, Any]:
    """Validate a PUT body and return the domain columns it sets."""
    fields: dict[str, Any] = {}
    if "tier" in body:
        if body["tier"] not in tiers:
            raise Invalid(f"tier must be one of {', '.join(sorted(tiers))}")
        fields["out_tier"] = body["tier"]
        fields["out_daily_limit"], fields["out_monthly_limit"] = tiers[body["tier"]]
    for field in ("daily_limit", "monthly_limit"):
        if field in body:
            fields[f"out_{field}"] = _limit(body, field)
    if "enforcement" in body:
        if body["enforcement"] not in ENFORCEMENTS:
            raise Invalid("enforcement must be hard, soft or off")
        fields["out_enforcement"] = body["enforcement"]
    if "status" in body:
        if body["status"] not in STATUSES:
            raise Invalid("status must be active, blocked or suspended")
        fields["out_status"] = body["status"]
    return fields


def put_outbound(conn: sqlite3.Connection, scope: Scope, name: str, body: dict[str, Any],
                 tiers: Tiers) -> Domain:
    """Apply a permitted, validated outbound PUT in one transaction."""
    domain = get_domain(conn, scope, name)
    check_permission(scope, domain, body, tiers)
    fields = columns_for(body, domain, tiers)
    return update_fields(conn, scope, name, fields, "outbound.update")[1]


@dataclass(frozen=True, slots=True)
class IncrementResult:
    allowed: bool
    sent_today: int
    sent_month: int
    reason: str | None


def increment(conn: sqlite3.Connection, scope: Scope, name: str, count: int, nbytes: int,
              day: str, month: str) -> IncrementResult:
    """The REST twin of the policy path: the same checks and one atomic, conditional add."""
    domain = get_domain(conn, scope, name)
    found = counters.domain_facts(conn, domain.name, day, month)
    assert found is not None
    domain_id, facts, usage = found
    refusal = _refusal(facts)
    reason = refusal or policy.over_limit(usage, count, nbytes, facts)
    allowed = refusal is None and (reason is None or facts.enforcement != "hard")
    if allowed:
        counters.add(conn, domain_id, day, month, count, nbytes)
        usage = policy.Usage(usage.sent_today + count, usage.sent_month + count,
                             usage.bytes_month + nbytes)
    return IncrementResult(allowed, usage.sent_today, usage.sent_month, reason)


def _refusal(facts: policy.DomainFacts) -> str | None:
    if facts.status != "active":
        return "suspended"
    if not policy.ses_verified(facts):
        return "ses_unverified"
    if facts.out_status != "active":
        return "blocked" if facts.out_status == "blocked" else "out_suspended"
    return None


def reset_current(conn: sqlite3.Connection, scope: Scope, name: str, kind: str,
                  period: str) -> dict[str, Any]:
    """Zero one domain's running day or month (a manual, audited reset)."""
    domain = get_domain(conn, scope, name)
    counters.zero_current(conn, domain.id, kind, period)
    audit(conn, scope, f"outbound.reset_{'daily' if kind == 'day' else 'monthly'}", name,
          None, {"period": period})
    return {"domain": name, "period": period, "current": True}


def close_periods(conn: sqlite3.Connection, kind: str, today: str, this_month: str,
                  oldest_month: str, now: str) -> dict[str, Any]:
    """Close ended days (daily) or freeze ended months into history (monthly). Idempotent."""
    if kind == "day":
        return {"closed_days": counters.close_days(conn, today)}
    frozen = counters.freeze_months(conn, this_month, now)
    pruned = counters.prune_history(conn, oldest_month)
    counters.close_days(conn, today)
    return {"frozen_months": frozen, "pruned_history": pruned}
