"""Mailboxes and aliases, scoped through the domain they belong to."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd.errors import Exists, NotFound, QuotaExceeded
from policyd.store.changes import audit, record_change
from policyd.store.domains import Domain, get_domain
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

_MAILBOX = ("SELECT m.id, m.email, m.local_part, d.name, d.partner_id, m.name, m.quota_bytes, "
            "m.used_bytes, m.active, m.created_at, m.updated_at "
            "FROM mailboxes m JOIN domains d ON d.id = m.domain_id")


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: int
    email: str
    local_part: str
    domain: str
    partner_id: int | None
    name: str | None
    quota_bytes: int | None
    used_bytes: int | None
    active: bool
    created_at: str
    updated_at: str


def _mailbox(r: tuple[Any, ...]) -> Mailbox:
    return Mailbox(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9], r[10])


def get_mailbox(conn: sqlite3.Connection, scope: Scope, email: str) -> Mailbox:
    """The mailbox if scope may see it, else NotFound."""
    cond, params = scope.where("d.partner_id")
    row = conn.execute(f"{_MAILBOX} WHERE m.email = ? AND {cond}", (email, *params)).fetchone()
    if row is None:
        raise NotFound(f"mailbox {email} not found")
    return _mailbox(row)


def list_mailboxes(conn: sqlite3.Connection, scope: Scope, domain: str | None, limit: int,
                   offset: int) -> list[Mailbox]:
    """Mailboxes scope may see, optionally of one domain."""
    cond, params = scope.where("d.partner_id")
    extra, extra_params = ("AND d.name = ?", (domain,)) if domain else ("", ())
    rows = conn.execute(f"{_MAILBOX} WHERE {cond} {extra} ORDER BY m.email LIMIT ? OFFSET ?",
                        (*params, *extra_params, limit, offset)).fetchall()
    return [_mailbox(r) for r in rows]


def _check_mailbox_quota(conn: sqlite3.Connection, domain: Domain) -> None:
    if domain.partner_id is None:
        return
    row = conn.execute("SELECT max_mailboxes_per_domain FROM partners WHERE id = ?",
                       (domain.partner_id,)).fetchone()
    if row and row[0] is not None:
        used = conn.execute("SELECT count(*) FROM mailboxes WHERE domain_id = ?",
                            (domain.id,)).fetchone()[0]
        if used >= row[0]:
            raise QuotaExceeded(f"max_mailboxes_per_domain reached for {domain.name} "
                                f"({used} of {row[0]})")


def create_mailbox(conn: sqlite3.Connection, scope: Scope, local: str, domain_name: str,
                   fields: dict[str, Any]) -> Mailbox:
    """Create a mailbox; fields holds password_hash, name, quota_bytes, active."""
    domain = get_domain(conn, scope, domain_name)
    address = f"{local}@{domain.name}"
    if conn.execute("SELECT 1 FROM mailboxes WHERE email = ?", (address,)).fetchone():
        raise Exists(f"mailbox {address} already exists")
    _check_mailbox_quota(conn, domain)
    now = iso(utcnow())
    conn.execute(
        "INSERT INTO mailboxes (domain_id, local_part, email, password_hash, name, quota_bytes, "
        "active, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (domain.id, local, address, fields["password_hash"], fields.get("name"),
         fields.get("quota_bytes"), int(fields.get("active", True)), now, now))
    record_change(conn, domain.partner_id, "created", "mailbox", address)
    created = get_mailbox(conn, scope, address)
    audit(conn, scope, "mailbox.create", address, None, _audit_view(created))
    return created


def update_mailbox(conn: sqlite3.Connection, scope: Scope, email: str,
                   fields: dict[str, Any]) -> Mailbox:
    """Partial update of password_hash, name, quota_bytes, active."""
    mailbox = get_mailbox(conn, scope, email)
    if not fields:
        return mailbox
    columns = {k: (int(v) if k == "active" else v) for k, v in fields.items()}
    sets = ", ".join(f"{column} = ?" for column in columns)
    conn.execute(f"UPDATE mailboxes SET {sets}, updated_at = ? WHERE id = ?",
                 (*columns.values(), iso(utcnow()), mailbox.id))
    record_change(conn, mailbox.partner_id, "updated", "mailbox", email)
    updated = get_mailbox(conn, scope, email)
    before, after = _audit_view(mailbox), _audit_view(updated)
    if "password_hash" in fields:  # never the hash itself: only that it changed
        before["password"], after["password"] = "old", "changed"
    audit(conn, scope, "mailbox.update", email, before, after)
    return updated


def _audit_view(m: Mailbox) -> dict[str, Any]:
    """What the audit log keeps of a mailbox (never its password hash)."""
    return {"name": m.name, "quota_bytes": m.quota_bytes, "active": m.active}


def delete_mailbox(conn: sqlite3.Connection, scope: Scope, email: str) -> None:
    """Delete a mailbox."""
    mailbox = get_mailbox(conn, scope, email)
    conn.execute("DELETE FROM mailboxes WHERE id = ?", (mailbox.id,))
    record_change(conn, mailbox.partner_id, "deleted", "mailbox", email)
    audit(conn, scope, "mailbox.delete", email, _audit_view(mailbox), None)


@dataclass(frozen=True, slots=True)
class Alias:
    id: int
    source: str
    domain: str
    partner_id: int | None
    destinations: tuple[str, ...]
    created_at: str

    @property
    def catch_all(self) -> bool:
        """True for '@domain' sources."""
        return self.source.startswith("@")


_ALIAS = ("SELECT a.id, a.source, d.name, d.partner_id, a.created_at, "
          "(SELECT group_concat(address, char(10)) FROM (SELECT address FROM alias_destinations "
          " WHERE alias_id = a.id ORDER BY position)) "
          "FROM aliases a JOIN domains d ON d.id = a.domain_id")


def _alias(r: tuple[Any, ...]) -> Alias:
    return Alias(r[0], r[1], r[2], r[3], tuple((r[5] or "").split("\n")), r[4])


def get_alias(conn: sqlite3.Connection, scope: Scope, source: str) -> Alias:
    """The alias if scope may see it, else NotFound."""
    cond, params = scope.where("d.partner_id")
    row = conn.execute(f"{_ALIAS} WHERE a.source = ? AND {cond}", (source, *params)).fetchone()
    if row is None:
        raise NotFound(f"alias {source} not found")
    return _alias(row)


def list_aliases(conn: sqlite3.Connection, scope: Scope, domain: str | None, limit: int,
                 offset: int) -> list[Alias]:
    """Aliases scope may see, optionally of one domain."""
    cond, params = scope.where("d.partner_id")
    extra, extra_params = ("AND d.name = ?", (domain,)) if domain else ("", ())
    rows = conn.execute(f"{_ALIAS} WHERE {cond} {extra} ORDER BY a.source LIMIT ? OFFSET ?",
                        (*params, *extra_params, limit, offset)).fetchall()
    return [_alias(r) for r in rows]


def _check_alias_quota(conn: sqlite3.Connection, domain: Domain,
                       destinations: tuple[str, ...]) -> None:
    """max_aliases_per_mailbox, for each destination that is a mailbox of the same partner."""
    # Only the partner's own mailboxes and aliases count: another tenant's mailbox is an outside
    # address here (a 403 naming it would reveal that it exists), and another tenant's aliases
    # never use up this partner's quota.
    if domain.partner_id is None:
        return
    row = conn.execute("SELECT max_aliases_per_mailbox FROM partners WHERE id = ?",
                       (domain.partner_id,)).fetchone()
    if not row or row[0] is None:
        return
    for address in destinations:
        if not conn.execute("SELECT 1 FROM mailboxes m JOIN domains d ON d.id = m.domain_id "
                            "WHERE m.email = ? AND d.partner_id = ?",
                            (address, domain.partner_id)).fetchone():
            continue
        used = conn.execute(
            "SELECT count(DISTINCT t.alias_id) FROM alias_destinations t "
            "JOIN aliases a ON a.id = t.alias_id JOIN domains d ON d.id = a.domain_id "
            "WHERE t.address = ? AND d.partner_id = ?", (address, domain.partner_id)).fetchone()[0]
        if used >= row[0]:
            raise QuotaExceeded(f"max_aliases_per_mailbox reached for {address} "
                                f"({used} of {row[0]})")


def create_alias(conn: sqlite3.Connection, scope: Scope, source: str, domain_name: str,
                 destinations: tuple[str, ...]) -> Alias:
    """Create an alias or catch-all with its destinations."""
    domain = get_domain(conn, scope, domain_name)
    if conn.execute("SELECT 1 FROM aliases WHERE source = ?", (source,)).fetchone():
        raise Exists(f"alias {source} already exists")
    _check_alias_quota(conn, domain, destinations)
    now = iso(utcnow())
    alias_id = conn.execute(
        "INSERT INTO aliases (domain_id, source, created_at, updated_at) VALUES (?, ?, ?, ?)",
        (domain.id, source, now, now)).lastrowid
    conn.executemany("INSERT INTO alias_destinations (alias_id, position, address) "
                     "VALUES (?, ?, ?)",
                     [(alias_id, i, address) for i, address in enumerate(destinations)])
    record_change(conn, domain.partner_id, "created", "alias", source)
    audit(conn, scope, "alias.create", source, None, {"destinations": list(destinations)})
    return get_alias(conn, scope, source)


def delete_alias(conn: sqlite3.Connection, scope: Scope, source: str) -> None:
    """Delete an alias."""
    alias = get_alias(conn, scope, source)
    conn.execute("DELETE FROM aliases WHERE id = ?", (alias.id,))
    record_change(conn, alias.partner_id, "deleted", "alias", source)
    audit(conn, scope, "alias.delete", source, {"destinations": list(alias.destinations)}, None)
