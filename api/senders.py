"""Handlers for senders (SPEC §9): a mailbox's outbound limits and lock, and a domain's senders.

Both tokens; a client sees and changes only its own mailboxes (another partner's answer 404,
as a missing one does) and may not set a limit above a limited [senders] default.
"""
from __future__ import annotations

import logging
import sqlite3
from typing import Any

from aiohttp import web

from api.common import json_body, only, opt_int, page, paged, runtime_of, scope_of
from api.domains import domain_name
from api.mailboxes import mailbox_address
from policyd.config import SendersConfig
from policyd.errors import Forbidden, Invalid
from policyd.policy import sender_limit
from policyd.runtime import Runtime
from policyd.store import senders as store
from policyd.store.domains import get_domain
from policyd.store.scope import Scope
from policyd.store.senders import Sender
from policyd.timeutil import utcnow

log = logging.getLogger(__name__)
LIMITS = ("hourly_limit", "daily_limit")
STATUSES = ("active", "locked")
MAX_LIMIT = 10**9  # messages an hour or a day: far above any real mailbox


def _periods(rt: Runtime) -> tuple[str, str]:
    """(clock hour, day) now, in [outbound] timezone."""
    now = utcnow()
    return rt.periods.hour(now), rt.periods.keys(now)[0]


def render(sender: Sender, defaults: SendersConfig) -> dict[str, Any]:
    """The sender resource: effective limits (null = unlimited), use, lock."""
    return {"email": sender.mailbox.email,
            "hourly_limit": sender_limit(sender.hourly_limit, defaults.hourly_limit),
            "daily_limit": sender_limit(sender.daily_limit, defaults.daily_limit),
            "sent_hour": sender.sent_hour, "sent_today": sender.sent_today,
            "status": sender.status, "locked_reason": sender.locked_reason,
            "locked_at": sender.locked_at}


async def get_outbound(request: web.Request) -> web.Response:
    """GET /users/{email}/outbound: the sender's limits, use and lock."""
    rt, scope = runtime_of(request), scope_of(request)
    sender = await rt.store.read(store.get_sender, scope, mailbox_address(request),
                                 *_periods(rt))
    return web.json_response(render(sender, rt.config.senders))


def _check_permission(scope: Scope, body: dict[str, Any], defaults: SendersConfig) -> None:
    """A client may not raise a limit above a limited default (checked before validation,
    as for domains: a forbidden value is 403 even when also malformed)."""
    if scope.is_master:
        return
    for field in LIMITS:
        value, ceiling = body.get(field), getattr(defaults, field)
        if ceiling is not None and isinstance(value, int) and not isinstance(value, bool) \
                and value > ceiling:
            raise Forbidden(f"{field} may not exceed the platform's default ({ceiling})")


async def put_outbound(request: web.Request) -> web.Response:
    """PUT /users/{email}/outbound: own limits (null: back to the default), lock or unlock."""
    rt, scope = runtime_of(request), scope_of(request)
    email = mailbox_address(request)
    body = await json_body(request)
    only(body, (*LIMITS, "status", "email", "sent_hour", "sent_today", "locked_reason",
                "locked_at"))  # what GET shows may be PUT back; only these three change
    before = await rt.store.read(store.get_sender, scope, email, *_periods(rt))  # 404 first
    _check_permission(scope, body, rt.config.senders)
    changes: dict[str, Any] = {f: opt_int(body, f, maximum=MAX_LIMIT)
                               for f in LIMITS if f in body}
    status = body.get("status", ...)
    if status is not ... and status not in STATUSES:
        raise Invalid("status must be active or locked")
    hour, day = _periods(rt)

    def change(conn: sqlite3.Connection) -> Sender:
        return store.update_sender(conn, scope, email, hour, day, **changes,
                                   status=None if status is ... else status)

    sender = await rt.store.write(change)
    if before.status != "locked" and sender.status == "locked":  # locked by hand just now
        rt.metrics.sender_locks.labels("manual").inc()
        if rt.notifier is not None:
            rt.notifier.wake()  # the sender_locked notification is in the outbox
    log.info("sender %s by %s: %s", email, scope.actor,
             ", ".join([*(f"{k}={v}" for k, v in changes.items()),
                        *([f"status={status}"] if status is not ... else [])]) or "no change")
    return web.json_response(render(sender, rt.config.senders))


async def domain_senders(request: web.Request) -> web.Response:
    """GET /domains/{name}/senders: mailboxes that sent today or are locked, most sent first."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    domain = await rt.store.read(get_domain, scope, domain_name(request))
    rows = await rt.store.read(store.domain_senders, domain.id, *_periods(rt), limit + 1,
                               offset)
    items = [{"email": r.email, "sent_hour": r.sent_hour, "sent_today": r.sent_today,
              "status": r.status} for r in rows]
    return web.json_response(paged(items, limit, offset))


ROUTES = [
    web.get("/users/{email}/outbound", get_outbound),
    web.put("/users/{email}/outbound", put_outbound),
    web.get("/domains/{name}/senders", domain_senders),
]
