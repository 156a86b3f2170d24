"""Schema creation and migration: an upgraded database equals a fresh one and keeps its data."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from policyd.store import connect, open_and_migrate
from policyd.store.schema import SCHEMA_VERSION, migrate, objects, schema_sql


def _shape(conn: sqlite3.Connection) -> dict[str, object]:
    tables = [name for (kind, name) in objects(conn) if kind == "table"]
    return {
        "objects": objects(conn),
        "columns": {t: conn.execute(f'PRAGMA table_info("{t}")').fetchall() for t in tables},
        "foreign_keys": {t: conn.execute(f'PRAGMA foreign_key_list("{t}")').fetchall()
                         for t in tables},
        "version": conn.execute("PRAGMA user_version").fetchone()[0],
    }


def _older_schema() -> str:
    """schema.sql as an earlier release might have had it: a table without two columns,
    a missing table, a missing view and a missing index."""
    sql = schema_sql()
    sql = sql.replace("    last_used_at  TEXT,\n    request_count INTEGER NOT NULL DEFAULT 0\n",
                      "    last_used_at  TEXT\n")
    sql = sql.replace("    used_bytes    INTEGER,\n", "")
    start = sql.index("CREATE TABLE IF NOT EXISTS notifications")
    sql = sql[:start] + sql[sql.index(") STRICT;", start) + len(") STRICT;"):]
    sql = sql.replace("CREATE INDEX IF NOT EXISTS notifications_due ON "
                      "notifications(delivered_at, next_attempt_at);", "")
    sql = sql.replace("CREATE INDEX IF NOT EXISTS domains_ses_status ON domains(ses_status);", "")
    return sql[:sql.index("CREATE VIEW IF NOT EXISTS dovecot_users")]


def test_fresh_database_is_created_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "fresh.sqlite3"
    open_and_migrate(path)
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(conn) is False  # nothing left to do
    strict = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND "
                          "name NOT LIKE 'sqlite_%' AND sql NOT LIKE '%STRICT%'").fetchone()[0]
    assert strict == 0


def test_migrated_database_equals_fresh_and_keeps_data(tmp_path: Path) -> None:
    old_path, fresh_path = tmp_path / "old.sqlite3", tmp_path / "fresh.sqlite3"
    old = sqlite3.connect(old_path)
    old.executescript(_older_schema())
    old.execute("INSERT INTO partners (id, name, notify_secret, created_at, updated_at) "
                "VALUES (1, 'acme', 's', 't', 't')")
    old.execute("INSERT INTO api_keys (id, partner_id, token_hash, created_at, last_used_at) "
                "VALUES ('key_1', 1, 'h', 't', 'u')")
    old.execute("INSERT INTO domains (id, name, partner_id, out_tier, created_at, updated_at) "
                "VALUES (1, 'example.com', 1, 'standard', 't', 't')")
    old.execute("INSERT INTO mailboxes (domain_id, local_part, email, password_hash, "
                "created_at, updated_at) VALUES (1, 'bob', 'bob@example.com', 'x', 't', 't')")
    old.commit()
    old.close()

    open_and_migrate(old_path)
    open_and_migrate(fresh_path)
    migrated, fresh = connect(old_path), connect(fresh_path)
    assert _shape(migrated) == _shape(fresh)
    assert migrated.execute("SELECT id, partner_id, last_used_at, request_count FROM api_keys"
                            ).fetchall() == [("key_1", 1, "u", 0)]
    assert migrated.execute("SELECT email, used_bytes FROM mailboxes").fetchall() == [
        ("bob@example.com", None)]
    assert migrated.execute("SELECT user FROM dovecot_users").fetchall() == [
        ("bob@example.com",)]
    assert migrated.execute("PRAGMA foreign_key_check").fetchall() == []
    assert migrate(migrated) is False  # the next start finds nothing to do


def test_migration_is_idempotent_and_concurrent_safe(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    open_and_migrate(path)
    before = _shape(connect(path))
    open_and_migrate(path)
    assert _shape(connect(path)) == before
