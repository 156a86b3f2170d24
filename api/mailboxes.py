"""Handlers for /users (mailboxes, quota) and /aliases (aliases and catch-alls)."""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from api.common import (json_body, normalised, only, opt_bool, opt_int, opt_str, page, paged,
                        runtime_of, scope_of)
from policyd.errors import Invalid
from policyd.names import normalize_alias_source, normalize_domain, normalize_email
from policyd.passwords import hash_password
from policyd.store import mailboxes as store
from policyd.store.domains import get_domain
from policyd.store.mailboxes import Alias, Mailbox

log = logging.getLogger(__name__)
MAX_DESTINATIONS = 100
USER_FIELDS = ("email", "password", "name", "quota_bytes", "active")


def _changes(before: Mailbox | None, after: Mailbox, password: bool) -> str:
    """What a write changed, for the log line: never the password or its hash, never the
    display name's text (free text), only that they changed."""
    changed = []
    if before is None or before.name != after.name:
        changed.append("name")
    for field in ("quota_bytes", "active"):
        if before is None or getattr(before, field) != getattr(after, field):
            changed.append(f"{field}={getattr(after, field)}")
    if password:
        changed.append("password")
    return ", ".join(changed)


def render_mailbox(m: Mailbox) -> dict[str, Any]:
    """The mailbox resource (never the password hash)."""
    return {"email": m.email, "domain": m.domain, "name": m.name,
            "quota_bytes": m.quota_bytes, "used_bytes": m.used_bytes, "active": m.active,
            "created_at": m.created_at, "updated_at": m.updated_at}


def render_alias(a: Alias) -> dict[str, Any]:
    """The alias resource."""
    return {"source": a.source, "domain": a.domain, "destinations": list(a.destinations),
            "catch_all": a.catch_all, "created_at": a.created_at}


def _email(value: object) -> str:
    """A normalised mailbox address, or Invalid."""
    local, domain = normalised(normalize_email, value)
    return f"{local}@{domain}"


def mailbox_address(request: web.Request) -> str:
    """The normalised {email} of the path."""
    return _email(request.match_info["email"])


def _domain_filter(request: web.Request) -> str | None:
    """The normalised ?domain= filter, if given."""
    value = request.query.get("domain")
    return None if value is None else normalised(normalize_domain, value)


async def _user_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Validated mailbox columns from a body (hashing a given password)."""
    fields: dict[str, Any] = {}
    if "name" in body:
        fields["name"] = opt_str(body, "name")
    if "quota_bytes" in body:
        fields["quota_bytes"] = opt_int(body, "quota_bytes")
    if "active" in body:
        if opt_bool(body, "active") is None:
            raise Invalid("active must be true or false")
        fields["active"] = body["active"]
    if "password" in body:
        fields["password_hash"] = await hash_password(body["password"])
    return fields


async def create_user(request: web.Request) -> web.Response:
    """POST /users/: create a mailbox; the password is hashed with bcrypt off the loop."""
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, USER_FIELDS)
    if "email" not in body or "password" not in body:
        raise Invalid("email and password are required")
    local, domain = normalised(normalize_email, body["email"])
    # the domain must be visible before any slow hashing is spent on the request
    await rt.store.read(get_domain, scope, domain)
    fields = await _user_fields(body)
    mailbox = await rt.store.write(store.create_mailbox, scope, local, domain, fields)
    log.info("mailbox %s created by %s: %s", mailbox.email, scope.actor,
             _changes(None, mailbox, password=True))
    return web.json_response(render_mailbox(mailbox), status=201)


async def list_users(request: web.Request) -> web.Response:
    """GET /users/: mailboxes the caller may see (?domain= filters), paginated."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    rows = await rt.store.read(store.list_mailboxes, scope, _domain_filter(request), limit + 1,
                               offset)
    return web.json_response(paged([render_mailbox(m) for m in rows], limit, offset))


async def get_user(request: web.Request) -> web.Response:
    """GET /users/{email}."""
    rt = runtime_of(request)
    mailbox = await rt.store.read(store.get_mailbox, scope_of(request),
                                  mailbox_address(request))
    return web.json_response(render_mailbox(mailbox))


async def update_user(request: web.Request) -> web.Response:
    """PUT /users/{email}: partial update (a new password is hashed)."""
    rt, scope = runtime_of(request), scope_of(request)
    address = mailbox_address(request)
    body = await json_body(request)
    only(body, USER_FIELDS)
    if "email" in body and _email(body["email"]) != address:
        raise Invalid("email cannot be changed; create a new mailbox")
    body.pop("email", None)
    before = await rt.store.read(store.get_mailbox, scope, address)
    mailbox = await rt.store.write(store.update_mailbox, scope, address,
                                   await _user_fields(body))
    changes = _changes(before, mailbox, password="password" in body)
    if changes:
        log.info("mailbox %s updated by %s: %s", address, scope.actor, changes)
    return web.json_response(render_mailbox(mailbox))


async def delete_user(request: web.Request) -> web.Response:
    """DELETE /users/{email}."""
    rt, scope = runtime_of(request), scope_of(request)
    address = mailbox_address(request)
    await rt.store.write(store.delete_mailbox, scope, address)
    log.info("mailbox %s deleted by %s", address, scope.actor)
    return web.Response(status=204)


async def get_quota(request: web.Request) -> web.Response:
    """GET /users/{email}/quota."""
    rt = runtime_of(request)
    mailbox = await rt.store.read(store.get_mailbox, scope_of(request),
                                  mailbox_address(request))
    return web.json_response({"email": mailbox.email, "quota_bytes": mailbox.quota_bytes,
                              "used_bytes": mailbox.used_bytes})


async def put_quota(request: web.Request) -> web.Response:
    """PUT /users/{email}/quota: bytes, or null for unlimited."""
    rt, scope = runtime_of(request), scope_of(request)
    address = mailbox_address(request)
    body = await json_body(request)
    only(body, ("quota_bytes",))
    if "quota_bytes" not in body:
        raise Invalid("quota_bytes is required (bytes, or null for unlimited)")
    quota = opt_int(body, "quota_bytes")
    await rt.store.write(store.update_mailbox, scope, address, {"quota_bytes": quota})
    log.info("mailbox %s updated by %s: quota_bytes=%s", address, scope.actor, quota)
    return await get_quota(request)


def _destinations(value: object) -> tuple[str, ...]:
    """1..100 normalised, de-duplicated destination addresses, or Invalid."""
    if not isinstance(value, list) or not value:
        raise Invalid("destinations must be a non-empty list of addresses")
    if len(value) > MAX_DESTINATIONS:
        raise Invalid(f"at most {MAX_DESTINATIONS} destinations")
    seen: dict[str, None] = {}
    for item in value:
        seen[_email(item)] = None
    return tuple(seen)


async def create_alias(request: web.Request) -> web.Response:
    """POST /aliases/: an alias or a catch-all ('@domain') with its destinations."""
    rt, scope = runtime_of(request), scope_of(request)
    body = await json_body(request)
    only(body, ("source", "destinations"))
    if "source" not in body:
        raise Invalid("source is required")
    local, domain = normalised(normalize_alias_source, body["source"])
    destinations = _destinations(body.get("destinations"))
    source = f"{local}@{domain}"
    if source in destinations:
        raise Invalid("an alias cannot deliver to itself")
    alias = await rt.store.write(store.create_alias, scope, source, domain, destinations)
    log.info("alias %s created by %s: %d destination(s)", alias.source, scope.actor,
             len(alias.destinations))
    return web.json_response(render_alias(alias), status=201)


async def list_aliases(request: web.Request) -> web.Response:
    """GET /aliases/: aliases the caller may see (?domain= filters), paginated."""
    rt, scope = runtime_of(request), scope_of(request)
    limit, offset = page(request)
    rows = await rt.store.read(store.list_aliases, scope, _domain_filter(request), limit + 1,
                               offset)
    return web.json_response(paged([render_alias(a) for a in rows], limit, offset))


def _source(request: web.Request) -> str:
    """The normalised alias source of the path ('@domain' for a catch-all)."""
    local, domain = normalised(normalize_alias_source, request.match_info["source"])
    return f"{local}@{domain}"


async def get_alias(request: web.Request) -> web.Response:
    """GET /aliases/{source}."""
    rt = runtime_of(request)
    alias = await rt.store.read(store.get_alias, scope_of(request), _source(request))
    return web.json_response(render_alias(alias))


async def delete_alias(request: web.Request) -> web.Response:
    """DELETE /aliases/{source}."""
    rt, scope = runtime_of(request), scope_of(request)
    source = _source(request)
    await rt.store.write(store.delete_alias, scope, source)
    log.info("alias %s deleted by %s", source, scope.actor)
    return web.Response(status=204)


ROUTES = [
    web.post("/users/", create_user), web.post("/users", create_user),
    web.get("/users/", list_users), web.get("/users", list_users),
    web.get("/users/{email}", get_user), web.put("/users/{email}", update_user),
    web.delete("/users/{email}", delete_user),
    web.get("/users/{email}/quota", get_quota), web.put("/users/{email}/quota", put_quota),
    web.post("/aliases/", create_alias), web.post("/aliases", create_alias),
    web.get("/aliases/", list_aliases), web.get("/aliases", list_aliases),
    web.get("/aliases/{source}", get_alias), web.delete("/aliases/{source}", delete_alias),
]
