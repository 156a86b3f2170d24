"""conf/postfix sqlite: map files, queried with the real `postmap -q` against schema.sql.

Postfix resolves virtual aliases as virtual(5) describes: `user@domain` first, then the
catch-all `@domain`, stopping at the first hit. `resolve_alias` replays that order, so the
catch-all tests prove what Postfix itself would deliver to.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_harness import CONF_POSTFIX, MAP_FILES, render_map_file, write_config_file

pytestmark = pytest.mark.postfix

SCHEMA = CONF_POSTFIX.parent.parent / "schema.sql"
NOW = "2026-11-24T12:00:00Z"


# -- rows through plain SQL; to be replaced by the store's factories ------------------------

def add_domain(db: sqlite3.Connection, name: str, *, status: str = "active") -> int:
    """Insert a domain and return its id."""
    cur = db.execute("INSERT INTO domains (name, status, out_tier, created_at, updated_at) "
                     "VALUES (?, ?, 'standard', ?, ?)", (name, status, NOW, NOW))
    return int(cur.lastrowid or 0)


def add_mailbox(db: sqlite3.Connection, email: str, *, active: bool = True) -> None:
    """Insert a mailbox into its (existing) domain."""
    local, domain = email.split("@")
    db.execute("INSERT INTO mailboxes (domain_id, local_part, email, password_hash, active, "
               "created_at, updated_at) SELECT id, ?, ?, '{BLF-CRYPT}x', ?, ?, ? "
               "FROM domains WHERE name = ?", (local, email, int(active), NOW, NOW, domain))


def add_alias(db: sqlite3.Connection, source: str, *destinations: str) -> None:
    """Insert an alias ('a@domain' or catch-all '@domain') with its ordered destinations."""
    domain = source.split("@")[1]
    cur = db.execute("INSERT INTO aliases (domain_id, source, created_at, updated_at) "
                     "SELECT id, ?, ?, ? FROM domains WHERE name = ?", (source, NOW, NOW, domain))
    db.executemany("INSERT INTO alias_destinations (alias_id, position, address) VALUES (?, ?, ?)",
                   [(cur.lastrowid, pos, addr) for pos, addr in enumerate(destinations)])


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "policyd.sqlite3", isolation_level=None)
    conn.executescript(SCHEMA.read_text())
    yield conn
    conn.close()


@pytest.fixture
def maps(tmp_path: Path, db: sqlite3.Connection) -> Path:
    """A config dir with a minimal main.cf (postmap reads one) and the three map files."""
    if shutil.which("postmap") is None:
        pytest.skip("postmap is not installed")
    confdir = tmp_path / "etc"
    confdir.mkdir()
    write_config_file(confdir / "main.cf", "compatibility_level = 3.6\n")
    for name in MAP_FILES.values():
        write_config_file(confdir / name, render_map_file(name, tmp_path / "policyd.sqlite3"))
    return confdir


def lookup(confdir: Path, map_name: str, key: str) -> str | None:
    """`postmap -q KEY sqlite:FILE`: the result, or None when the key is not found."""
    done = subprocess.run(
        ["postmap", "-c", str(confdir), "-q", key, f"sqlite:{confdir / MAP_FILES[map_name]}"],
        capture_output=True, text=True, timeout=30)
    # Exit 1 means "not found" only without a message; a fatal error also exits 1.
    assert done.stderr == "", done.stderr
    assert done.returncode in (0, 1), done.returncode
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def resolve_alias(confdir: Path, address: str) -> str | None:
    """What virtual_alias_maps gives for an address: user@domain first, then @domain."""
    found = lookup(confdir, "virtual_alias_maps", address)
    if found is None:
        found = lookup(confdir, "virtual_alias_maps", "@" + address.split("@")[1])
    return found


# -- tests -----------------------------------------------------------------------------------

def test_hosted_domain_is_found_and_unhosted_is_not(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    assert lookup(maps, "virtual_mailbox_domains", "example.com") == "example.com"
    assert lookup(maps, "virtual_mailbox_domains", "EXAMPLE.com") == "example.com"
    assert lookup(maps, "virtual_mailbox_domains", "example.org") is None
    assert lookup(maps, "virtual_mailbox_domains", "sub.example.com") is None


def test_suspended_domain_is_still_listed(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "frozen.example", status="suspended")
    add_mailbox(db, "user@frozen.example")
    assert lookup(maps, "virtual_mailbox_domains", "frozen.example") == "frozen.example"
    assert lookup(maps, "virtual_mailbox_maps", "user@frozen.example") is not None


def test_mailbox_maps_to_its_maildir_relative_to_the_base(maps: Path,
                                                         db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_mailbox(db, "user@example.com")
    assert lookup(maps, "virtual_mailbox_maps", "user@example.com") == "example.com/user/Maildir/"
    assert lookup(maps, "virtual_mailbox_maps", "nobody@example.com") is None
    assert lookup(maps, "virtual_mailbox_maps", "@example.com") is None


def test_alias_expands_to_all_its_destinations(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_alias(db, "team@example.com", "a@example.com", "b@example.org", "c@example.net")
    result = lookup(maps, "virtual_alias_maps", "team@example.com")
    assert result is not None
    assert sorted(result.split(",")) == ["a@example.com", "b@example.org", "c@example.net"]


def test_catch_all_takes_unknown_addresses_but_never_a_mailbox(maps: Path,
                                                               db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_mailbox(db, "user@example.com")
    add_mailbox(db, "boss@example.com")
    add_alias(db, "@example.com", "boss@example.com")
    assert resolve_alias(maps, "nobody@example.com") == "boss@example.com"
    assert resolve_alias(maps, "user@example.com") == "user@example.com"
    assert resolve_alias(maps, "boss@example.com") == "boss@example.com"


def test_alias_on_a_mailbox_address_keeps_a_copy_in_the_mailbox(maps: Path,
                                                               db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_mailbox(db, "user@example.com")
    add_alias(db, "user@example.com", "archive@example.org")
    result = resolve_alias(maps, "user@example.com")
    assert result is not None
    assert sorted(result.split(",")) == ["archive@example.org", "user@example.com"]


def test_inactive_mailbox_is_not_served(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_mailbox(db, "gone@example.com", active=False)
    assert lookup(maps, "virtual_mailbox_maps", "gone@example.com") is None
    assert lookup(maps, "virtual_alias_maps", "gone@example.com") is None


def test_inactive_mailbox_falls_to_the_catch_all(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    add_mailbox(db, "gone@example.com", active=False)
    add_mailbox(db, "boss@example.com")
    add_alias(db, "@example.com", "boss@example.com")
    assert resolve_alias(maps, "gone@example.com") == "boss@example.com"


def test_quote_in_the_key_is_escaped_not_injected(maps: Path, db: sqlite3.Connection) -> None:
    add_domain(db, "example.com")
    assert lookup(maps, "virtual_mailbox_domains", "x' OR '1'='1") is None
