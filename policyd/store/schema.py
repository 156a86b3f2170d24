"""Create or migrate a database to schema.sql, the one source of truth.

The migration is declarative: the live schema is compared with a fresh in-memory database built
from schema.sql. Missing tables, indexes and views are created; a table whose definition changed
is rebuilt with SQLite's documented 12-step procedure (https://sqlite.org/lang_altertable.html),
copying every column the two versions share, so an upgrade never loses data.
PRAGMA user_version records the schema version that was applied.
"""
from __future__ import annotations

import logging
import re
import sqlite3
from importlib import resources

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_COMMENT = re.compile(r"--[^\n]*")
_SPACE = re.compile(r"\s+")
_QUOTED_NAME = re.compile(r'^(CREATE \w+) "([^"]+)"')  # ALTER TABLE RENAME quotes the name


def schema_sql() -> str:
    """The text of schema.sql shipped with the package."""
    return resources.files("policyd").joinpath("schema.sql").read_text(encoding="utf-8")


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database (a cheap proof that it can be read)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _normal(sql: str | None) -> str:
    text = _SPACE.sub(" ", _COMMENT.sub("", sql or "")).strip()
    return _QUOTED_NAME.sub(r"\1 \2", text)


def objects(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """(type, name) -> normalised SQL of every schema object but SQLite's own and
    Litestream's (`_litestream_seq`, `_litestream_lock`: its bookkeeping in a replicated
    database, never ours to warn about, migrate or drop)."""
    rows = conn.execute(
        "SELECT type, name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' "
        "AND name NOT LIKE '\\_litestream\\_%' ESCAPE '\\' AND sql IS NOT NULL").fetchall()
    return {(kind, name): _normal(sql) for kind, name, sql in rows}


def _fresh() -> sqlite3.Connection:
    fresh = sqlite3.connect(":memory:")
    fresh.executescript(schema_sql())
    return fresh


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]


def _rebuild(conn: sqlite3.Connection, fresh: sqlite3.Connection, table: str) -> None:
    sql = fresh.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?",
                        (table,)).fetchone()[0]
    temp = f"_new_{table}"
    conn.execute(sql.replace(f"CREATE TABLE {table}", f'CREATE TABLE "{temp}"', 1))
    shared = [c for c in _columns(fresh, table) if c in set(_columns(conn, table))]
    cols = ", ".join(f'"{c}"' for c in shared)
    conn.execute(f'INSERT INTO "{temp}" ({cols}) SELECT {cols} FROM "{table}"')
    conn.execute(f'DROP TABLE "{table}"')
    conn.execute(f'ALTER TABLE "{temp}" RENAME TO "{table}"')
    log.info("migrated table %s (kept columns: %s)", table, ", ".join(shared))


def _plan(conn: sqlite3.Connection, fresh: sqlite3.Connection) -> tuple[list[str], bool]:
    want, have = objects(fresh), objects(conn)
    changed = [name for (kind, name), sql in want.items()
               if kind == "table" and (kind, name) in have and have[(kind, name)] != sql]
    return changed, want != have


def migrate(conn: sqlite3.Connection) -> bool:
    """Bring conn's schema to schema.sql; return True when anything changed."""
    fresh = _fresh()
    try:
        changed, differs = _plan(conn, fresh)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not differs and version == SCHEMA_VERSION:
            return False
        conn.execute("PRAGMA foreign_keys=OFF")  # must be set outside the transaction
        try:
            conn.execute("BEGIN IMMEDIATE")
            changed, differs = _plan(conn, fresh)  # again, now that we hold the write lock
            _apply(conn, fresh, changed)
            problems = conn.execute("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise sqlite3.IntegrityError(f"foreign key check failed: {problems[:3]}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA foreign_keys=ON")
        log.info("database schema at version %d", SCHEMA_VERSION)
        return True
    finally:
        fresh.close()


def _apply(conn: sqlite3.Connection, fresh: sqlite3.Connection, changed: list[str]) -> None:
    want = objects(fresh)
    # Views and indexes are dropped and recreated around table rebuilds: a rename must never
    # see a view that points at a table that is being replaced.
    for (kind, name) in list(objects(conn)):
        if kind in ("view", "trigger") or (kind == "index" and want.get((kind, name)) !=
                                            objects(conn).get((kind, name))):
            conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
    for table in changed:
        _rebuild(conn, fresh, table)
    have = objects(conn)
    ordered = sorted(want.items(), key=lambda item: ("table", "index", "view", "trigger")
                     .index(item[0][0]))
    for (kind, name), _sql in ordered:
        if (kind, name) not in have:
            sql = fresh.execute("SELECT sql FROM sqlite_master WHERE type=? AND name=?",
                                (kind, name)).fetchone()[0]
            conn.execute(sql)
    for (kind, name) in set(objects(conn)) - set(want):
        if kind == "table":
            log.warning("table %s is not in schema.sql; left in place", name)
        else:
            conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
