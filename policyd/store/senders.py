"""Senders (SPEC §9): the hosted mailbox a SASL login names, its own limits, its lock, and
its hour and day counters. The policy hot path reads LoginFound rows and adds counts here in
its batch transaction; the API reads and changes a sender through its mailbox's scope."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Iterable

from policyd.errors import Forbidden
from policyd.policy import COUNTER_MAX
from policyd.store import outbox
from policyd.store.changes import audit, record_change
from policyd.store.counters import saturating_sum
from policyd.store.mailboxes import Mailbox, get_mailbox
from policyd.store.scope import Scope
from policyd.timeutil import iso, utcnow

SYSTEM = Scope(actor="system:senders")  # who locks a login seen from too many addresses

@dataclass(frozen=True, slots=True)
class LoginFound:
    """A hosted login as stored: its own limits (None = the [senders] default), lock, the
    epoch its address memory starts at (its creation or last unlock), and its counts."""

    mailbox_id: int
    email: str
    partner_id: int | None
    domain: str
    hourly_limit: int | None
    daily_limit: int | None
    locked: bool
    epoch: str
    sent_hour: int
    sent_today: int

    def counted(self, n: int) -> LoginFound:
        """The same login with n more messages this hour and today (built positionally:
        dataclasses.replace is five times slower, and this runs per login per batch)."""
        return LoginFound(self.mailbox_id, self.email, self.partner_id, self.domain,
                          self.hourly_limit, self.daily_limit, self.locked, self.epoch,
                          self.sent_hour + n, self.sent_today + n)


# What the hot path reads of a login: LoginFound's field -> SQL expression. The SELECT lists
# them in the dataclass's field order, so a row builds a LoginFound positionally, whatever
# the order written here (checked at import).
_LOGIN_SQL = {
    "mailbox_id": "m.id", "email": "m.email", "partner_id": "d.partner_id",
    "domain": "d.name", "hourly_limit": "s.hourly_limit", "daily_limit": "s.daily_limit",
    "locked": "coalesce(s.status = 'locked', 0)",
    # addresses seen before its last unlock, or before the mailbox was (re)created, are void
    "epoch": "m.created_at || '|' || coalesce(s.unlocked_at, '')",
    "sent_hour": "coalesce(ch.sent, 0)", "sent_today": "coalesce(cd.sent, 0)",
}
_FIELDS = [f.name for f in fields(LoginFound)]
assert sorted(_FIELDS) == sorted(_LOGIN_SQL), "every LoginFound field has its SQL"
_LOGINS = (
    "SELECT " + ", ".join(_LOGIN_SQL[name] for name in _FIELDS) +
    " FROM json_each(?3) AS names "
    "JOIN mailboxes m ON m.email = names.value JOIN domains d ON d.id = m.domain_id "
    "LEFT JOIN senders s ON s.mailbox_id = m.id "
    "LEFT JOIN sender_counters ch ON ch.mailbox_id = m.id AND ch.kind = 'hour' "
    "AND ch.period = ?1 "
    "LEFT JOIN sender_counters cd ON cd.mailbox_id = m.id AND cd.kind = 'day' "
    "AND cd.period = ?2")


def logins(conn: sqlite3.Connection, emails: Iterable[str], hour: str,
           day: str) -> dict[str, LoginFound]:
    """The hosted logins among emails (normalised addresses); the others are left out."""
    rows = conn.execute(_LOGINS, (hour, day, json.dumps(list(emails)))).fetchall()
    found = (LoginFound(*r) for r in rows)  # columns in field order (see _LOGINS)
    return {login.email: login for login in found}


_UPSERT = (" ON CONFLICT (mailbox_id, kind, period) DO UPDATE SET "
           f"sent = {saturating_sum('sent', 'excluded.sent')}")
MAX_VALUES_LOGINS = 128  # more logins than this in one batch: one statement per chunk


@lru_cache(maxsize=MAX_VALUES_LOGINS)
def _add_values(count: int) -> str:
    rows = ", ".join(["(?, 'hour', ?, ?), (?, 'day', ?, ?)"] * count)
    return f"INSERT INTO sender_counters (mailbox_id, kind, period, sent) VALUES {rows}{_UPSERT}"


def add_counts(conn: sqlite3.Connection, counts: list[tuple[int, str, str, int]]) -> None:
    """Add (mailbox id, hour, day, messages) to the hour and day counters of several logins
    (held at COUNTER_MAX, as the domain counters are)."""
    for start in range(0, len(counts), MAX_VALUES_LOGINS):
        chunk = counts[start:start + MAX_VALUES_LOGINS]
        params: list[Any] = []
        for mailbox_id, hour, day, sent in chunk:
            sent = min(sent, COUNTER_MAX)
            params += (mailbox_id, hour, sent, mailbox_id, day, sent)
        conn.execute(_add_values(len(chunk)), params)


def close_ended_days(conn: sqlite3.Connection, today: str) -> int:
    """Delete the hour and day counters of ended days (nothing reads them again; the
    running day's ended hours go with it at its end)."""
    return conn.execute("DELETE FROM sender_counters WHERE period < ?", (today,)).rowcount


# --- locks -------------------------------------------------------------------------------

def lock(conn: sqlite3.Connection, scope: Scope, mailbox_id: int, reason: str,
         now: str) -> bool:
    """Lock a login (audited, the partner notified through the outbox); False when it was
    locked already."""
    mailbox = _mailbox_by_id(conn, mailbox_id)
    if mailbox is None or _settings(conn, mailbox_id)["status"] == "locked":
        return False
    _ensure_row(conn, mailbox_id, now)
    conn.execute("UPDATE senders SET status = 'locked', locked_reason = ?, locked_by = ?, "
                 "locked_at = ?, updated_at = ? WHERE mailbox_id = ?",
                 (reason, scope.actor, now, now, mailbox_id))
    email, domain, partner_id = mailbox
    record_change(conn, partner_id, "updated", "mailbox", email)
    audit(conn, scope, "sender.lock", email, {"status": "active"},
          {"status": "locked", "reason": reason}, always=True)
    outbox.enqueue(conn, partner_id, "sender_locked", email=email, domain=domain,
                   reason=reason, at=now)
    return True


def _mailbox_by_id(conn: sqlite3.Connection,
                   mailbox_id: int) -> tuple[str, str, int | None] | None:
    row = conn.execute("SELECT m.email, d.name, d.partner_id FROM mailboxes m "
                       "JOIN domains d ON d.id = m.domain_id WHERE m.id = ?",
                       (mailbox_id,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _ensure_row(conn: sqlite3.Connection, mailbox_id: int, now: str) -> None:
    conn.execute("INSERT INTO senders (mailbox_id, updated_at) VALUES (?, ?) "
                 "ON CONFLICT DO NOTHING", (mailbox_id, now))


_SETTINGS = ("hourly_limit", "daily_limit", "status", "locked_reason", "locked_by",
             "locked_at", "unlocked_at")


def _settings(conn: sqlite3.Connection, mailbox_id: int) -> dict[str, Any]:
    row = conn.execute(f"SELECT {', '.join(_SETTINGS)} FROM senders WHERE mailbox_id = ?",
                       (mailbox_id,)).fetchone()
    if row is None:
        return {"hourly_limit": None, "daily_limit": None, "status": "active",
                "locked_reason": None, "locked_by": None, "locked_at": None,
                "unlocked_at": None}
    return dict(zip(_SETTINGS, row))


# --- the API's view ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sender:
    """A mailbox as a sender: its own limits (None = the default), lock and use."""

    mailbox: Mailbox
    hourly_limit: int | None
    daily_limit: int | None
    status: str
    locked_reason: str | None
    locked_by: str | None
    locked_at: str | None
    sent_hour: int
    sent_today: int


def get_sender(conn: sqlite3.Connection, scope: Scope, email: str, hour: str,
               day: str) -> Sender:
    """The sender behind a mailbox scope may see, else NotFound."""
    mailbox = get_mailbox(conn, scope, email)
    settings = _settings(conn, mailbox.id)
    counts = dict(conn.execute(
        "SELECT kind, sent FROM sender_counters WHERE mailbox_id = ? AND "
        "((kind = 'hour' AND period = ?) OR (kind = 'day' AND period = ?))",
        (mailbox.id, hour, day)).fetchall())
    return Sender(mailbox, settings["hourly_limit"], settings["daily_limit"],
                  settings["status"], settings["locked_reason"], settings["locked_by"],
                  settings["locked_at"], counts.get("hour", 0), counts.get("day", 0))


_KEEP: Any = object()


def update_sender(conn: sqlite3.Connection, scope: Scope, email: str, hour: str, day: str, *,
                  hourly_limit: int | None = _KEEP, daily_limit: int | None = _KEEP,
                  status: str | None = None) -> Sender:
    """Set a login's own limits (None: back to the default) and lock or unlock it by hand;
    unlocking forgets the addresses seen. Audited when the master changes it; a lock is
    always audited and notified. A lock the master made only the master lifts."""
    sender = get_sender(conn, scope, email, hour, day)
    now = iso(utcnow())
    limits = {k: v for k, v in (("hourly_limit", hourly_limit), ("daily_limit", daily_limit))
              if v is not _KEEP and v != getattr(sender, k)}
    if limits:
        _ensure_row(conn, sender.mailbox.id, now)
        sets = ", ".join(f"{k} = ?" for k in limits)
        conn.execute(f"UPDATE senders SET {sets}, updated_at = ? WHERE mailbox_id = ?",
                     (*limits.values(), now, sender.mailbox.id))
        record_change(conn, sender.mailbox.partner_id, "updated", "mailbox", email)
        audit(conn, scope, "sender.limits", email,
              {k: getattr(sender, k) for k in limits}, limits)
    if status == "locked":
        lock(conn, scope, sender.mailbox.id, "manual", now)
    elif status == "active" and sender.status == "locked":
        _unlock(conn, scope, sender, now)
    return get_sender(conn, scope, email, hour, day)


def _unlock(conn: sqlite3.Connection, scope: Scope, sender: Sender, now: str) -> None:
    if not scope.is_master and sender.locked_by == "master":
        raise Forbidden(f"sender {sender.mailbox.email} was locked by the platform; only "
                        "the master can unlock it")
    conn.execute("UPDATE senders SET status = 'active', locked_reason = NULL, "
                 "locked_by = NULL, locked_at = NULL, unlocked_at = ?, updated_at = ? "
                 "WHERE mailbox_id = ?", (now, now, sender.mailbox.id))
    record_change(conn, sender.mailbox.partner_id, "updated", "mailbox", sender.mailbox.email)
    audit(conn, scope, "sender.unlock", sender.mailbox.email,
          {"status": "locked", "reason": sender.locked_reason}, {"status": "active"},
          always=True)


@dataclass(frozen=True, slots=True)
class SenderUse:
    """One line of a domain's senders list."""

    email: str
    sent_hour: int
    sent_today: int
    status: str


def domain_senders(conn: sqlite3.Connection, domain_id: int, hour: str, day: str,
                   limit: int, offset: int) -> list[SenderUse]:
    """The domain's mailboxes that sent today or are locked, most sent first."""
    rows = conn.execute(
        "SELECT m.email, coalesce(ch.sent, 0), coalesce(cd.sent, 0), "
        "coalesce(s.status, 'active') FROM mailboxes m "
        "LEFT JOIN senders s ON s.mailbox_id = m.id "
        "LEFT JOIN sender_counters ch ON ch.mailbox_id = m.id AND ch.kind = 'hour' "
        "AND ch.period = ? "
        "LEFT JOIN sender_counters cd ON cd.mailbox_id = m.id AND cd.kind = 'day' "
        "AND cd.period = ? "
        "WHERE m.domain_id = ? AND (cd.sent > 0 OR s.status = 'locked') "
        "ORDER BY coalesce(cd.sent, 0) DESC, m.email LIMIT ? OFFSET ?",
        (hour, day, domain_id, limit, offset)).fetchall()
    return [SenderUse(*r) for r in rows]
