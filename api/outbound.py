"""Handlers for outbound control: settings, REST increments, history and resets."""
from __future__ import annotations

import logging

from aiohttp import web

from api.common import json_body, normalised, only, opt_bool, require_master, runtime_of, scope_of
from api.domains import domain_name, show
from policyd import feedback, jobs, outbound
from policyd.errors import Invalid
from policyd.names import normalize_domain
from policyd.store import counters
from policyd.store import domains as domain_store
from policyd.timeutil import utcnow

log = logging.getLogger(__name__)
MAX_UNITS = 10**9  # per increment: far above any real batch, far below counter overflow


async def get(request: web.Request) -> web.Response:
    """The outbound resource of a domain."""
    view = await show(runtime_of(request), scope_of(request), domain_name(request))
    return web.json_response({"domain": view["name"], **view["outbound"]})


async def put(request: web.Request) -> web.Response:
    """Partial update of tier, limits, enforcement, status (see policyd.outbound)."""
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, outbound.FIELDS + outbound.READ_ONLY)
    settable = {f: v for f, v in body.items() if f in outbound.FIELDS}
    await rt.store.write(outbound.put_outbound, scope, domain_name(request), settable,
                         rt.config.tiers)
    return await get(request)


async def increment(request: web.Request) -> web.Response:
    """Count n messages now if the domain may send them (master; atomic)."""
    rt, scope = runtime_of(request), require_master(request)
    name = domain_name(request)
    body = await json_body(request)
    only(body, ("count", "bytes"))
    if "count" not in body:
        raise Invalid("count is required")
    count, nbytes = body["count"], body.get("bytes", 0)
    for field, value, low in (("count", count, 1), ("bytes", nbytes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_UNITS:
            raise Invalid(f"{field} must be an integer from {low} to {MAX_UNITS}")
    day, month = rt.periods.keys(utcnow())
    result = await rt.store.write(outbound.increment, scope, name, count, nbytes, day, month,
                                  feedback.Thresholds.of(rt.config.outbound))
    reply: dict[str, object] = {"allowed": result.allowed, "sent_today": result.sent_today,
             "sent_month": result.sent_month}
    if result.reason:
        reply["reason"] = result.reason
    return web.json_response(reply)


async def history(request: web.Request) -> web.Response:
    """The frozen monthly totals of a domain, newest first."""
    rt, scope = runtime_of(request), scope_of(request)
    domain = await rt.store.read(domain_store.get_domain, scope, domain_name(request))
    items = await rt.store.read(counters.history, domain.id)
    return web.json_response({"domain": domain.name, "items": items, "next": None})


async def reset_daily(request: web.Request) -> web.Response:
    """Close ended days, or zero one domain's running day."""
    return await _reset(request, "day")


async def reset_monthly(request: web.Request) -> web.Response:
    """Freeze ended months into history, or zero one domain's running month."""
    return await _reset(request, "month")


async def _reset(request: web.Request, kind: str) -> web.Response:
    """The two resets: close ended periods, or {domain, current: true}."""
    rt, scope = runtime_of(request), require_master(request)
    body = await json_body(request)
    only(body, ("domain", "current"))
    if not opt_bool(body, "current"):
        if "domain" in body:
            raise Invalid('a domain reset needs "current": true (it zeroes the running period)')
        return web.json_response(await jobs.reset(rt, kind, audited_by=scope))
    if "domain" not in body:
        raise Invalid('"current": true needs "domain"')
    name = normalised(normalize_domain, body["domain"])
    day, month = rt.periods.keys(utcnow())
    result = await rt.store.write(outbound.reset_current, scope, name, kind, day, month)
    log.info("outbound %s reset of the running %s by %s", name, kind, scope.actor)
    return web.json_response(result)


ROUTES = [
    web.get("/domains/{name}/outbound", get), web.put("/domains/{name}/outbound", put),
    web.post("/domains/{name}/outbound/increment", increment),
    web.get("/domains/{name}/outbound/history", history),
    web.post("/outbound/reset-daily", reset_daily),
    web.post("/outbound/reset-monthly", reset_monthly),
]
