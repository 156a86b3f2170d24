"""Retention purge on real temporary maildirs, doveadm argv, and the Dovecot SQL queries."""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from policyd.retention import (
    PurgeReport,
    doveadm_expunge_args,
    maildir_path,
    maildir_root,
    purge_doveadm,
    purge_maildir,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATTERN = "/var/vmail/%d/%n/Maildir"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CUTOFF = NOW - timedelta(days=30)
OLD = int((CUTOFF - timedelta(days=1)).timestamp())
NEW = int((CUTOFF + timedelta(days=1)).timestamp())


def _pattern(tmp_path: Path) -> str:
    """A maildir pattern rooted in the test's own directory."""
    return f"{tmp_path}/vmail/%d/%n/Maildir"


def _mail(directory: Path, name: str, body: bytes = b"x" * 10, mtime: int | None = None) -> Path:
    """Write one message file (and its parents), optionally with a given mtime."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(body)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _name(ts: int, n: int = 1) -> str:
    """A Maildir file name delivered at unix time ts."""
    return f"{ts}.M{n}P42.mx1,S=10,W=11:2,S"


def _maildir(tmp_path: Path, local: str = "alice", domain: str = "example.com") -> Path:
    """Create and return an (empty) Maildir with cur/new/tmp."""
    md = maildir_path(_pattern(tmp_path), domain, local)
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    return md


# --- paths -------------------------------------------------------------------------------

def test_maildir_path_expands_domain_and_local_part() -> None:
    assert maildir_path(DEFAULT_PATTERN, "example.com", "alice") == \
        Path("/var/vmail/example.com/alice/Maildir")


def test_maildir_path_expands_once_so_placeholders_in_names_stay_literal() -> None:
    assert maildir_path("/m/%d/%n", "example.com", "a%d%n") == Path("/m/example.com/a%d%n")


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", ".hidden", "a\x00b", "", "x..y"])
def test_maildir_path_rejects_names_that_could_escape(bad: str) -> None:
    with pytest.raises(ValueError):
        maildir_path(DEFAULT_PATTERN, "example.com", bad)
    with pytest.raises(ValueError):
        maildir_path(DEFAULT_PATTERN, bad, "alice")


def test_maildir_root_is_the_fixed_prefix() -> None:
    assert maildir_root(DEFAULT_PATTERN) == Path("/var/vmail")
    assert maildir_root("/srv/mail/x%d/%n") == Path("/srv/mail")


@pytest.mark.parametrize("pattern", ["/%d/%n", "vmail/%d/%n", "/var/vmail/../%d/%n",
                                     "/var/vmail/%u/Maildir"])
def test_maildir_root_rejects_patterns_without_a_safe_root(pattern: str) -> None:
    with pytest.raises(ValueError):
        maildir_root(pattern)


# --- maildir purge -----------------------------------------------------------------------

def test_purge_removes_old_files_in_cur_new_and_subfolders(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    old = [_mail(md / "cur", _name(OLD, 1)), _mail(md / "new", _name(OLD, 2)),
           _mail(md / ".Sent" / "cur", _name(OLD, 3)),
           _mail(md / ".Archive.2024" / "new", _name(OLD, 4))]
    new = [_mail(md / "cur", _name(NEW, 5)), _mail(md / "new", _name(NEW, 6)),
           _mail(md / ".Sent" / "cur", _name(NEW, 7))]

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)

    assert report == PurgeReport("example.com", mailboxes=1, files_removed=4, bytes_removed=40,
                                 errors=[])
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in new)


def test_file_exactly_at_the_cutoff_is_kept(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    kept = _mail(md / "cur", _name(int(CUTOFF.timestamp())))
    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)
    assert report.files_removed == 0
    assert kept.exists()


def test_filename_timestamp_wins_and_mtime_is_the_fallback(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    old_name_fresh_mtime = _mail(md / "cur", _name(OLD), mtime=NEW)
    new_name_old_mtime = _mail(md / "cur", _name(NEW), mtime=OLD)
    plain_old = _mail(md / "cur", "imported-message", mtime=OLD)
    plain_new = _mail(md / "new", "another-import", mtime=NEW)

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)

    assert report.files_removed == 2
    assert not old_name_fresh_mtime.exists() and not plain_old.exists()
    assert new_name_old_mtime.exists() and plain_new.exists()


def test_tmp_and_maildir_control_files_are_never_touched(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    in_tmp = _mail(md / "tmp", _name(OLD), mtime=OLD)
    uidlist = _mail(md, "dovecot-uidlist", mtime=OLD)
    subdir_in_cur = md / "cur" / "oddity"
    subdir_in_cur.mkdir()
    os.utime(subdir_in_cur, (OLD, OLD))

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)

    assert report.files_removed == 0 and report.errors == []
    assert in_tmp.exists() and uidlist.exists() and subdir_in_cur.is_dir()


def test_dry_run_reports_but_removes_nothing(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    files = [_mail(md / "cur", _name(OLD, 1), b"a" * 100),
             _mail(md / "new", _name(OLD, 2), b"b" * 5)]

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF, dry_run=True)

    assert (report.mailboxes, report.files_removed, report.bytes_removed) == (1, 2, 105)
    assert all(p.exists() for p in files)


def test_symlinked_file_is_not_followed_and_its_target_survives(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    outside = _mail(tmp_path / "precious", _name(OLD), mtime=OLD)
    link = md / "cur" / _name(OLD, 9)
    link.symlink_to(outside)
    os.utime(link, (OLD, OLD), follow_symlinks=False)

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)

    assert report.files_removed == 0
    assert outside.exists() and link.is_symlink()


def test_symlinked_folder_and_cur_are_not_followed(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    outside = tmp_path / "elsewhere"
    victims = [_mail(outside / "cur", _name(OLD, 1)), _mail(outside / "new", _name(OLD, 2))]
    (md / ".Evil").symlink_to(outside, target_is_directory=True)
    other = _maildir(tmp_path, "bob")
    (other / "cur").rmdir()
    (other / "cur").symlink_to(outside / "cur", target_is_directory=True)

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice", "bob"], CUTOFF)

    assert report.files_removed == 0
    assert all(p.exists() for p in victims)
    assert report.errors == ["bob@example.com/cur: skipped: symlink or not a directory"]


def test_symlinked_maildir_pointing_outside_the_root_is_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "Maildir"
    victim = _mail(outside / "cur", _name(OLD))
    mailbox_dir = maildir_path(_pattern(tmp_path), "example.com", "carol").parent
    mailbox_dir.parent.mkdir(parents=True)
    mailbox_dir.symlink_to(outside.parent, target_is_directory=True)

    report = purge_maildir(_pattern(tmp_path), "example.com", ["carol"], CUTOFF)

    assert (report.mailboxes, report.files_removed) == (0, 0)
    assert victim.exists()
    assert report.errors == ["carol@example.com: maildir skipped: symlink or not a directory"]


def test_crafted_local_part_is_rejected_and_others_still_purged(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    gone = _mail(md / "cur", _name(OLD))
    # '../x' would resolve to <root>/x/Maildir if it were expanded
    escape_target = _mail(tmp_path / "vmail" / "x" / "Maildir" / "cur", _name(OLD))

    report = purge_maildir(_pattern(tmp_path), "example.com", ["../x", "alice"], CUTOFF)

    assert not gone.exists() and escape_target.exists()
    assert (report.mailboxes, report.files_removed, len(report.errors)) == (1, 1, 1)
    assert report.errors[0].startswith("../x@example.com: unsafe local part")


def test_missing_maildir_is_skipped_quietly(tmp_path: Path) -> None:
    (tmp_path / "vmail").mkdir()
    report = purge_maildir(_pattern(tmp_path), "example.com", ["nobody"], CUTOFF)
    assert report == PurgeReport("example.com", 0, 0, 0, [])


def test_missing_root_is_an_error_not_an_exception(tmp_path: Path) -> None:
    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)
    assert report.mailboxes == 0
    assert len(report.errors) == 1 and "maildir root" in report.errors[0]


def test_broken_maildir_counts_an_error_and_continues(tmp_path: Path) -> None:
    md = _maildir(tmp_path)
    (md / "cur").rmdir()
    (md / "cur").write_bytes(b"not a directory")
    gone = _mail(md / "new", _name(OLD))

    report = purge_maildir(_pattern(tmp_path), "example.com", ["alice"], CUTOFF)

    assert not gone.exists()
    assert report.files_removed == 1
    assert report.errors == ["alice@example.com/cur: skipped: symlink or not a directory"]


def test_naive_datetime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone"):
        purge_maildir(_pattern(tmp_path), "example.com", [], datetime(2026, 1, 1))


def test_purge_logs_a_line_per_mailbox_and_a_summary(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _mail(_maildir(tmp_path, "alice") / "cur", _name(OLD))
    _maildir(tmp_path, "bob")
    with caplog.at_level(logging.INFO, logger="policyd.retention"):
        purge_maildir(_pattern(tmp_path), "example.com", ["alice", "bob"], CUTOFF)
    lines = [r.getMessage() for r in caplog.records]
    assert "retention alice@example.com: removed 1 files (10 bytes)" in lines
    assert "retention bob@example.com: removed 0 files (0 bytes)" in lines
    assert lines[-1] == ("retention example.com via maildir: 2 mailboxes, 1 files, "
                         "10 bytes removed, 0 errors")


def test_as_dict_truncates_the_error_list_but_keeps_the_count() -> None:
    report = PurgeReport("example.com", 1, 2, 3, [f"e{i}" for i in range(50)])
    data = report.as_dict()
    assert data["error_count"] == 50 and len(data["errors"]) == 20
    assert {k: data[k] for k in ("domain", "mailboxes", "files_removed", "bytes_removed")} == \
        {"domain": "example.com", "mailboxes": 1, "files_removed": 2, "bytes_removed": 3}


# --- doveadm -----------------------------------------------------------------------------

def test_doveadm_args_are_exact() -> None:
    assert doveadm_expunge_args("alice@example.com", 30) == [
        "doveadm", "expunge", "-u", "alice@example.com", "mailbox", "*", "savedbefore", "30d"]


@pytest.mark.parametrize("email,days", [("alice@example.com", 0), ("alice@example.com", True),
                                        ("-A@x", 5), ("no-at-sign", 5), ("a@b\nc", 5)])
def test_doveadm_args_refuse_bad_input(email: str, days: Any) -> None:
    with pytest.raises(ValueError):
        doveadm_expunge_args(email, days)


@dataclass
class RecordingRunner:
    """A stand-in for subprocess.run that records calls and answers with a fixed result."""

    returncode: int = 0
    stderr: str = ""
    raises: BaseException | None = None
    calls: list[tuple[list[str], dict[str, Any]]] = field(default_factory=list)

    def __call__(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((args, kwargs))
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(args, self.returncode, "", self.stderr)


def test_purge_doveadm_runs_one_argv_per_mailbox_without_a_shell() -> None:
    runner = RecordingRunner()
    report = purge_doveadm("example.com", ["a@example.com", "b@example.com"], 7, runner=runner,
                           timeout=12)
    assert [args for args, _ in runner.calls] == [doveadm_expunge_args("a@example.com", 7),
                                                  doveadm_expunge_args("b@example.com", 7)]
    _, kwargs = runner.calls[0]
    assert kwargs["timeout"] == 12 and "shell" not in kwargs and kwargs["check"] is False
    assert report == PurgeReport("example.com", mailboxes=2, files_removed=-1, bytes_removed=0,
                                 errors=[])


def test_purge_doveadm_counts_a_failing_exit() -> None:
    runner = RecordingRunner(returncode=75, stderr="Error: Mailbox INBOX: lock timeout\n")
    report = purge_doveadm("example.com", ["a@example.com", "b@example.com"], 7, runner=runner)
    assert report.mailboxes == 0
    assert report.errors == [
        "a@example.com: doveadm exit 75: Error: Mailbox INBOX: lock timeout",
        "b@example.com: doveadm exit 75: Error: Mailbox INBOX: lock timeout"]


@pytest.mark.parametrize("exc,expected", [
    (FileNotFoundError(2, "No such file or directory"), "doveadm failed to run"),
    (subprocess.TimeoutExpired(["doveadm"], 5), "doveadm timed out after 5s"),
])
def test_purge_doveadm_counts_a_runner_that_raises(exc: BaseException, expected: str) -> None:
    report = purge_doveadm("example.com", ["a@example.com"], 7,
                           runner=RecordingRunner(raises=exc), timeout=5)
    assert report.mailboxes == 0
    assert len(report.errors) == 1 and report.errors[0].startswith(f"a@example.com: {expected}")


def test_purge_doveadm_skips_users_unknown_to_dovecot() -> None:
    report = purge_doveadm("example.com", ["gone@example.com"], 7,
                           runner=RecordingRunner(returncode=67))
    assert (report.mailboxes, report.errors) == (0, [])


def test_purge_doveadm_counts_an_unsafe_address_without_running_it() -> None:
    runner = RecordingRunner()
    report = purge_doveadm("example.com", ["-A"], 7, runner=runner)
    assert runner.calls == [] and len(report.errors) == 1


# --- Dovecot SQL queries against schema.sql ----------------------------------------------

def _dovecot_settings(path: Path) -> dict[str, str]:
    """Parse a Dovecot .conf.ext: key = value, '#' comments, '\\' line continuations."""
    settings: dict[str, str] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        key, _, value = (pending + line).partition("=")
        settings[key.strip()] = value.strip()
        pending = ""
    return settings


def _expand(query: str, user: str) -> str:
    """Expand %u as Dovecot's sqlite driver does: the value SQL-escaped ('' for ')."""
    expanded = query.replace("%u", user.replace("'", "''"))
    assert "%" not in expanded, "a placeholder this test does not expand"
    return expanded


@pytest.fixture
def dovecot_db(tmp_path: Path) -> sqlite3.Connection:
    """A fresh database from schema.sql with one domain and two mailboxes."""
    db = sqlite3.connect(tmp_path / "policyd.sqlite3")
    db.executescript((REPO / "schema.sql").read_text())
    ts = "2026-11-24T12:00:00Z"
    db.execute("INSERT INTO domains (id, name, out_tier, created_at, updated_at) "
               "VALUES (1, 'example.com', 'standard', ?, ?)", (ts, ts))
    rows = [("alice", "{BLF-CRYPT}$2b$12$abcdefghijklmnopqrstuv", 1048576, 1),
            ("bob", "{BLF-CRYPT}$2b$12$bobbobbobbobbobbobbobb", None, 1),
            ("gone", "{BLF-CRYPT}$2b$12$gonegonegonegonegonego", 5, 0)]
    db.executemany("INSERT INTO mailboxes (domain_id, local_part, email, password_hash, "
                   "quota_bytes, active, created_at, updated_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                   [(n, f"{n}@example.com", h, q, a, ts, ts) for n, h, q, a in rows])
    db.commit()
    return db


@pytest.fixture
def sql_conf() -> dict[str, str]:
    """The settings of conf/dovecot/dovecot-policyd-sql.conf.ext."""
    return _dovecot_settings(REPO / "conf" / "dovecot" / "dovecot-policyd-sql.conf.ext")


def _one(db: sqlite3.Connection, query: str, user: str) -> dict[str, Any] | None:
    """Run an expanded Dovecot query and return its single row as a dict (or None)."""
    cur = db.execute(_expand(query, user))
    rows = cur.fetchall()
    assert len(rows) <= 1
    return dict(zip([c[0] for c in cur.description], rows[0])) if rows else None


def test_sql_conf_basics(sql_conf: dict[str, str]) -> None:
    assert sql_conf["driver"] == "sqlite"
    assert sql_conf["connect"] == "/var/lib/policyd/policyd.sqlite3"
    assert sql_conf["default_pass_scheme"] == "BLF-CRYPT"


def test_password_query_returns_the_blf_crypt_hash(dovecot_db: sqlite3.Connection,
                                                   sql_conf: dict[str, str]) -> None:
    row = _one(dovecot_db, sql_conf["password_query"], "alice@example.com")
    assert row == {"user": "alice@example.com",
                   "password": "{BLF-CRYPT}$2b$12$abcdefghijklmnopqrstuv"}


def test_user_query_returns_quota_rule_and_maildir(dovecot_db: sqlite3.Connection,
                                                  sql_conf: dict[str, str]) -> None:
    row = _one(dovecot_db, sql_conf["user_query"], "alice@example.com")
    assert row is not None
    assert row["quota_rule"] == "*:bytes=1048576"
    assert (row["uid"], row["gid"]) == ("vmail", "vmail")
    expected = maildir_path(DEFAULT_PATTERN, "example.com", "alice")
    assert row["mail"] == f"maildir:{expected}"
    assert Path(row["home"]) == expected.parent


def test_user_query_unlimited_quota_and_inactive_mailbox(dovecot_db: sqlite3.Connection,
                                                         sql_conf: dict[str, str]) -> None:
    row = _one(dovecot_db, sql_conf["user_query"], "bob@example.com")
    assert row is not None and row["quota_rule"] == "*:storage=0"
    assert _one(dovecot_db, sql_conf["user_query"], "gone@example.com") is None
    assert _one(dovecot_db, sql_conf["password_query"], "gone@example.com") is None


def test_queries_are_safe_against_quote_injection(dovecot_db: sqlite3.Connection,
                                                  sql_conf: dict[str, str]) -> None:
    crafted = "x' OR '1'='1"
    assert _one(dovecot_db, sql_conf["password_query"], crafted) is None
    assert _one(dovecot_db, sql_conf["user_query"], crafted) is None


def test_iterate_query_lists_active_users(dovecot_db: sqlite3.Connection,
                                          sql_conf: dict[str, str]) -> None:
    users = sorted(r[0] for r in dovecot_db.execute(sql_conf["iterate_query"]))
    assert users == ["alice@example.com", "bob@example.com"]


def test_auth_snippet_points_passdb_and_userdb_at_the_sql_conf() -> None:
    text = (REPO / "conf" / "dovecot" / "99-policyd.conf").read_text()
    blocks = re.findall(r"^(passdb|userdb) \{\s*driver = sql\s*args = (\S+)\s*\}", text, re.M)
    assert blocks == [("passdb", "/etc/dovecot/dovecot-policyd-sql.conf.ext"),
                      ("userdb", "/etc/dovecot/dovecot-policyd-sql.conf.ext")]
