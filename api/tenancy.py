"""Handlers for partners, API keys (with usage and delta sync) and the audit log."""
from __future__ import annotations

import base64
import binascii
import logging
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from api.common import (flag, json_body, only, opt_int, opt_str, page, paged, require_master,
                        runtime_of, scope_of)
from policyd.errors import Forbidden, Invalid
from policyd.store import changes as change_store
from policyd.store import partners as store
from policyd.store.partners import ApiKey
from policyd.store.scope import Scope
from policyd.timeutil import iso, parse_iso

log = logging.getLogger(__name__)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
QUOTA_FIELDS = ("max_domains", "max_mailboxes_per_domain", "max_aliases_per_mailbox")


def _partner_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Validated partner columns from a body."""
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
        if url is not None and not url.startswith(("https://", "http://")):  # opt_str: no CR/LF
            raise Invalid("notify_url must be an http(s) URL or null")
        fields["notify_url"] = url
    return fields


def _decimal(text: str) -> bool:
    """ASCII digits only ('²'.isdigit() is true but int() refuses it), at most 18 of them."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _partner_id(request: web.Request) -> int:
    """The {id} of the path as an integer, or Invalid."""
    raw = request.match_info["id"]
    if not _decimal(raw):
        raise Invalid("partner id must be a positive integer")
    return int(raw)


async def create_partner(request: web.Request) -> web.Response:
    """POST /partners/ (master): the partner and its notify_secret, shown this once."""
    rt, scope = runtime_of(request), require_master(request)
    body = await json_body(request)
    only(body, ("name", *QUOTA_FIELDS, "notify_url"))
    if "name" not in body:
        raise Invalid("name is required")
    partner, secret = await rt.store.write(store.create_partner, scope, _partner_fields(body))
    return web.json_response({**partner.public(), "notify_secret": secret}, status=201)


async def list_partners(request: web.Request) -> web.Response:
    """GET /partners/ (master), paginated."""
    rt, _ = runtime_of(request), require_master(request)
    limit, offset = page(request)
    rows = await rt.store.read(store.list_partners, limit + 1, offset)
    return web.json_response(paged([p.public() for p in rows], limit, offset))


async def get_partner(request: web.Request) -> web.Response:
    """GET /partners/{id} (master)."""
    rt, _ = runtime_of(request), require_master(request)
    partner = await rt.store.read(store.get_partner, _partner_id(request))
    return web.json_response(partner.public())


async def update_partner(request: web.Request) -> web.Response:
    """PUT /partners/{id} (master): partial update of name, quotas, notify_url."""
    rt, scope = runtime_of(request), require_master(request)
    body = await json_body(request)
    only(body, ("name", *QUOTA_FIELDS, "notify_url"))
    partner = await rt.store.write(store.update_partner, scope, _partner_id(request),
                                   _partner_fields(body))
    return web.json_response(partner.public())


async def delete_partner(request: web.Request) -> web.Response:
    """DELETE /partners/{id} (master): 409 while it owns domains unless ?force=true."""
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
    """POST /api-keys/: a key of the caller's partner (the master names one); token once."""
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, ("name", "expires_at", "partner_id"))
    partner_id = opt_int(body, "partner_id", minimum=1)
    if not scope.is_master and partner_id not in (None, scope.partner_id):
        raise Forbidden("a client key can only create keys for its own partner")  # before 400s
    name = opt_str(body, "name", max_len=200)
    expires_at = store.parse_expiry(body.get("expires_at"))
    key, token = await rt.store.write(store.create_key, scope, partner_id, name, expires_at)
    log.info("API key %s created for partner %s by %s (expires %s)", key.id, key.partner_id,
             scope.actor, key.expires_at or "never")
    return web.json_response({**render_key(key), "token": token}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    """GET /api-keys/: the keys the caller may see (?partner_id= filters), paginated."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    partner = request.query.get("partner_id")
    if partner is not None and not (_decimal(partner) and int(partner) >= 1):
        # ?partner_id=0 used to read as "no filter" and list every partner's keys
        raise Invalid("partner_id must be a positive integer")
    rows = await rt.store.read(store.list_keys, scope, int(partner) if partner else None,
                               limit + 1, offset)
    return web.json_response(paged([render_key(k) for k in rows], limit, offset))


async def get_key(request: web.Request) -> web.Response:
    """GET /api-keys/{token}: a key by id or token, never its secret."""
    rt = runtime_of(request)
    key = await rt.store.read(store.get_key, scope_of(request), request.match_info["token"])
    return web.json_response(render_key(key))


async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /api-keys/{token}: revoke a key (idempotent); it answers 401 from now on."""
    rt, scope = runtime_of(request), scope_of(request)
    # {token} may be the token itself: only the key's id is ever logged
    key = await rt.store.write(store.revoke_key, scope, request.match_info["token"])
    log.info("API key %s of partner %s revoked by %s", key.id, key.partner_id, scope.actor)
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
    return int(number) if kind == "seq" and _decimal(number) else None


def _query_time(text: str, what: str) -> str:
    """A query-string time as ISO UTC text (times before 1970 read as 1970), or Invalid."""
    # An unencoded '+' in a query string arrives as a space: '...T12:00:00 01:00'.
    repaired = re.sub(r" (\d\d(:?\d\d)?)$", r"+\1", text.strip())
    try:
        return iso(max(parse_iso(repaired), EPOCH))
    except (ValueError, OverflowError):
        raise Invalid(f"{what} must be an ISO-8601 time") from None


def _since(request: web.Request) -> int | str:
    """Where the feed resumes: a cursor's seq, an ISO time, or 0 from the beginning."""
    since = request.query.get("since") or request.query.get("cursor")
    if not since:
        return 0
    seq = decode_cursor(since)
    return seq if seq is not None else _query_time(since, "since (or a cursor)")


@dataclass(frozen=True, slots=True)
class UsagePage:
    """What one usage call reads, from one snapshot."""

    key: ApiKey
    totals: dict[str, Any]
    changes: list[change_store.Change]
    start: int


def _usage_page(conn: sqlite3.Connection, scope: Scope, ref: str, since: int | str,
                limit: int) -> UsagePage:
    """Key, totals and one page of changes, all from one read snapshot."""
    key = store.get_key(conn, scope, ref)
    start = since if isinstance(since, int) else change_store.seq_before(conn, since)
    owner = Scope(actor=key.id, partner_id=key.partner_id)
    changes = change_store.changes_since(conn, owner, start, limit)
    return UsagePage(key, store.usage(conn, key.partner_id), changes, start)


async def usage(request: web.Request) -> web.Response:
    """GET /api-keys/{token}/usage?since=: use against quotas and a page of the change feed."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, _ = page(request, default=100, maximum=1000)
    found = await rt.store.read(_usage_page, scope, request.match_info["token"],
                                _since(request), limit)
    last = found.changes[-1].seq if found.changes else found.start
    return web.json_response({
        "key": render_key(found.key), "usage": found.totals,
        "changes": [{"op": c.op, "kind": c.kind, "key": c.key, "at": c.at}
                    for c in found.changes],
        "cursor": encode_cursor(last), "more": len(found.changes) == limit,
    })


def _audit_bounds(request: web.Request) -> tuple[str | None, str | None]:
    """(?since, ?until) as ISO text, or Invalid."""
    since, until = (request.query.get(name) for name in ("since", "until"))
    return (None if since is None else _query_time(since, "since"),
            None if until is None else _query_time(until, "until"))


async def audit(request: web.Request) -> web.Response:
    """GET /audit (master): audit entries oldest first, ?target= / ?since= / ?until=."""
    rt, _ = runtime_of(request), require_master(request)
    limit, offset = page(request)
    since, until = _audit_bounds(request)
    target = request.query.get("target") or request.query.get("domain")
    rows = await rt.store.read(change_store.audit_entries, target, since, until, offset,
                               limit + 1)
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
