"""Mail retention purge: remove messages older than a domain's retention from its mailboxes.

Pure filesystem and subprocess work, no database and no asyncio: the caller reads the domain's
mailboxes from the store and runs these functions in a thread (``asyncio.to_thread``).

Two back ends, chosen by ``[mail] expunge``:

- ``maildir``: walk ``cur/`` and ``new/`` of each Maildir and of every Maildir++ subfolder
  (``.Folder/cur``, ``.Folder/new``) and unlink the old files. The walk descends with
  directory file descriptors opened ``O_NOFOLLOW`` from ``maildir_root``, so no symlink is ever
  followed and nothing outside the root can be reached, even if a directory is swapped for a
  symlink during the walk. Dovecot notices the vanished files and fixes its indexes and quota
  on the next access (its maildir code treats missing files as expunged).
- ``doveadm``: ``doveadm expunge -u USER mailbox * savedbefore Nd`` per mailbox, which keeps
  Dovecot's indexes and quota exact (https://doc.dovecot.org/main/core/man/doveadm-expunge.1.html).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Maildir file names start with the delivery time in seconds: "1700000000.M1P2.host,S=1:2,S"
# (https://cr.yp.to/proto/maildir.html, Dovecot keeps it when moving to cur/).
_MAILDIR_TIME = re.compile(r"^(\d{1,12})\.")
_PLACEHOLDER = re.compile(r"%(.)")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
DOVEADM_TIMEOUT = 300.0  # seconds per mailbox; a stuck doveadm must not hold the purge forever
DOVEADM_EX_NOUSER = 67  # doveadm exit code for "user does not exist" (sysexits.h EX_NOUSER)
AS_DICT_MAX_ERRORS = 20  # the dict (API/log form) lists this many messages, plus the count

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass
class PurgeReport:
    """What one domain's purge removed.

    ``mailboxes`` counts the mailboxes actually purged (maildir found on disk, or doveadm
    exited 0). ``files_removed`` is -1 for doveadm, which does not report a count.
    With ``dry_run`` the counts say what would have been removed.
    """

    domain: str
    mailboxes: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; the error list is truncated, ``error_count`` is exact."""
        data = asdict(self)
        data["errors"] = self.errors[:AS_DICT_MAX_ERRORS]
        data["error_count"] = len(self.errors)
        return data


def _check_name(kind: str, value: str) -> None:
    """Raise ValueError if a domain or local part could escape its directory."""
    if not value or "/" in value or "\x00" in value or ".." in value or value.startswith("."):
        raise ValueError(f"unsafe {kind} for a maildir path: {value!r}")


def _check_pattern(pattern: str) -> None:
    """Raise ValueError for a pattern that is relative, climbs with '..' or has unknown %x."""
    if not pattern.startswith("/"):
        raise ValueError(f"[mail] maildir_root must be an absolute path: {pattern!r}")
    if ".." in Path(pattern).parts:
        raise ValueError(f"[mail] maildir_root must not contain '..': {pattern!r}")
    unknown = {m.group(1) for m in _PLACEHOLDER.finditer(pattern)} - {"d", "n", "%"}
    if unknown:
        raise ValueError(f"[mail] maildir_root: unknown placeholder(s) {sorted(unknown)}")


def maildir_root(pattern: str) -> Path:
    """Return the fixed directory before the first %-placeholder component of the pattern."""
    _check_pattern(pattern)
    fixed: list[str] = []
    for part in Path(pattern).parts:
        if "%" in part:
            break
        fixed.append(part)
    root = Path(*fixed)
    if root == Path("/"):
        raise ValueError(f"[mail] maildir_root needs a fixed directory before %d/%n: {pattern!r}")
    return root


def maildir_path(pattern: str, domain: str, local_part: str) -> Path:
    """Expand %d (domain) and %n (local part) in the pattern; ValueError for unsafe names."""
    _check_pattern(pattern)
    _check_name("domain", domain)
    _check_name("local part", local_part)
    values = {"d": domain, "n": local_part, "%": "%"}
    # One pass, so a '%n' inside a domain name is never expanded again.
    return Path(_PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern))


def _delivery_time(name: str, entry: os.DirEntry[str]) -> float:
    """Return the delivery time from the Maildir name, else the file's own mtime."""
    match = _MAILDIR_TIME.match(name)
    if match:
        return float(match.group(1))
    return entry.stat(follow_symlinks=False).st_mtime


def _open_below(root_fd: int, relative: Path) -> int:
    """Open each component of ``relative`` under root_fd with O_NOFOLLOW; return the last fd."""
    fd = os.dup(root_fd)
    try:
        for part in relative.parts:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(exc: OSError) -> str:
    """Describe why a directory could not be opened."""
    # O_NOFOLLOW | O_DIRECTORY on a symlink fails with ELOOP or ENOTDIR (Linux: ENOTDIR).
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "symlink or not a directory"
    return exc.strerror or str(exc)


def _folders(maildir_fd: int) -> Iterator[str]:
    """Yield "" (INBOX) and every Maildir++ subfolder name (".Sent", ".Archive.2024")."""
    yield ""
    with os.scandir(maildir_fd) as entries:
        names = [e.name for e in entries
                 if e.name.startswith(".") and e.name not in (".", "..")
                 and e.is_dir(follow_symlinks=False)]
    yield from sorted(names)


def _purge_dir(dir_fd: int, label: str, cutoff: float, dry_run: bool,
               report: PurgeReport) -> None:
    """Remove the regular files older than cutoff in one cur/ or new/ directory."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue  # symlinks, subdirectories, sockets: never touched
                if _delivery_time(entry.name, entry) >= cutoff:
                    continue
                size = entry.stat(follow_symlinks=False).st_size
                if not dry_run:
                    os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # Dovecot moved or expunged it meanwhile
            except OSError as exc:
                report.errors.append(f"{label}/{entry.name}: {exc.strerror or exc}")
                continue
            report.files_removed += 1
            report.bytes_removed += size


def _purge_folder(maildir_fd: int, folder: str, label: str, cutoff: float, dry_run: bool,
                  report: PurgeReport) -> None:
    """Purge cur/ and new/ of one folder ("" is INBOX) of an open maildir."""
    for sub in ("cur", "new"):
        path = Path(folder, sub) if folder else Path(sub)
        try:
            fd = _open_below(maildir_fd, path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.errors.append(f"{label}/{path}: skipped: {_why(exc)}")
            continue
        try:
            _purge_dir(fd, f"{label}/{path}", cutoff, dry_run, report)
        except OSError as exc:
            report.errors.append(f"{label}/{path}: {exc.strerror or exc}")
        finally:
            os.close(fd)


def _purge_mailbox(root_fd: int, relative: Path, label: str, cutoff: float, dry_run: bool,
                   report: PurgeReport) -> bool:
    """Purge one mailbox; return False when its maildir does not exist."""
    try:
        maildir_fd = _open_below(root_fd, relative)
    except FileNotFoundError:
        log.debug("retention %s: no maildir at %s, skipped", label, relative)
        return False
    except OSError as exc:
        report.errors.append(f"{label}: maildir skipped: {_why(exc)}")
        return False
    try:
        for folder in _folders(maildir_fd):
            _purge_folder(maildir_fd, folder, label, cutoff, dry_run, report)
    except OSError as exc:
        report.errors.append(f"{label}: {exc.strerror or exc}")
    finally:
        os.close(maildir_fd)
    return True


def _cutoff(older_than: datetime) -> float:
    """Return older_than as a unix time; naive datetimes are refused (ambiguous zone)."""
    if older_than.tzinfo is None or older_than.utcoffset() is None:
        raise ValueError("older_than must be timezone-aware (UTC)")
    return older_than.timestamp()


def _log_summary(report: PurgeReport, how: str, dry_run: bool) -> None:
    """Log the one summary line of a domain purge."""
    log.info("retention %s%s via %s: %d mailboxes, %d files, %d bytes removed, %d errors",
             report.domain, " (dry run)" if dry_run else "", how, report.mailboxes,
             report.files_removed, report.bytes_removed, len(report.errors))


def purge_maildir(pattern: str, domain: str, local_parts: list[str], older_than: datetime,
                  *, dry_run: bool = False) -> PurgeReport:
    """Remove mail delivered before older_than from the domain's maildirs; never raises on I/O."""
    cutoff = _cutoff(older_than)
    root = maildir_root(pattern)
    report = PurgeReport(domain=domain)
    try:
        root_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself may be a link
    except OSError as exc:
        report.errors.append(f"maildir root {root}: {exc.strerror or exc}")
        _log_summary(report, "maildir", dry_run)
        return report
    try:
        for local_part in local_parts:
            _purge_one(root_fd, root, pattern, domain, local_part, cutoff, dry_run, report)
    finally:
        os.close(root_fd)
    _log_summary(report, "maildir", dry_run)
    return report


def _purge_one(root_fd: int, root: Path, pattern: str, domain: str, local_part: str,
               cutoff: float, dry_run: bool, report: PurgeReport) -> None:
    """Purge one mailbox and log its progress line."""
    label = f"{local_part}@{domain}"
    try:
        relative = maildir_path(pattern, domain, local_part).relative_to(root)
    except ValueError as exc:
        report.errors.append(f"{label}: {exc}")
        return
    files, size = report.files_removed, report.bytes_removed
    if _purge_mailbox(root_fd, relative, label, cutoff, dry_run, report):
        report.mailboxes += 1
        log.info("retention %s: %s %d files (%d bytes)", label,
                 "would remove" if dry_run else "removed",
                 report.files_removed - files, report.bytes_removed - size)


def doveadm_expunge_args(email: str, older_than_days: int) -> list[str]:
    """Return the doveadm argv expunging the user's mail saved more than N days ago."""
    if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) \
            or older_than_days < 1:
        raise ValueError(f"older_than_days must be a positive integer: {older_than_days!r}")
    if "@" not in email or email.startswith("-") or any(c in email for c in "\x00\r\n"):
        raise ValueError(f"unsafe address for doveadm: {email!r}")
    return ["doveadm", "expunge", "-u", email, "mailbox", "*", "savedbefore",
            f"{older_than_days}d"]


def _run_doveadm(email: str, days: int, runner: Runner, timeout: float) -> str | None:
    """Run one expunge; return an error message, "" for an unknown user, None on success."""
    args = doveadm_expunge_args(email, days)
    try:
        done = runner(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"doveadm timed out after {timeout:g}s"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"doveadm failed to run: {exc}"
    if done.returncode == 0:
        return None
    if done.returncode == DOVEADM_EX_NOUSER:
        return ""
    detail = (done.stderr or "").strip().splitlines()
    return f"doveadm exit {done.returncode}" + (f": {detail[-1][:200]}" if detail else "")


def purge_doveadm(domain: str, emails: list[str], days: int, *, runner: Runner = subprocess.run,
                  timeout: float = DOVEADM_TIMEOUT) -> PurgeReport:
    """Expunge mail saved over `days` days ago via doveadm; files_removed is -1 (unknown)."""
    report = PurgeReport(domain=domain, files_removed=-1)
    for email in emails:
        try:
            error = _run_doveadm(email, days, runner, timeout)
        except ValueError as exc:
            error = str(exc)
        if error:
            report.errors.append(f"{email}: {error}")
            log.warning("retention %s: %s", email, error)
        elif error == "":
            log.debug("retention %s: unknown to Dovecot, skipped", email)
        else:
            report.mailboxes += 1
            log.info("retention %s: expunged mail saved before %dd", email, days)
    _log_summary(report, "doveadm", dry_run=False)
    return report
