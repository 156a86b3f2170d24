"""Scheduled work, shared by the in-process scheduler, the CLI and the REST endpoints."""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from policyd import feedback, outbound, retention, sesflow
from policyd.runtime import Runtime
from policyd.store.scope import Scope
from policyd.sns import MESSAGE_ID_MEMORY
from policyd.store import counters
from policyd.store import domains as domain_store
from policyd.store import outbox
from policyd.timeutil import add_months, iso, utcnow

log = logging.getLogger(__name__)


async def reset(rt: Runtime, kind: str, now: datetime | None = None,
                audited_by: Scope | None = None) -> dict[str, Any]:
    """Close ended periods ('day' or 'month') as of now; never touches a running period.
    Asked for by someone (the master's API call), it is audited in the same transaction.

    Idempotent: a doubled or missed timer run changes nothing the next run would not.
    """
    if kind not in ("day", "month"):
        raise ValueError(f"reset kind must be 'day' or 'month', not {kind!r}")
    now = utcnow() if now is None else now
    day, month = rt.periods.keys(now)
    oldest = add_months(month, -rt.config.outbound.history_months)
    result = await rt.store.write(outbound.close_periods, kind, day, month, oldest, iso(now),
                                  audited_by)
    log.info("reset-%s (day %s, month %s): %s", result["kind"], day, month, result)
    return result


async def housekeeping(rt: Runtime) -> None:
    """Forget old SNS message ids and delivered notifications."""
    before = iso(utcnow() - MESSAGE_ID_MEMORY)  # the webhook refuses anything older
    pruned = await rt.store.write(counters.prune_seen, before)
    dropped = await rt.store.write(outbox.prune_delivered, before)
    if pruned or dropped:
        log.info("housekeeping: %d SNS ids, %d notifications pruned", pruned, dropped)


async def purge_retention(rt: Runtime) -> list[dict[str, Any]]:
    """Remove mail older than each domain's retention_days (in a thread: file walks)."""
    work = await rt.store.read(domain_store.retention_domains)
    log.info("retention purge: %d domains with a retention policy", len(work))
    reports = []
    for name, days, local_parts in work:
        reports.append(await asyncio.to_thread(_purge_one, rt, name, days, local_parts))
        log.info("retention purge of %s: %s", name, reports[-1])
    return reports


def _purge_one(rt: Runtime, name: str, days: int, local_parts: list[str]) -> dict[str, Any]:
    mail = rt.config.mail
    if mail.expunge == "doveadm":
        report = retention.purge_doveadm(name, [f"{p}@{name}" for p in local_parts], days)
    else:
        cutoff = utcnow() - timedelta(days=days)
        report = retention.purge_maildir(mail.maildir_root, name, local_parts, cutoff)
    return {**report.as_dict(), "retention_days": days}


async def guillotine_sweep(rt: Runtime) -> list[str]:
    """Block every domain whose month's bounce rate has reached the limit."""
    day, month = rt.periods.keys(utcnow())
    blocked = await rt.store.write(feedback.sweep, day, month, feedback.Thresholds.of(rt.config.outbound))
    if blocked:
        log.warning("guillotine sweep blocked: %s", ", ".join(blocked))
        if rt.notifier is not None:
            rt.notifier.wake()
    return blocked


async def ses_poll(rt: Runtime) -> dict[str, int]:
    """One SES poller round."""
    return await sesflow.poll(rt)
