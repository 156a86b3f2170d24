"""Handlers for /domains: CRUD, suspension, parent, SES, DNS check, retention, transfer."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

from aiohttp import web

from api.common import (flag, json_body, normalised, only, opt_bool, opt_int, page, paged,
                        require_master, runtime_of, scope_of)
from policyd import dnscheck, outbound, sesflow
from policyd.errors import Forbidden, Invalid, Unavailable
from policyd.names import normalize_domain
from policyd.runtime import Runtime
from policyd.store import counters
from policyd.store import domains as store
from policyd.store.domains import Domain
from policyd.store.scope import Scope
from policyd.timeutil import utcnow

log = logging.getLogger(__name__)
VERIFY_WAIT = 2.0  # seconds a create waits for SES before answering (it goes on after)


def render(d: Domain, totals: counters.Totals, region: str) -> dict[str, Any]:
    """The domain resource."""
    return {
        "name": d.name, "partner_id": d.partner_id, "status": d.status,
        "suspended_by": d.suspended_by,
        "parent": d.parent.name if d.parent else None, "wildcard": d.wildcard,
        "ses": {"status": d.ses_status, "dkim_status": d.ses_dkim_status,
                "verification_token": d.ses_token, "dkim_tokens": list(d.ses_dkim_tokens),
                "verified": d.ses_verified, "checked_at": d.ses_checked_at},
        "dns_records": dnscheck.expected_records(d.name, ses_token=d.ses_token,
                                                 dkim_tokens=list(d.ses_dkim_tokens),
                                                 region=region),
        "outbound": outbound.render(d, totals),
        "retention_days": d.retention_days,
        "transfer": {"monthly_limit_bytes": d.transfer_limit_bytes,
                     "used_bytes": totals.bytes_month},
        "created_at": d.created_at, "updated_at": d.updated_at,
    }


def _with_totals(conn: sqlite3.Connection, domains: list[Domain], day: str,
                 month: str) -> list[tuple[Domain, counters.Totals]]:
    """Each domain with its counter totals for the running day and month."""
    return [(d, counters.totals(conn, d.id, day, month)) for d in domains]


def _one(conn: sqlite3.Connection, scope: Scope, name: str, day: str,
         month: str) -> tuple[Domain, counters.Totals]:
    """One domain as scope sees it, with its totals."""
    return _with_totals(conn, [store.get_domain(conn, scope, name)], day, month)[0]


async def show(rt: Runtime, scope: Scope, name: str) -> dict[str, Any]:
    """Read and render one domain as scope sees it."""
    day, month = rt.periods.keys(utcnow())
    domain, totals = await rt.store.read(_one, scope, name, day, month)
    return render(domain, totals, rt.config.ses.region)


def domain_name(request: web.Request) -> str:
    """The normalised {name} of the path."""
    return normalised(normalize_domain, request.match_info["name"])


async def create(request: web.Request) -> web.Response:
    """POST /domains/: create a domain (the master may name its partner)."""
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, ("name", "partner_id"))
    if "name" not in body:
        raise Invalid("name is required")
    name = normalised(normalize_domain, body["name"])
    partner_id = opt_int(body, "partner_id", minimum=1)
    if not scope.is_master and partner_id not in (None, scope.partner_id):
        raise Forbidden("a client key can only create domains for its own partner")
    tier = rt.config.outbound.default_tier
    domain = await rt.store.write(store.create_domain, scope, name, partner_id, tier,
                                  rt.config.tiers[tier])
    log.info("domain %s created by %s", name, scope.actor)
    if rt.ses is not None and rt.config.ses.auto_verify and domain.ses_status == "not_started":
        task = rt.tasks.spawn(sesflow.start_verification(rt, name), f"ses-verify-{name}")
        await asyncio.wait({task}, timeout=VERIFY_WAIT)
    return web.json_response(await show(rt, scope, name), status=201)


async def list_(request: web.Request) -> web.Response:
    """GET /domains/: the domains the caller may see, paginated."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    day, month = rt.periods.keys(utcnow())

    def load(conn: sqlite3.Connection) -> list[tuple[Domain, counters.Totals]]:
        return _with_totals(conn, store.list_domains(conn, scope, limit + 1, offset), day, month)
    rows = await rt.store.read(load)
    items = [render(d, t, rt.config.ses.region) for d, t in rows]
    return web.json_response(paged(items, limit, offset))


async def get(request: web.Request) -> web.Response:
    """GET /domains/{name}."""
    rt = runtime_of(request)
    return web.json_response(await show(rt, scope_of(request), domain_name(request)))


async def delete(request: web.Request) -> web.Response:
    """DELETE /domains/{name}: refused while mailboxes exist unless ?force=true."""
    rt, scope = runtime_of(request), scope_of(request)
    name = domain_name(request)
    await rt.store.write(store.delete_domain, scope, name, flag(request, "force"))
    log.info("domain %s deleted by %s", name, scope.actor)
    return web.Response(status=204)


async def suspend(request: web.Request) -> web.Response:
    """PUT /domains/{name}/suspend: freeze mail, delete nothing."""
    return await _set_suspended(request, True)


async def activate(request: web.Request) -> web.Response:
    """PUT /domains/{name}/activate: lift a suspension (a master one only by the master)."""
    return await _set_suspended(request, False)


async def _set_suspended(request: web.Request, value: bool) -> web.Response:
    """Suspend (value True) or activate the domain of the path."""
    rt, scope = runtime_of(request), scope_of(request)
    name = domain_name(request)
    await rt.store.write(store.set_suspended, scope, name, value)
    log.info("domain %s %s by %s", name, "suspended" if value else "activated", scope.actor)
    return web.json_response(await show(rt, scope, name))


async def set_parent(request: web.Request) -> web.Response:
    """PUT /domains/{name}/parent (master): link to a parent, set the wildcard flag."""
    rt, scope = runtime_of(request), require_master(request)
    name = domain_name(request)
    body = await json_body(request)
    only(body, ("parent", "wildcard"))
    if "parent" not in body and "wildcard" not in body:
        raise Invalid("give parent and/or wildcard")
    wildcard = opt_bool(body, "wildcard")
    if "wildcard" in body and wildcard is None:
        raise Invalid("wildcard must be true or false")
    parent = body.get("parent")
    parent = None if parent is None else normalised(normalize_domain, parent)
    if "parent" in body:
        await rt.store.write(store.set_parent, scope, name, parent, wildcard)
    else:
        await rt.store.write(store.set_wildcard, scope, name, bool(wildcard))
    return web.json_response(await show(rt, scope, name))


async def dns_check(request: web.Request) -> web.Response:
    """GET /domains/{name}/dns-check: the records as DNS serves them now; never a 500."""
    rt, scope = runtime_of(request), scope_of(request)
    domain = await rt.store.read(store.get_domain, scope, domain_name(request))
    dns = rt.config.dns
    settings = dnscheck.DnsSettings(nameservers=dns.nameservers, port=dns.port,
                                    timeout=dns.timeout, mx_hosts=dns.mx_hosts,
                                    spf_include=dns.spf_include)
    result = await dnscheck.dns_check(domain.name, ses_token=domain.ses_token,
                                      dkim_tokens=list(domain.ses_dkim_tokens),
                                      region=rt.config.ses.region, settings=settings)
    return web.json_response({"domain": domain.name, **result})


async def ses_verify(request: web.Request) -> web.Response:
    """POST /domains/{name}/ses-verify (master): start SES verification."""
    rt, scope = runtime_of(request), require_master(request)
    name = domain_name(request)
    await rt.store.read(store.get_domain, scope, name)
    if rt.ses is None or not await sesflow.start_verification(rt, name, audited_by=scope):
        raise Unavailable("SES verification could not be started; the poller will retry")
    return web.json_response(await show(rt, scope, name))


async def ses_status(request: web.Request) -> web.Response:
    """GET /domains/{name}/ses-status: read (and store) SES state."""
    rt, scope = runtime_of(request), scope_of(request)
    name = domain_name(request)
    await rt.store.read(store.get_domain, scope, name)
    if rt.ses is not None:
        try:
            await sesflow.refresh(rt, [name])
        except Exception as exc:  # SES down: show what we have, say it is stale
            log.warning("SES status of %s could not be read: %s", name, exc)
    view = await show(rt, scope, name)
    return web.json_response({"domain": name, **view["ses"], "dns_records": view["dns_records"]})


async def get_retention(request: web.Request) -> web.Response:
    """GET /domains/{name}/retention."""
    view = await show(runtime_of(request), scope_of(request), domain_name(request))
    return web.json_response({"domain": view["name"], "retention_days": view["retention_days"]})


async def _master_number(request: web.Request, field: str, hint: str,
                         **bounds: int) -> tuple[Scope, str, int | None]:
    """(scope, domain, n) of a master-only PUT {field: n or null}."""
    scope = require_master(request)
    name = domain_name(request)
    body = await json_body(request)
    only(body, (field,))
    if field not in body:
        raise Invalid(f"{field} is required ({hint}, or null)")
    return scope, name, opt_int(body, field, **bounds)


async def put_retention(request: web.Request) -> web.Response:
    """PUT /domains/{name}/retention (master)."""
    scope, name, days = await _master_number(request, "retention_days", "a number of days",
                                             minimum=1, maximum=36500)
    await runtime_of(request).store.write(store.set_retention, scope, name, days)
    return await get_retention(request)


async def get_transfer(request: web.Request) -> web.Response:
    """GET /domains/{name}/transfer: monthly limit and use in bytes."""
    view = await show(runtime_of(request), scope_of(request), domain_name(request))
    return web.json_response({"domain": view["name"], **view["transfer"]})


async def put_transfer(request: web.Request) -> web.Response:
    """PUT /domains/{name}/transfer (master)."""
    scope, name, limit = await _master_number(request, "monthly_limit_bytes", "bytes")
    await runtime_of(request).store.write(store.set_transfer_limit, scope, name, limit)
    return await get_transfer(request)


ROUTES = [
    web.post("/domains/", create), web.post("/domains", create),
    web.get("/domains/", list_), web.get("/domains", list_),
    web.get("/domains/{name}", get), web.delete("/domains/{name}", delete),
    web.put("/domains/{name}/suspend", suspend), web.put("/domains/{name}/activate", activate),
    web.put("/domains/{name}/parent", set_parent),
    web.get("/domains/{name}/dns-check", dns_check),
    web.post("/domains/{name}/ses-verify", ses_verify),
    web.get("/domains/{name}/ses-status", ses_status),
    web.get("/domains/{name}/retention", get_retention),
    web.put("/domains/{name}/retention", put_retention),
    web.get("/domains/{name}/transfer", get_transfer),
    web.put("/domains/{name}/transfer", put_transfer),
]
