"""Domains: the tenant-scoped rows behind /domains and the facts the policy server reads."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from typing import Any

from policyd.errors import Exists, Forbidden, Invalid, NotFound, QuotaExceeded
from policyd.policy import Sending, inherited, ses_verified
from policyd.store.changes import audit, record_change
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

_COLUMNS = (
    "d.id, d.name, d.partner_id, d.status, d.suspended_by, d.wildcard, d.ses_status, "
    "d.ses_dkim_status, d.ses_token, d.ses_dkim_tokens, d.ses_checked_at, d.out_tier, "
    "d.out_daily_limit, d.out_monthly_limit, d.out_enforcement, d.out_status, "
    "d.retention_days, d.transfer_limit_bytes, d.created_at, d.updated_at, "
    "p.name, p.ses_status, p.out_tier, p.out_daily_limit, p.out_monthly_limit, "
    "p.out_enforcement")
_FROM = "FROM domains d LEFT JOIN domains p ON p.id = d.parent_id"


@dataclass(frozen=True, slots=True)
class Parent:
    name: str
    ses_status: str
    tier: str
    daily_limit: int | None
    monthly_limit: int | None
    enforcement: str


@dataclass(frozen=True, slots=True)
class Domain:
    id: int
    name: str
    partner_id: int | None
    status: str
    suspended_by: str | None
    wildcard: bool
    ses_status: str
    ses_dkim_status: str | None
    ses_token: str | None
    ses_dkim_tokens: tuple[str, ...]
    ses_checked_at: str | None
    tier: str
    daily_limit: int | None
    monthly_limit: int | None
    enforcement: str
    out_status: str
    retention_days: int | None
    transfer_limit_bytes: int | None
    created_at: str
    updated_at: str
    parent: Parent | None

    @property
    def effective(self) -> Sending:
        """Tier, limits and enforcement it sends under (its wildcard parent's when linked)."""
        own = Sending(self.tier, self.daily_limit, self.monthly_limit, self.enforcement)
        parent = None if self.parent is None else Sending(
            self.parent.tier, self.parent.daily_limit, self.parent.monthly_limit,
            self.parent.enforcement)
        return inherited(own, parent)

    @property
    def ses_verified(self) -> bool:
        """Verified itself, or through its wildcard parent."""
        return ses_verified(self.ses_status, self.parent.ses_status if self.parent else None)


def _row(r: tuple[Any, ...]) -> Domain:
    parent = Parent(*r[20:26]) if r[20] is not None else None
    return Domain(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8],
                  tuple(json.loads(r[9] or "[]")), r[10], r[11], r[12], r[13], r[14], r[15],
                  r[16], r[17], r[18], r[19], parent)


def find_domain(conn: sqlite3.Connection, name: str) -> Domain | None:
    """The domain called name, unscoped (the policy server and internal jobs)."""
    row = conn.execute(f"SELECT {_COLUMNS} {_FROM} WHERE d.name = ?", (name,)).fetchone()
    return _row(row) if row else None


def get_domain(conn: sqlite3.Connection, scope: Scope, name: str) -> Domain:
    """The domain called name if scope may see it, else NotFound (same as missing)."""
    cond, params = scope.where("d.partner_id")
    row = conn.execute(f"SELECT {_COLUMNS} {_FROM} WHERE d.name = ? AND {cond}",
                       (name, *params)).fetchone()
    if row is None:
        raise NotFound(f"domain {name} not found")
    return _row(row)


def list_domains(conn: sqlite3.Connection, scope: Scope, limit: int,
                 offset: int) -> list[Domain]:
    """Domains scope may see, by name."""
    cond, params = scope.where("d.partner_id")
    rows = conn.execute(f"SELECT {_COLUMNS} {_FROM} WHERE {cond} ORDER BY d.name LIMIT ? OFFSET ?",
                        (*params, limit, offset)).fetchall()
    return [_row(r) for r in rows]



def _wildcard_parent(conn: sqlite3.Connection, name: str) -> tuple[int, int | None, str] | None:
    """(id, partner_id, ses_status) of the nearest existing wildcard ancestor of name."""
    labels = name.split(".")
    for i in range(1, len(labels) - 1):
        row = conn.execute("SELECT id, partner_id, ses_status FROM domains "
                           "WHERE name = ? AND wildcard = 1", (".".join(labels[i:]),)).fetchone()
        if row:
            return row
    return None


def _closest_hosted_ancestor(conn: sqlite3.Connection,
                             name: str) -> tuple[str, int | None] | None:
    """(name, partner_id) of the nearest hosted domain above name, wildcard or not."""
    labels = name.split(".")
    for i in range(1, len(labels) - 1):
        ancestor = ".".join(labels[i:])
        row = conn.execute("SELECT partner_id FROM domains WHERE name = ?",
                           (ancestor,)).fetchone()
        if row:
            return ancestor, row[0]
    return None


def _check_claim(conn: sqlite3.Connection, scope: Scope, name: str) -> None:
    """A client may create a subdomain only under its own closest hosted ancestor, or where
    none is hosted: a subdomain of another partner's domain is that partner's (SPEC §5)."""
    if scope.is_master:
        return
    ancestor = _closest_hosted_ancestor(conn, name)
    if ancestor is not None and ancestor[1] != scope.partner_id:
        raise Forbidden(f"{name} is under {ancestor[0]}, which another account hosts")


def _check_partner_quota(conn: sqlite3.Connection, partner_id: int) -> None:
    row = conn.execute("SELECT max_domains FROM partners WHERE id = ?", (partner_id,)).fetchone()
    if row is None:
        raise Invalid(f"partner {partner_id} does not exist")
    if row[0] is not None:
        used = conn.execute("SELECT count(*) FROM domains WHERE partner_id = ?",
                            (partner_id,)).fetchone()[0]
        if used >= row[0]:
            raise QuotaExceeded(f"max_domains reached ({used} of {row[0]})")


def _owner(scope: Scope, partner_id: int | None,
           parent: tuple[int, int | None, str] | None) -> int | None:
    """The new domain's partner: the client's own, the master's choice, or the parent's."""
    # the master naming no partner for a subdomain of a wildcard domain means "link it"
    if not scope.is_master:
        return scope.partner_id
    if partner_id is None and parent is not None:
        return parent[1]
    return partner_id


def create_domain(conn: sqlite3.Connection, scope: Scope, name: str, partner_id: int | None,
                  tier: str, limits: tuple[int | None, int | None]) -> Domain:
    """Create a domain (quota checked in this transaction), linking a wildcard parent."""
    if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
        raise Exists(f"domain {name} already exists")
    _check_claim(conn, scope, name)
    parent = _wildcard_parent(conn, name)
    owner = _owner(scope, partner_id, parent)
    if owner is not None:
        _check_partner_quota(conn, owner)
    # a wildcard parent of another partner is not linked: tenants never share verification
    linked = parent if parent is not None and parent[1] == owner else None
    parent_id = linked[0] if linked else None
    ses_status = "inherited" if linked and linked[2] == "success" else "not_started"
    now = iso(utcnow())
    conn.execute(
        "INSERT INTO domains (name, partner_id, parent_id, ses_status, out_tier, "
        "out_daily_limit, out_monthly_limit, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (name, owner, parent_id, ses_status, tier, limits[0], limits[1], now, now))
    record_change(conn, owner, "created", "domain", name)
    created = get_domain(conn, scope, name)
    audit(conn, scope, "domain.create", name, None, {"partner_id": owner, **_link_view(created)})
    return created


def delete_domain(conn: sqlite3.Connection, scope: Scope, name: str, force: bool) -> None:
    """Delete a domain; refused while it has mailboxes unless force (then they go too)."""
    domain = get_domain(conn, scope, name)
    mailboxes = [r[0] for r in conn.execute(
        "SELECT email FROM mailboxes WHERE domain_id = ? ORDER BY email", (domain.id,))]
    if mailboxes and not force:
        raise Exists(f"domain {name} still has {len(mailboxes)} mailboxes; "
                     "delete them or pass ?force=true")
    aliases = [r[0] for r in conn.execute(
        "SELECT source FROM aliases WHERE domain_id = ? ORDER BY source", (domain.id,))]
    _unlink_children(conn, domain.id)
    conn.execute("DELETE FROM domains WHERE id = ?", (domain.id,))
    for key in mailboxes:
        record_change(conn, domain.partner_id, "deleted", "mailbox", key)
    for key in aliases:
        record_change(conn, domain.partner_id, "deleted", "alias", key)
    record_change(conn, domain.partner_id, "deleted", "domain", name)
    audit(conn, scope, "domain.delete", name, {"mailboxes": len(mailboxes)}, None)


def _unlink_children(conn: sqlite3.Connection, parent_id: int) -> None:
    """Detach the subdomains linked to a parent about to go: they keep no borrowed SES state."""
    children = conn.execute("SELECT name, partner_id FROM domains WHERE parent_id = ? "
                            "ORDER BY name", (parent_id,)).fetchall()
    conn.execute(
        "UPDATE domains SET parent_id = NULL, updated_at = ?, ses_status = CASE ses_status "
        "WHEN 'inherited' THEN 'not_started' ELSE ses_status END WHERE parent_id = ?",
        (iso(utcnow()), parent_id))
    for name, partner_id in children:
        record_change(conn, partner_id, "updated", "domain", name)


def _update(conn: sqlite3.Connection, domain: Domain, fields: dict[str, Any]) -> None:
    if not fields:
        return
    sets = ", ".join(f"{column} = ?" for column in fields)
    conn.execute(f"UPDATE domains SET {sets}, updated_at = ? WHERE id = ?",
                 (*fields.values(), iso(utcnow()), domain.id))
    record_change(conn, domain.partner_id, "updated", "domain", domain.name)


def set_suspended(conn: sqlite3.Connection, scope: Scope, name: str, suspend: bool) -> Domain:
    """Suspend or activate; a master suspension can only be lifted by the master."""
    domain = get_domain(conn, scope, name)
    if domain.suspended_by == "master" and not scope.is_master:
        if suspend:  # already suspended, and a client must not downgrade it to its own
            return domain
        raise Forbidden(f"domain {name} was suspended by the platform; only the master "
                        "can activate it")
    fields: dict[str, Any] = (
        {"status": "suspended", "suspended_by": "master" if scope.is_master else "client"}
        if suspend else {"status": "active", "suspended_by": None})
    if domain.status == fields["status"] and domain.suspended_by == fields["suspended_by"]:
        return domain
    _update(conn, domain, fields)
    audit(conn, scope, "domain.suspend" if suspend else "domain.activate", name,
          {"status": domain.status}, {"status": fields["status"]})
    return get_domain(conn, scope, name)


def _parent_row(conn: sqlite3.Connection, domain: Domain, parent: str) -> tuple[int, str]:
    """(id, ses_status) of the domain that may become domain's parent, or an error."""
    if not domain.name.endswith("." + parent):
        raise Invalid(f"{parent} is not a parent domain of {domain.name}")
    row = conn.execute("SELECT id, partner_id, ses_status FROM domains WHERE name = ?",
                       (parent,)).fetchone()
    if row is None:
        raise NotFound(f"parent domain {parent} not found")
    if row[1] != domain.partner_id:
        raise Invalid(f"{parent} belongs to another partner than {domain.name}")
    return row[0], row[2]


def _link_fields(conn: sqlite3.Connection, domain: Domain, parent: str | None) -> dict[str, Any]:
    """The columns that link domain to parent (or unlink it), keeping ses_status truthful."""
    if parent is None:
        unlinked = "not_started" if domain.ses_status == "inherited" else domain.ses_status
        return {"parent_id": None, "ses_status": unlinked}
    parent_id, parent_ses = _parent_row(conn, domain, parent)
    inherits = domain.ses_status == "not_started" and parent_ses == "success"
    return {"parent_id": parent_id,
            "ses_status": "inherited" if inherits else domain.ses_status}


def _link_view(domain: Domain) -> dict[str, Any]:
    return {"parent": domain.parent.name if domain.parent else None,
            "wildcard": domain.wildcard}


def set_parent(conn: sqlite3.Connection, scope: Scope, name: str, parent: str | None,
               wildcard: bool | None) -> Domain:
    """Link name to a parent domain (or unlink) and set its own wildcard flag (master)."""
    domain = get_domain(conn, scope, name)
    fields = _link_fields(conn, domain, parent)
    if wildcard is not None:
        fields["wildcard"] = int(wildcard)
    _update(conn, domain, fields)
    after = get_domain(conn, scope, name)
    audit(conn, scope, "domain.parent", name, _link_view(domain), _link_view(after))
    return after


class Keep:
    """The value of an OutboundPatch field that is not to change."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


@dataclass(frozen=True, slots=True)
class OutboundPatch:
    """Outbound settings to change (validated and permitted by the caller); KEEP leaves a
    field as it is, None sets a limit to unlimited."""

    tier: str | Keep = KEEP
    daily_limit: int | None | Keep = KEEP
    monthly_limit: int | None | Keep = KEEP
    enforcement: str | Keep = KEEP
    status: str | Keep = KEEP

    def columns(self) -> dict[str, Any]:
        """The domain columns this patch sets."""
        pairs = (("out_tier", self.tier), ("out_daily_limit", self.daily_limit),
                 ("out_monthly_limit", self.monthly_limit),
                 ("out_enforcement", self.enforcement), ("out_status", self.status))
        return {column: value for column, value in pairs if value is not KEEP}


def patch_outbound(conn: sqlite3.Connection, scope: Scope, name: str,
                   patch: OutboundPatch) -> Domain:
    """Change a domain's outbound tier, limits, enforcement or status (audited)."""
    return _set(conn, scope, name, patch.columns(), "outbound.update")


def block_outbound(conn: sqlite3.Connection, scope: Scope, name: str, why: str) -> bool:
    """Block a domain's outbound mail (the guillotine); False when it was not active."""
    domain = find_domain(conn, name)
    if domain is None or domain.out_status != "active":
        return False
    _set(conn, scope, name, {"out_status": "blocked"}, why)
    return True


def set_retention(conn: sqlite3.Connection, scope: Scope, name: str,
                  days: int | None) -> Domain:
    """Keep a domain's mail for this many days (None: for ever); audited."""
    return _set(conn, scope, name, {"retention_days": days}, "domain.retention")


def set_transfer_limit(conn: sqlite3.Connection, scope: Scope, name: str,
                       limit_bytes: int | None) -> Domain:
    """Limit a domain's monthly transfer in bytes (None: unlimited); audited."""
    return _set(conn, scope, name, {"transfer_limit_bytes": limit_bytes}, "domain.transfer")


def set_wildcard(conn: sqlite3.Connection, scope: Scope, name: str, wildcard: bool) -> Domain:
    """Make a domain a wildcard parent (its new subdomains link to it) or not; audited."""
    return _set(conn, scope, name, {"wildcard": int(wildcard)}, "domain.parent")


def _set(conn: sqlite3.Connection, scope: Scope, name: str, fields: dict[str, Any],
         action: str) -> Domain:
    """Set columns of a domain and audit what changed, in this transaction; the domain after."""
    domain = get_domain(conn, scope, name)
    current = {column: getattr(domain, _ATTR.get(column, column)) for column in fields}
    changed = {c: v for c, v in fields.items() if current[c] != v}
    _update(conn, domain, changed)
    if changed:
        audit(conn, scope, action, name, {c: current[c] for c in changed}, changed)
    return get_domain(conn, scope, name)


_ATTR = {"out_tier": "tier", "out_daily_limit": "daily_limit",
         "out_monthly_limit": "monthly_limit", "out_enforcement": "enforcement",
         "out_status": "out_status"}


def set_ses(conn: sqlite3.Connection, name: str, *, status: str, dkim_status: str | None,
            token: str | None, dkim_tokens: tuple[str, ...] | None) -> tuple[Domain, Domain] | None:
    """Store SES state for a domain (unscoped, internal); returns (before, after) on change."""
    domain = find_domain(conn, name)
    if domain is None:
        return None
    new = replace(domain, ses_status=status, ses_dkim_status=dkim_status,
                  ses_token=token or domain.ses_token,
                  ses_dkim_tokens=dkim_tokens or domain.ses_dkim_tokens)
    now = iso(utcnow())
    conn.execute("UPDATE domains SET ses_checked_at = ? WHERE id = ?", (now, domain.id))
    if new == replace(domain, ses_checked_at=domain.ses_checked_at):
        return None
    _update(conn, domain, {"ses_status": new.ses_status, "ses_dkim_status": new.ses_dkim_status,
                           "ses_token": new.ses_token,
                           "ses_dkim_tokens": json.dumps(list(new.ses_dkim_tokens))})
    _inherit_to_children(conn, domain.id, status)
    return domain, find_domain(conn, name)  # type: ignore[return-value]


def _inherit_to_children(conn: sqlite3.Connection, parent_id: int, status: str) -> None:
    if status == "success":
        conn.execute("UPDATE domains SET ses_status = 'inherited' WHERE parent_id = ? "
                     "AND ses_status = 'not_started'", (parent_id,))


def pending_ses(conn: sqlite3.Connection, limit: int) -> list[str]:
    """Names of domains whose SES verification is not finished (the poller's work)."""
    rows = conn.execute(
        "SELECT name FROM domains WHERE ses_status IN ('not_started', 'pending', "
        "'temporary_failure') ORDER BY coalesce(ses_checked_at, '') , name LIMIT ?", (limit,))
    return [r[0] for r in rows]


def retention_domains(conn: sqlite3.Connection) -> list[tuple[str, int, list[str]]]:
    """(domain, retention_days, local parts) for every domain with a retention policy."""
    out = []
    for domain_id, name, days in conn.execute(
            "SELECT id, name, retention_days FROM domains WHERE retention_days IS NOT NULL "
            "ORDER BY name").fetchall():
        parts = [r[0] for r in conn.execute(
            "SELECT local_part FROM mailboxes WHERE domain_id = ? ORDER BY local_part",
            (domain_id,))]
        out.append((name, days, parts))
    return out
