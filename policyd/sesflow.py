"""Amazon SES verification: start it, poll it, store its status, notify on success."""
from __future__ import annotations

import logging
import sqlite3

from policyd.runtime import Runtime
from policyd.ses import SesError, SesStatus
from policyd.store import domains as domain_store
from policyd.store import notifications as outbox
from policyd.store.domains import Domain

log = logging.getLogger(__name__)
POLL_BATCH = 1000


def _store_status(conn: sqlite3.Connection, name: str, status: SesStatus) -> Domain | None:
    """Store a status; on the transition to success queue `ses_verified`. Returns the domain."""
    change = domain_store.set_ses(conn, name, status=status.status, dkim_status=status.dkim_status,
                                  token=status.verification_token,
                                  dkim_tokens=status.dkim_tokens or None)
    if change is None:
        return domain_store.find_domain(conn, name)
    before, after = change
    if after.ses_status == "success" and before.ses_status != "success":
        log.info("SES verification of %s succeeded", name)
        outbox.enqueue(conn, after.partner_id, "ses_verified", domain=name)
    elif after.ses_status != before.ses_status:
        log.info("SES status of %s: %s -> %s", name, before.ses_status, after.ses_status)
    return after


async def start_verification(rt: Runtime, name: str) -> bool:
    """Ask SES to verify a domain (identity + DKIM) and store the tokens; False on failure."""
    try:
        identity = await rt.ses.verify_domain(name)
    except SesError as exc:
        log.warning("SES verification of %s could not start (the poller retries): %s",
                    name, exc)
        return False
    status = SesStatus(status="pending", dkim_status="Pending",
                       verification_token=identity.verification_token,
                       dkim_tokens=identity.dkim_tokens)
    await rt.store.write(_store_status, name, status)
    log.info("SES verification of %s started", name)
    return True


async def refresh(rt: Runtime, names: list[str]) -> dict[str, Domain]:
    """Read SES status for names (batched by the client), store changes, return the domains."""
    statuses = await rt.ses.statuses(names)
    out: dict[str, Domain] = {}
    for name, status in statuses.items():
        if status.status == "not_started":
            continue  # SES does not know it (yet): keep what we have, the poller starts it
        domain = await rt.store.write(_store_status, name, status)
        if domain is not None:
            out[name] = domain
    if rt.notifier is not None:
        rt.notifier.wake()
    return out


async def poll(rt: Runtime) -> dict[str, int]:
    """One poller round over every domain whose verification is not finished."""
    names = await rt.store.read(domain_store.pending_ses, POLL_BATCH)
    log.info("SES poll: %d domains pending", len(names))
    if not names:
        return {"checked": 0, "started": 0, "verified": 0}
    domains = {d.name: d for d in await rt.store.read(domain_store.domains_by_names, names)}
    started = 0
    for name in names:
        if domains[name].ses_token is None and await start_verification(rt, name):
            started += 1
    try:
        refreshed = await refresh(rt, names)
    except SesError as exc:
        log.warning("SES poll failed (next round retries): %s", exc)
        return {"checked": 0, "started": started, "verified": 0}
    verified = sum(1 for d in refreshed.values() if d.ses_status == "success")
    log.info("SES poll done: %d checked, %d started, %d verified", len(names), started, verified)
    return {"checked": len(names), "started": started, "verified": verified}
