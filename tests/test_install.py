"""deploy/install.sh on this machine, for real: install twice (the second run changes nothing),
the installed units pass `systemd-analyze verify` as installed, the program runs as the
policyd user, the config is never overwritten, an upgrade from a newer checkout replaces the
venv, and --uninstall removes the program but keeps the config and the database.

It changes the system (/opt/policyd, /usr/local, /etc/policyd, /var/lib/policyd, the policyd
user), so it runs only as root on Debian with apt (CI: ./test.sh on a fresh Debian 12), never
where policyd is already installed, and puts back what it found: whatever it created is
removed at the end. The tests share one installation and run in file order.
"""
from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "deploy" / "install.sh"
PREFIX = Path("/opt/policyd")
BIN = Path("/usr/local/bin/policyd")
UNIT_DIR = Path("/usr/local/lib/systemd/system")
SYSUSERS = Path("/usr/local/lib/sysusers.d/policyd.conf")
ETC = Path("/etc/policyd")
CONFIG = ETC / "policyd.ini"
STATE = Path("/var/lib/policyd")
WANTS = Path("/etc/systemd/system")
UNITS = ["policyd.service", "policyd-reset-daily.service", "policyd-reset-monthly.service",
         "policyd-purge-retention.service", "policyd-reset-daily.timer",
         "policyd-reset-monthly.timer", "policyd-purge-retention.timer"]
ENABLED = ["multi-user.target.wants/policyd.service",
           *(f"timers.target.wants/{unit}" for unit in UNITS if unit.endswith(".timer"))]
RUN_TIMEOUT = 600


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "installs system-wide: needs root"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "deploy/install.sh is for Debian (apt-get)"
    if not (_user_exists("postfix") and _user_exists("dovecot")):
        return "install.sh needs Postfix and Dovecot installed (./test.sh installs them)"
    if PREFIX.exists() or BIN.exists() or (UNIT_DIR / "policyd.service").exists():
        return "policyd is already installed on this machine; this test would replace it"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float


def install(*args: str, script: Path = INSTALL) -> Run:
    started = time.monotonic()
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - started)


def _entry(path: Path) -> tuple[object, ...]:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        content: str = "-> " + os.readlink(path)
    elif stat.S_ISREG(info.st_mode):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        content = ""
    return (stat.filemode(info.st_mode), info.st_uid, info.st_gid, content, info.st_mtime_ns)


def manifest() -> dict[str, tuple[object, ...]]:
    """Every installed path: type and mode, owner, content hash (or link target), mtime."""
    paths: list[Path] = [BIN, SYSUSERS, STATE, *(UNIT_DIR / u for u in UNITS),
                         *(WANTS / link for link in ENABLED)]
    for top in (PREFIX, ETC):
        if top.exists():
            paths.append(top)
            for root, dirs, files in os.walk(top):
                paths += [Path(root, name) for name in dirs + files]
    found = {str(p): _entry(p) for p in paths if os.path.lexists(p)}
    for name in ("policyd",):
        try:
            user = pwd.getpwnam(name)
            group = grp.getgrnam(name)
        except KeyError:
            continue
        found[f"user:{name}"] = (user.pw_uid, user.pw_gid, user.pw_dir, user.pw_shell)
        found[f"group:{name}"] = (group.gr_gid, tuple(sorted(group.gr_mem)))
    return found


@dataclass
class Installed:
    first: Run
    second: Run
    before: dict[str, tuple[object, ...]]
    after: dict[str, tuple[object, ...]]


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """Install twice from this checkout; afterwards remove everything the test created."""
    created = {"etc": not ETC.exists(), "state": not STATE.exists(),
               "user": not _user_exists("policyd")}
    try:
        first = install()
        assert first.returncode == 0, first.output
        before = manifest()
        second = install()
        assert second.returncode == 0, second.output
        yield Installed(first, second, before, manifest())
    finally:
        install("--uninstall")
        if created["etc"]:
            shutil.rmtree(ETC, ignore_errors=True)
        if created["state"]:
            shutil.rmtree(STATE, ignore_errors=True)
        if created["user"]:
            subprocess.run(["userdel", "policyd"], capture_output=True)
            subprocess.run(["groupdel", "policyd"], capture_output=True)


def test_second_run_changes_nothing(installed: Installed) -> None:
    assert installed.after == installed.before
    assert "nothing changed" in installed.second.output
    assert "wrote" not in installed.second.output
    assert any(path.startswith(f"{PREFIX}/venv-") for path in installed.after)


def test_installed_layout(installed: Installed) -> None:
    assert BIN.resolve().is_relative_to(PREFIX) and os.access(BIN, os.X_OK)
    policyd = pwd.getpwnam("policyd")
    info = CONFIG.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
        0o640, 0, grp.getgrnam("policyd").gr_gid)
    settings = dict(line.split(" = ", 1) for line in CONFIG.read_text().splitlines()
                    if " = " in line and not line.startswith("#"))
    assert settings["path"] == "/var/lib/policyd/policyd.sqlite3"
    assert len(settings["master_token"]) >= 32
    postfix = grp.getgrnam("postfix")
    assert policyd.pw_gid == postfix.gr_gid  # Postfix reads the database through its group
    info = STATE.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (
        0o750, policyd.pw_uid, postfix.gr_gid)
    assert grp.getgrnam("policyd").gr_mem == ["policyd"]
    assert SYSUSERS.read_text() == (REPO / "systemd" / "policyd.sysusers").read_text()
    for unit in UNITS:
        assert (UNIT_DIR / unit).read_text() == (REPO / "systemd" / unit).read_text()
    for link in ENABLED:
        assert os.readlink(WANTS / link) == str(UNIT_DIR / Path(link).name)
    if not Path("/run/systemd/system").is_dir():
        assert f"runuser -u policyd -- {BIN} serve --config {CONFIG}" in installed.first.output


def test_installed_units_pass_systemd_analyze_verify(installed: Installed) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify", *(str(UNIT_DIR / u) for u in UNITS)],
                          capture_output=True, text=True, timeout=120)
    about_us = [line for line in (done.stdout + done.stderr).splitlines() if "policyd" in line]
    assert (done.returncode, about_us) == (0, [])


def test_program_runs_as_the_policyd_user(installed: Installed) -> None:
    done = subprocess.run(["runuser", "-u", "policyd", "--", str(BIN), "init-db", "--config",
                           str(CONFIG)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    database = STATE / "policyd.sqlite3"
    owner = database.stat()
    assert (owner.st_uid, owner.st_gid) == (pwd.getpwnam("policyd").pw_uid,
                                            grp.getgrnam("postfix").gr_gid)
    assert str(database) in done.stdout


def test_config_is_never_overwritten(installed: Installed) -> None:
    with CONFIG.open("a") as handle:
        handle.write("# the postmaster's own line\n")
    edited = CONFIG.read_bytes()
    again = install()
    assert again.returncode == 0, again.output
    assert CONFIG.read_bytes() == edited
    assert stat.S_IMODE(CONFIG.stat().st_mode) == 0o640


def test_upgrade_from_a_newer_checkout_replaces_the_venv(installed: Installed,
                                                         tmp_path: Path) -> None:
    newer = tmp_path / "newer"
    for name in ("deploy", "conf", "systemd", "policyd", "api", "pyproject.toml", "setup.cfg",
                 "README.md", "schema.sql"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, newer / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, newer / name)
    marker = f"# upgrade marker {time.time_ns()}\n"
    with (newer / "policyd" / "__init__.py").open("a") as handle:
        handle.write(marker)
    old_venv = (PREFIX / "current").resolve()
    config = CONFIG.read_bytes()

    upgraded = install(script=newer / "deploy" / "install.sh")

    assert upgraded.returncode == 0, upgraded.output
    new_venv = (PREFIX / "current").resolve()
    assert new_venv != old_venv and not old_venv.exists()
    installed_init = subprocess.run(
        [str(BIN.resolve().parent / "python"), "-I", "-c",
         "import policyd, pathlib; print(pathlib.Path(policyd.__file__).read_text())"],
        capture_output=True, text=True, timeout=60).stdout
    assert marker in installed_init
    assert CONFIG.read_bytes() == config
    assert (STATE / "policyd.sqlite3").exists()


def test_uninstall_removes_the_program_and_keeps_config_and_data(installed: Installed) -> None:
    config = CONFIG.read_bytes()
    removed = install("--uninstall")
    assert removed.returncode == 0, removed.output
    for path in (PREFIX, BIN, SYSUSERS, *(UNIT_DIR / u for u in UNITS),
                 *(WANTS / link for link in ENABLED)):
        assert not os.path.lexists(path), path
    assert CONFIG.read_bytes() == config
    assert (STATE / "policyd.sqlite3").exists()
    assert _user_exists("policyd")
    again = install("--uninstall")
    assert again.returncode == 0, again.output
