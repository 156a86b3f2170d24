"""The change feed (delta sync) and the audit log, written inside the changing transaction."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow


def record_change(conn: sqlite3.Connection, partner_id: int | None, op: str, kind: str,
                  key: str) -> None:
    """Append one entry to the change feed."""
    conn.execute("INSERT INTO changes (partner_id, op, kind, key, at) VALUES (?, ?, ?, ?, ?)",
                 (partner_id, op, kind, key, iso(utcnow())))


def audit(conn: sqlite3.Connection, scope: Scope, action: str, target: str | None,
          before: Any = None, after: Any = None, *, always: bool = False) -> None:
    """Write an audit entry for a master change (or always=True, e.g. key creation)."""
    if not (scope.is_master or always):
        return
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, target, before, after) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (iso(utcnow()), scope.actor, action, target,
         None if before is None else json.dumps(before, sort_keys=True),
         None if after is None else json.dumps(after, sort_keys=True)))


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed; seq is its cursor."""

    seq: int
    op: str
    kind: str
    key: str
    at: str


def changes_since(conn: sqlite3.Connection, scope: Scope, after_seq: int,
                  limit: int) -> list[Change]:
    """Changes visible to scope with seq > after_seq, oldest first."""
    cond, params = scope.where()
    rows = conn.execute(
        f"SELECT seq, op, kind, key, at FROM changes WHERE seq > ? AND {cond} "
        "ORDER BY seq LIMIT ?", (after_seq, *params, limit)).fetchall()
    return [Change(*row) for row in rows]


def seq_before(conn: sqlite3.Connection, at: str) -> int:
    """The last seq recorded strictly before the time `at` (ISO text), 0 if none."""
    row = conn.execute("SELECT max(seq) FROM changes WHERE at < ?", (at,)).fetchone()
    return row[0] or 0


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit log entry, before/after decoded from JSON."""

    id: int
    at: str
    actor: str
    action: str
    target: str | None
    before: Any
    after: Any


def audit_entries(conn: sqlite3.Connection, target: str | None, since: str | None,
                  until: str | None, offset: int, limit: int) -> list[AuditEntry]:
    """Audit entries, oldest first, filtered by target and time."""
    sql = "SELECT id, at, actor, action, target, before, after FROM audit_log WHERE 1"
    params: list[Any] = []
    for clause, value in (("target = ?", target), ("at >= ?", since), ("at < ?", until)):
        if value is not None:
            sql += f" AND {clause}"
            params.append(value)
    rows = conn.execute(sql + " ORDER BY id LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4],
                       json.loads(r[5]) if r[5] else None,
                       json.loads(r[6]) if r[6] else None) for r in rows]
