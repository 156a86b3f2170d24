"""Amazon SES verification: start it, poll it, store its status, notify on success."""
from __future__ import annotations

import logging
import sqlite3

from policyd.runtime import Runtime
from policyd.ses import SesClient, SesError, SesIdentity, SesStatus, SesUnavailable
from policyd.store import domains as domain_store
from policyd.store import outbox
from policyd.store.changes import audit
from policyd.store.domains import Domain
from policyd.store.scope import Scope

log = logging.getLogger(__name__)
POLL_BATCH = 1000  # domains per poller round; the least recently checked go first


def _store_status(conn: sqlite3.Connection, name: str, status: SesStatus) -> Domain | None:
    """Store a status; on the transition to success queue `ses_verified`. Returns the domain."""
    change = domain_store.set_ses(conn, name, status=status.status, dkim_status=status.dkim_status,
                                  token=status.verification_token,
                                  dkim_tokens=status.dkim_tokens or None)
    if change is None:
        return domain_store.find_domain(conn, name)
    before, after = change
    if after.ses_status == "success" and before.ses_status != "success":
        queued = outbox.enqueue(conn, after.partner_id, "ses_verified", domain=name)
        log.info("SES verification of %s succeeded (partner notification %s)", name,
                 "queued" if queued else "not configured")
    elif after.ses_status != before.ses_status:
        log.info("SES status of %s: %s -> %s", name, before.ses_status, after.ses_status)
    return after


def _store_statuses(conn: sqlite3.Connection,
                    statuses: dict[str, SesStatus]) -> dict[str, Domain]:
    """Store several statuses in one transaction; returns the domains still hosted."""
    stored = {name: _store_status(conn, name, status) for name, status in statuses.items()}
    return {name: domain for name, domain in stored.items() if domain is not None}


def _store_started(conn: sqlite3.Connection, name: str, identity: SesIdentity,
                   audited_by: Scope | None) -> Domain | None:
    """Store the tokens of a started verification (and its audit entry, when someone asked
    for it); a verified domain stays verified."""
    domain = domain_store.find_domain(conn, name)
    if domain is None:
        return None
    if audited_by is not None:
        after = "success" if domain.ses_status == "success" else "pending"
        audit(conn, audited_by, "domain.ses_verify", name, {"ses_status": domain.ses_status},
              {"ses_status": after})
    # Re-verifying a verified identity keeps it verified at SES; marking it pending here would
    # REJECT its outbound mail until the next poll.
    verified = domain.ses_status == "success"
    status = SesStatus(status="success" if verified else "pending",
                       dkim_status=domain.ses_dkim_status if verified else "pending",
                       verification_token=identity.verification_token,
                       dkim_tokens=identity.dkim_tokens)
    return _store_status(conn, name, status)


def _ses(rt: Runtime) -> SesClient:
    """The SES client; SesUnavailable when SES is not configured."""
    if rt.ses is None:
        raise SesUnavailable("SES is not configured")
    return rt.ses


async def _start(rt: Runtime, name: str, audited_by: Scope | None = None) -> None:
    """Ask SES to verify a domain (identity + DKIM) and store the tokens; raises SesError."""
    identity = await _ses(rt).verify_domain(name)
    await rt.store.write(_store_started, name, identity, audited_by)
    log.info("SES verification of %s started", name)


async def start_verification(rt: Runtime, name: str, audited_by: Scope | None = None) -> bool:
    """Start SES verification of a domain, audited as asked by audited_by (if given); False
    (logged) when SES failed: the poller retries."""
    try:
        await _start(rt, name, audited_by)
    except SesError as exc:
        log.warning("SES verification of %s could not start (the poller retries): %s",
                    name, exc)
        return False
    return True


def _wake_notifier(rt: Runtime) -> None:
    """Let the notifier deliver what the last transaction queued (it runs on its own)."""
    if rt.notifier is not None:
        rt.notifier.wake()


async def refresh(rt: Runtime, names: list[str]) -> dict[str, Domain]:
    """Read SES status for names (batched by the client), store changes, return the domains."""
    statuses = await _ses(rt).statuses(names)
    # An identity SES does not know keeps what we have: the poller starts it.
    known = {name: s for name, s in statuses.items() if s.status != "not_started"}
    stored = await rt.store.write(_store_statuses, known) if known else {}
    _wake_notifier(rt)
    return stored


async def _start_unknown(rt: Runtime, names: list[str]) -> int:
    """Start verification of identities SES does not know; stops when SES is unreachable."""
    started = 0
    for name in names:
        try:
            await _start(rt, name)
        except SesUnavailable as exc:
            log.warning("SES poll: starting verifications stopped (next round retries): %s", exc)
            break
        except SesError as exc:  # this identity only (e.g. refused): the others go on
            log.warning("SES verification of %s could not start: %s", name, exc)
            continue
        started += 1
    return started


async def poll(rt: Runtime) -> dict[str, int]:
    """One poller round over every domain whose verification is not finished.

    Raises SesError when SES could not be asked (unreachable, no or bad credentials): the
    round failed, and `policyd ses-poll` exits non-zero (the scheduler logs it and retries).
    """
    names = await rt.store.read(domain_store.pending_ses, POLL_BATCH)
    log.info("SES poll: %d domains pending", len(names))
    if not names:
        return {"checked": 0, "started": 0, "verified": 0}
    statuses = await _ses(rt).statuses(names)
    unknown = [name for name, status in statuses.items() if status.status == "not_started"]
    known = {name: s for name, s in statuses.items() if s.status != "not_started"}
    stored = await rt.store.write(_store_statuses, known) if known else {}
    started = await _start_unknown(rt, unknown)
    _wake_notifier(rt)
    verified = sum(1 for domain in stored.values() if domain.ses_status == "success")
    log.info("SES poll done: %d checked, %d started, %d verified", len(names), started, verified)
    return {"checked": len(names), "started": started, "verified": verified}
