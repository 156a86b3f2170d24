"""Handlers for partners, API keys (with usage and delta sync) and the audit log."""
from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from api.common import (flag, json_body, only, opt_int, opt_str, page, paged, require_master,
                        runtime_of, scope_of)
from policyd.errors import Invalid
from policyd.store import changes as change_store
from policyd.store import partners as store
from policyd.store.partners import ApiKey
from policyd.store.scope import Scope
from policyd.timeutil import iso, parse_iso

QUOTA_FIELDS = ("max_domains", "max_mailboxes_per_domain", "max_aliases_per_mailbox")


def _partner_fields(body: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if "name" in body:
        name = opt_str(body, "name", max_len=200)
        if not name or not name.strip():
            raise Invalid("name must be a non-empty string")
        fields["name"] = name.strip()
    for field in QUOTA_FIELDS:
        if field in body:
            fields[field] = opt_int(body, field, maximum=10**9)
    if "notify_url" in body:
        url = opt_str(body, "notify_url", max_len=2000)
        if url is not None and not url.startswith(("https://", "http://")):
            raise Invalid("notify_url must be an http(s) URL or null")
        fields["notify_url"] = url
    return fields


def _partner_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise Invalid("partner id must be a positive integer")
    return int(raw)


async def create_partner(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), require_master(request)
    body = await json_body(request)
    only(body, ("name", *QUOTA_FIELDS, "notify_url"))
    if "name" not in body:
        raise Invalid("name is required")
    partner, secret = await rt.store.write(store.create_partner, scope, _partner_fields(body))
    return web.json_response({**partner.public(), "notify_secret": secret}, status=201)


async def list_partners(request: web.Request) -> web.Response:
    rt, _ = runtime_of(request), require_master(request)
    limit, offset = page(request)
    rows = await rt.store.read(store.list_partners, limit + 1, offset)
    return web.json_response(paged([p.public() for p in rows], limit, offset))


async def get_partner(request: web.Request) -> web.Response:
    rt, _ = runtime_of(request), require_master(request)
    partner = await rt.store.read(store.get_partner, _partner_id(request))
    return web.json_response(partner.public())


async def update_partner(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), require_master(request)
    body = await json_body(request)
    only(body, ("name", *QUOTA_FIELDS, "notify_url"))
    partner = await rt.store.write(store.update_partner, scope, _partner_id(request),
                                   _partner_fields(body))
    return web.json_response(partner.public())


async def delete_partner(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), require_master(request)
    await rt.store.write(store.delete_partner, scope, _partner_id(request),
                         flag(request, "force"))
    return web.Response(status=204)


def render_key(key: ApiKey) -> dict[str, Any]:
    """The key resource (never the token or its hash)."""
    return {"id": key.id, "partner_id": key.partner_id, "name": key.name,
            "expires_at": key.expires_at, "revoked_at": key.revoked_at,
            "created_at": key.created_at, "last_used_at": key.last_used_at,
            "request_count": key.request_count}


async def create_key(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, ("name", "expires_at", "partner_id"))
    key, token = await rt.store.write(store.create_key, scope, opt_int(body, "partner_id", minimum=1),
                                      opt_str(body, "name", max_len=200),
                                      store.parse_expiry(body.get("expires_at")))
    return web.json_response({**render_key(key), "token": token}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    partner = request.query.get("partner_id")
    if partner is not None and not partner.isdigit():
        raise Invalid("partner_id must be an integer")
    rows = await rt.store.read(store.list_keys, scope, int(partner) if partner else None,
                               limit + 1, offset)
    return web.json_response(paged([render_key(k) for k in rows], limit, offset))


async def get_key(request: web.Request) -> web.Response:
    rt = runtime_of(request)
    key = await rt.store.read(store.get_key, scope_of(request), request.match_info["token"])
    return web.json_response(render_key(key))


async def revoke_key(request: web.Request) -> web.Response:
    rt = runtime_of(request)
    key = await rt.store.write(store.revoke_key, scope_of(request), request.match_info["token"])
    return web.json_response(render_key(key))


def encode_cursor(seq: int) -> str:
    """An opaque delta-sync cursor."""
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int | None:
    """The seq inside a cursor, or None when text is not one."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    kind, _, number = raw.partition(":")
    return int(number) if kind == "seq" and number.isdigit() else None


async def _start_seq(request: web.Request) -> int:
    since = request.query.get("since") or request.query.get("cursor")
    if not since:
        return 0
    seq = decode_cursor(since)
    if seq is not None:
        return seq
    try:
        moment = parse_iso(since)
    except ValueError:
        raise Invalid("since must be an ISO-8601 time or a cursor") from None
    return await runtime_of(request).store.read(change_store.seq_before, iso(moment))


async def usage(request: web.Request) -> web.Response:
    rt, scope = runtime_of(request), scope_of(request)
    key = await rt.store.read(store.get_key, scope, request.match_info["token"])
    limit, _ = page(request, default=100, maximum=1000)
    start = await _start_seq(request)
    owner = Scope(actor=key.id, partner_id=key.partner_id)
    changes = await rt.store.read(change_store.changes_since, owner, start, limit)
    totals = await rt.store.read(store.usage, key.partner_id)
    last = changes[-1].seq if changes else start
    return web.json_response({
        "key": render_key(key), "usage": totals,
        "changes": [{"op": c.op, "kind": c.kind, "key": c.key, "at": c.at} for c in changes],
        "cursor": encode_cursor(last), "more": len(changes) == limit,
    })


async def audit(request: web.Request) -> web.Response:
    rt, _ = runtime_of(request), require_master(request)
    limit, offset = page(request)
    query = request.query
    bounds = {}
    for name in ("since", "until"):
        if name in query:
            try:
                bounds[name] = iso(parse_iso(query[name]))
            except ValueError:
                raise Invalid(f"{name} must be an ISO-8601 time") from None
    target = query.get("target") or query.get("domain")
    rows = await rt.store.read(change_store.audit_entries, target=target,
                               since=bounds.get("since"), until=bounds.get("until"),
                               offset=offset, limit=limit + 1)
    items = [{"id": e.id, "at": e.at, "actor": e.actor, "action": e.action, "target": e.target,
              "before": e.before, "after": e.after} for e in rows]
    return web.json_response(paged(items, limit, offset))


ROUTES = [
    web.post("/partners/", create_partner), web.post("/partners", create_partner),
    web.get("/partners/", list_partners), web.get("/partners", list_partners),
    web.get("/partners/{id}", get_partner), web.put("/partners/{id}", update_partner),
    web.delete("/partners/{id}", delete_partner),
    web.post("/api-keys/", create_key), web.post("/api-keys", create_key),
    web.get("/api-keys/", list_keys), web.get("/api-keys", list_keys),
    web.get("/api-keys/{token}", get_key), web.delete("/api-keys/{token}", revoke_key),
    web.get("/api-keys/{token}/usage", usage),
    web.get("/audit", audit), web.get("/audit/", audit),
]
