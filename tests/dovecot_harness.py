"""A private Dovecot built from conf/dovecot/ exactly as shipped, but for its paths.

The instance has its own base_dir (sockets, pid), state_dir and log file under `workdir`, and
no network listener. It reads conf/dovecot/99-policyd.conf and dovecot-policyd-sql.conf.ext
through `!include`, with only these substitutions (SUBSTITUTIONS below, nothing else):

    dovecot-policyd-sql.conf.ext  connect = /var/lib/policyd/... -> the test's database
                                  /var/vmail/                    -> `mail_root` (if given)
    99-policyd.conf               /etc/dovecot/dovecot-policyd-sql.conf.ext -> the copy above
                                  /var/spool/postfix/            -> `spool`: the private
                                                                    Postfix's queue_directory

The top-level dovecot.conf that includes them (what Debian's /etc/dovecot/dovecot.conf and
conf.d do on a host) sets base_dir, state_dir, log_path, `protocols`, `ssl = no` and
`auth_failure_delay = 0` (a refused login answers at once instead of after 2 s).
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf" / "dovecot"
MAIN_CONF = "99-policyd.conf"
SQL_CONF = "dovecot-policyd-sql.conf.ext"
DOVECOT, DOVEADM = shutil.which("dovecot"), shutil.which("doveadm")
SQLITE_DRIVER = Path("/usr/lib/dovecot/modules/libdriver_sqlite.so")
LMTP = Path("/usr/lib/dovecot/lmtp")
START_TIMEOUT = 10.0


def _account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def dovecot_skip_reason(*, lmtp: bool = False) -> str | None:
    """Why a private Dovecot cannot run here (None when it can)."""
    if not (DOVECOT and DOVEADM and SQLITE_DRIVER.exists()):
        return "needs Dovecot with its SQLite driver (dovecot-core, dovecot-sqlite)"
    if lmtp and not LMTP.exists():
        return "needs Dovecot's LMTP server (dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "a private Dovecot needs root"
    if not (_account_exists("vmail") and _account_exists("postfix")):
        return ("needs the vmail user and group the snippets name, and the postfix user their "
                "sockets belong to (./test.sh sets these up as root)")
    return None


def substitutions(workdir: Path, database: Path, spool: Path,
                  mail_root: Path | None) -> dict[str, list[tuple[str, str]]]:
    """The only changes made to conf/dovecot/ files: {file: [(old, new), ...]}."""
    sql = [("connect = /var/lib/policyd/policyd.sqlite3", f"connect = {database}")]
    if mail_root is not None:
        sql.append(("/var/vmail/", f"{mail_root}/"))
    return {
        SQL_CONF: sql,
        MAIN_CONF: [(f"/etc/dovecot/{SQL_CONF}", str(workdir / SQL_CONF)),
                    ("/var/spool/postfix/", f"{spool}/")],
    }


def render(name: str, changes: list[tuple[str, str]]) -> str:
    """conf/dovecot/<name> with `changes` applied; each must match at least once."""
    text = (CONF / name).read_text()
    for old, new in changes:
        if old not in text:
            raise ValueError(f"{name}: {old!r} not found")
        text = text.replace(old, new)
    return text


class PrivateDovecot:
    """A private Dovecot: its config, started and stopped with -c."""

    def __init__(self, workdir: Path, database: Path, *, spool: Path | None = None,
                 mail_root: Path | None = None, protocols: str = "") -> None:
        self.dir = workdir
        self._attempts = 0
        self.spool = spool or workdir / "spool"
        self.config = workdir / "dovecot.conf"
        if spool is None:  # no Postfix: a directory for the sockets it would have
            (self.spool / "private").mkdir(parents=True)
        for name, changes in substitutions(workdir, database, self.spool, mail_root).items():
            (workdir / name).write_text(render(name, changes))
        self.config.write_text(
            f"base_dir = {workdir}/run\n"
            f"state_dir = {workdir}/state\n"
            f"log_path = {workdir}/dovecot.log\n"
            f"protocols = {protocols}\n"
            "ssl = no\n"
            f"!include {workdir / MAIN_CONF}\n"
            "auth_failure_delay = 0\n")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert DOVEADM is not None
        return subprocess.run([DOVEADM, "-c", str(self.config), *args], capture_output=True,
                              text=True, timeout=30)

    def auth(self, user: str, password: str) -> subprocess.CompletedProcess[str]:
        """`doveadm auth test`, each from a remote IP of its own: Dovecot delays the next
        attempt from an address after a failed one (its auth penalty), seconds per test."""
        self._attempts += 1
        return self.run("auth", "test", "-x", f"rip=192.0.2.{self._attempts}", user, password)

    def start(self) -> None:
        """Start it (it forks into the background: its output goes to a file, not a pipe
        that would stay open), and wait until its auth socket is there."""
        assert DOVECOT is not None
        with open(self.dir / "start.out", "w") as out:
            done = subprocess.run([DOVECOT, "-c", str(self.config)], stdout=out,
                                  stderr=subprocess.STDOUT, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"dovecot did not start: "
                                 f"{(self.dir / 'start.out').read_text()}{self.log()}")
        socket = self.dir / "run" / "auth-client"
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"dovecot did not start: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to its master process, then wait for it to be gone (`dovecot stop` would
        also do, but sleeps seconds before it checks)."""
        try:
            pid = int((self.dir / "run" / "master.pid").read_text())
        except (OSError, ValueError):
            return
        os.killpg(pid, signal.SIGTERM)  # the master and its children at once
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""
