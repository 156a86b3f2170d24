"""Partners (resellers) and their API keys."""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd.errors import Exists, Forbidden, Invalid, NotFound
from policyd.store.changes import audit
from policyd.store.scope import Scope
from policyd.timeutil import iso, parse_iso, utcnow

_PARTNER = ("SELECT id, name, max_domains, max_mailboxes_per_domain, max_aliases_per_mailbox, "
            "notify_url, created_at, updated_at FROM partners")
PARTNER_FIELDS = ("name", "max_domains", "max_mailboxes_per_domain", "max_aliases_per_mailbox",
                  "notify_url")


@dataclass(frozen=True, slots=True)
class Partner:
    """A reseller with its quotas (None = unlimited); the notify secret is never loaded."""

    id: int
    name: str
    max_domains: int | None
    max_mailboxes_per_domain: int | None
    max_aliases_per_mailbox: int | None
    notify_url: str | None
    created_at: str
    updated_at: str

    def public(self) -> dict[str, Any]:
        """The fields shown by the API (never the notify secret)."""
        return {f: getattr(self, f) for f in ("id", *PARTNER_FIELDS, "created_at", "updated_at")}


def get_partner(conn: sqlite3.Connection, partner_id: int) -> Partner:
    """One partner, or NotFound."""
    row = conn.execute(f"{_PARTNER} WHERE id = ?", (partner_id,)).fetchone()
    if row is None:
        raise NotFound(f"partner {partner_id} not found")
    return Partner(*row)


def list_partners(conn: sqlite3.Connection, limit: int, offset: int) -> list[Partner]:
    """Partners by id."""
    rows = conn.execute(f"{_PARTNER} ORDER BY id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
    return [Partner(*r) for r in rows]



def create_partner(conn: sqlite3.Connection, scope: Scope,
                   fields: dict[str, Any]) -> tuple[Partner, str]:
    """Create a partner; returns it with its notify secret (shown this once)."""
    secret = secrets.token_hex(32)
    now = iso(utcnow())
    values = [fields.get(f) for f in PARTNER_FIELDS]
    partner_id = conn.execute(
        f"INSERT INTO partners ({', '.join(PARTNER_FIELDS)}, notify_secret, created_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*values, secret, now, now)).lastrowid
    assert partner_id is not None  # an INSERT always sets it
    partner = get_partner(conn, partner_id)
    audit(conn, scope, "partner.create", f"partner:{partner_id}", None, partner.public())
    return partner, secret


def update_partner(conn: sqlite3.Connection, scope: Scope, partner_id: int,
                   fields: dict[str, Any]) -> Partner:
    """Partial update of a partner's name, quotas and notify_url (audited when it changes)."""
    before = get_partner(conn, partner_id)
    changed = {f: v for f, v in fields.items() if getattr(before, f) != v}
    if not changed:
        return before
    sets = ", ".join(f"{f} = ?" for f in changed)
    conn.execute(f"UPDATE partners SET {sets}, updated_at = ? WHERE id = ?",
                 (*changed.values(), iso(utcnow()), partner_id))
    audit(conn, scope, "partner.update", f"partner:{partner_id}",
          {f: getattr(before, f) for f in changed}, changed)
    return get_partner(conn, partner_id)


def delete_partner(conn: sqlite3.Connection, scope: Scope, partner_id: int, force: bool) -> None:
    """Delete a partner with its keys; refused while it owns domains unless force (they go too)."""
    partner = get_partner(conn, partner_id)
    owned = conn.execute("SELECT count(*) FROM domains WHERE partner_id = ?",
                         (partner_id,)).fetchone()[0]
    if owned and not force:
        raise Exists(f"partner {partner_id} still owns {owned} domains; "
                     "delete them or pass ?force=true")
    conn.execute("DELETE FROM domains WHERE partner_id = ?", (partner_id,))
    # Its change feed goes too: no key can read it any more, and SQLite may hand the same id
    # to the next partner, which must never see these changes.
    conn.execute("DELETE FROM changes WHERE partner_id = ?", (partner_id,))
    conn.execute("DELETE FROM partners WHERE id = ?", (partner_id,))
    audit(conn, scope, "partner.delete", f"partner:{partner_id}", partner.public(),
          {"domains_deleted": owned})


# --- API keys ------------------------------------------------------------------------------
_KEY_COLUMNS = ("id, partner_id, name, expires_at, revoked_at, created_at, last_used_at, "
                "request_count")
_KEY = f"SELECT {_KEY_COLUMNS} FROM api_keys"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client key as shown (the token itself is never stored)."""

    id: str
    partner_id: int
    name: str | None
    expires_at: str | None
    revoked_at: str | None
    created_at: str
    last_used_at: str | None
    request_count: int

    def usable(self, now: str) -> bool:
        """Not revoked and not expired at now (ISO text)."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256 hex (tokens carry >= 256 bits of randomness)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def key_by_token_hash(conn: sqlite3.Connection, token_hash: str) -> tuple[ApiKey, str] | None:
    """The key whose token hashes to token_hash, with the stored hash for a constant-time check."""
    row = conn.execute(f"SELECT {_KEY_COLUMNS}, token_hash FROM api_keys WHERE token_hash = ?",
                       (token_hash,)).fetchone()
    return (ApiKey(*row[:8]), row[8]) if row else None


def touch_key(conn: sqlite3.Connection, key_id: str, at: str) -> None:
    """Count one request made with a key."""
    conn.execute("UPDATE api_keys SET last_used_at = ?, request_count = request_count + 1 "
                 "WHERE id = ?", (at, key_id))


def get_key(conn: sqlite3.Connection, scope: Scope, ref: str) -> ApiKey:
    """A key by its public id (or its token), if scope may see it, else NotFound."""
    cond, params = scope.where()
    row = conn.execute(f"{_KEY} WHERE (id = ? OR token_hash = ?) AND {cond}",
                       (ref, hash_token(ref), *params)).fetchone()
    if row is None:
        raise NotFound("api key not found")
    return ApiKey(*row)


def list_keys(conn: sqlite3.Connection, scope: Scope, partner_id: int | None, limit: int,
              offset: int) -> list[ApiKey]:
    """Keys scope may see, optionally of one partner."""
    cond, params = scope.where()
    extra, extra_params = ("AND partner_id = ?", (partner_id,)) if partner_id else ("", ())
    rows = conn.execute(f"{_KEY} WHERE {cond} {extra} ORDER BY created_at, id LIMIT ? OFFSET ?",
                        (*params, *extra_params, limit, offset)).fetchall()
    return [ApiKey(*r) for r in rows]


def _client_expiry(conn: sqlite3.Connection, scope: Scope, expires_at: str | None) -> str | None:
    # A client key may not mint a key that outlives itself: a leaked short-lived key must not
    # become a permanent one.
    own = conn.execute("SELECT expires_at FROM api_keys WHERE id = ?", (scope.actor,)).fetchone()
    own_expiry = own[0] if own else None
    if own_expiry is None:
        return expires_at
    if expires_at is None:
        return own_expiry
    if expires_at > own_expiry:
        raise Forbidden("a key cannot be created to expire after the key that creates it "
                        f"({own_expiry})")
    return expires_at


def create_key(conn: sqlite3.Connection, scope: Scope, partner_id: int | None,
               name: str | None, expires_at: str | None) -> tuple[ApiKey, str]:
    """Create a key; returns it with its token (shown this once, stored only hashed)."""
    if scope.is_master:
        if partner_id is None:
            raise Invalid("partner_id is required")
        get_partner(conn, partner_id)
    else:
        if partner_id is not None and partner_id != scope.partner_id:
            raise Forbidden("a client key can only create keys for its own partner")
        partner_id = scope.partner_id
        expires_at = _client_expiry(conn, scope, expires_at)
    if expires_at is not None and expires_at <= iso(utcnow()):
        raise Invalid("expires_at must be in the future")
    token = "pd_" + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    conn.execute("INSERT INTO api_keys (id, partner_id, name, token_hash, expires_at, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                 (key_id, partner_id, name, hash_token(token), expires_at, iso(utcnow())))
    key = get_key(conn, scope, key_id)
    audit(conn, scope, "key.create", key_id, None,
          {"partner_id": partner_id, "name": name, "expires_at": expires_at}, always=True)
    return key, token


def revoke_key(conn: sqlite3.Connection, scope: Scope, ref: str) -> ApiKey:
    """Revoke a key (kept for the audit trail, never usable again)."""
    key = get_key(conn, scope, ref)
    if key.revoked_at is None:
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                     (iso(utcnow()), key.id))
        audit(conn, scope, "key.revoke", key.id, None, None, always=True)
    return get_key(conn, scope, key.id)


def usage(conn: sqlite3.Connection, partner_id: int) -> dict[str, Any]:
    """A partner's use against each quota."""
    partner = get_partner(conn, partner_id)
    domains = conn.execute("SELECT count(*) FROM domains WHERE partner_id = ?",
                           (partner_id,)).fetchone()[0]
    mailboxes = conn.execute("SELECT count(*) FROM mailboxes m JOIN domains d ON d.id = "
                             "m.domain_id WHERE d.partner_id = ?", (partner_id,)).fetchone()[0]
    aliases = conn.execute("SELECT count(*) FROM aliases a JOIN domains d ON d.id = a.domain_id "
                           "WHERE d.partner_id = ?", (partner_id,)).fetchone()[0]
    return {"domains": {"used": domains, "max": partner.max_domains},
            "mailboxes": {"used": mailboxes, "max_per_domain": partner.max_mailboxes_per_domain},
            "aliases": {"used": aliases, "max_per_mailbox": partner.max_aliases_per_mailbox}}


def parse_expiry(value: object) -> str | None:
    """Validate an ISO-8601 expiry in the future and return it normalised to UTC text."""
    if value is None:
        return None
    try:
        moment = parse_iso(value)  # type: ignore[arg-type]
        text = iso(moment)
    except (ValueError, OverflowError):
        raise Invalid("expires_at must be an ISO-8601 time") from None
    if moment <= utcnow():
        raise Invalid("expires_at must be in the future")
    return text
