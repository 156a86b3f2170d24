"""deploy/install.sh on this machine, for real: install twice (the second run changes nothing),
the installed units pass `systemd-analyze verify` as installed, the program runs as the
policyd user, the config is never overwritten, an upgrade from a newer checkout replaces the
venv, and --uninstall removes the program but keeps the config and the database. Then the
same with `--replicate URL` (Litestream to a file replica): twice without a change, its files,
units and drop-ins, the refusal to replicate from a host without a database to a replica that
holds one, --standby and --restore, and --uninstall.

It changes the system (/opt/policyd, /usr/local, /etc/policyd, /var/lib/policyd, the policyd
user), so it runs only as root on Debian with apt (CI: ./test.sh on a fresh Debian 12), never
where policyd is already installed, and puts back what it found: whatever it created is
removed at the end. The tests share one installation and run in file order.
"""
from __future__ import annotations

import configparser
import grp
import hashlib
import os
import pwd
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

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
LITESTREAM = Path("/usr/local/bin/litestream")
REPL_UNITS = ["policyd-restore.service", "policyd-litestream.service"]
DROPINS = [UNIT_DIR / f"{unit}.d" / "policyd-replica.conf" for unit in REPL_UNITS]
REPL_ENABLED = ["policyd.service.requires/policyd-restore.service",
                "policyd.service.wants/policyd-litestream.service"]
LS_CONFIG = ETC / "litestream.yml"
LS_ENV = ETC / "litestream.env"
DB = STATE / "policyd.sqlite3"
CONTROL_SOCKET = "/run/policyd-litestream/litestream.sock"
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


def install(*args: str, script: Path = INSTALL, env: dict[str, str] | None = None) -> Run:
    started = time.monotonic()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LITESTREAM_")}
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env={**environ, **(env or {})})
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


def manifest(*more: Path) -> dict[str, tuple[object, ...]]:
    """Every installed path: type and mode, owner, content hash (or link target), mtime."""
    paths: list[Path] = [BIN, SYSUSERS, STATE, DB, *(UNIT_DIR / u for u in UNITS),
                         *(WANTS / link for link in ENABLED), LITESTREAM,
                         *(UNIT_DIR / u for u in REPL_UNITS), *DROPINS,
                         *(dropin.parent for dropin in DROPINS),
                         *(WANTS / link for link in REPL_ENABLED)]
    for top in (PREFIX, ETC, *more):
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


# -------------------------------------------------------------------- --replicate (Litestream)
#
# A file replica, as Litestream 0.5 writes it, under /var/backups: install.sh refuses /tmp for
# a file replica (the units have PrivateTmp=, so each would see its own empty /tmp). Outside
# /var/backups/policyd-replica, the one directory the units allow already, so the drop-ins
# are exercised too.

ACCESS_KEY = "AKIATESTREPLICATE0001"
SECRET_KEY = "secret/Replicate+Key=0123456789abcdefABCDEF"


def _ini(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}


def _mode_owner(path: Path) -> tuple[int, str, str]:
    info = path.stat()
    return (stat.S_IMODE(info.st_mode), pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name)


def _drop_database() -> None:
    for path in STATE.glob("policyd.sqlite3*"):
        path.unlink()
    shutil.rmtree(STATE / ".policyd.sqlite3-litestream", ignore_errors=True)


@dataclass
class Replicated:
    replica: Path
    url: str
    backups: Path
    first: Run
    second: Run
    before: dict[str, tuple[object, ...]]
    after: dict[str, tuple[object, ...]]
    config_before: str


@pytest.fixture(scope="module")
def replicated(installed: Installed) -> Iterator[Replicated]:
    """install.sh --replicate file://... twice (credentials in the environment the first time);
    afterwards the replicas and Litestream's files are removed."""
    backups = Path("/var/backups")
    made_backups = not backups.exists()
    parent = Path(tempfile.mkdtemp(prefix="policyd-test-", dir=backups))
    parent.chmod(0o755)
    replica = parent / "replica"
    url = f"file://{replica}"
    created = [path for path in (LS_CONFIG, LS_ENV) if not path.exists()]
    config_before = CONFIG.read_text() if CONFIG.exists() else ""
    try:
        first = install("--replicate", url, env={"LITESTREAM_ACCESS_KEY_ID": ACCESS_KEY,
                                                 "LITESTREAM_SECRET_ACCESS_KEY": SECRET_KEY})
        assert first.returncode == 0, first.output
        before = manifest(parent)
        second = install("--replicate", url)
        assert second.returncode == 0, second.output
        yield Replicated(replica, url, parent, first, second, before, manifest(parent),
                         config_before)
    finally:
        install("--uninstall")
        shutil.rmtree(parent, ignore_errors=True)
        if made_backups:
            shutil.rmtree(backups, ignore_errors=True)
        for path in created:
            path.unlink(missing_ok=True)


def test_replicate_second_run_changes_nothing(replicated: Replicated) -> None:
    assert replicated.after == replicated.before
    assert "nothing changed" in replicated.second.output
    assert "wrote" not in replicated.second.output
    assert str(LITESTREAM) in replicated.after and str(replicated.replica) in replicated.after


def test_replicate_installs_litestream_its_config_and_the_replica(
        replicated: Replicated) -> None:
    assert os.readlink(LITESTREAM) == f"{PREFIX}/current/bin/litestream"
    version = subprocess.run([str(LITESTREAM), "version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(("0.5.", "v0.5."))
    assert LS_CONFIG.read_text() == (REPO / "conf" / "litestream.yml").read_text()
    assert _mode_owner(LS_CONFIG) == (0o640, "root", "policyd")
    assert _mode_owner(LS_ENV) == (0o640, "root", "policyd")
    env = LS_ENV.read_text().splitlines()
    assert f'LITESTREAM_REPLICA_URL="{replicated.url}"' in env
    assert f'LITESTREAM_ACCESS_KEY_ID="{ACCESS_KEY}"' in env
    assert f'LITESTREAM_SECRET_ACCESS_KEY="{SECRET_KEY}"' in env
    assert len([line for line in env if line.startswith("LITESTREAM_")]) == 3
    # the rest of conf/litestream.env is kept
    assert env[0] == (REPO / "conf" / "litestream.env").read_text().splitlines()[0]
    for run in (replicated.first, replicated.second):
        assert SECRET_KEY not in run.output and ACCESS_KEY not in run.output
    assert _mode_owner(replicated.replica) == (0o750, "policyd", "postfix")


def test_replicate_sets_only_the_control_socket_in_the_config(replicated: Replicated) -> None:
    before, after = _ini(replicated.config_before), _ini(CONFIG.read_text())
    assert after["replication"]["control_socket"] == CONTROL_SOCKET
    assert len(after["auth"]["master_token"]) >= 32
    assert after["auth"]["master_token"] == before["auth"]["master_token"]
    changed = [line for line in CONFIG.read_text().splitlines()
               if line not in replicated.config_before.splitlines()]
    assert changed == [f"control_socket = {CONTROL_SOCKET}"]
    assert "# the postmaster's own line" in CONFIG.read_text()
    assert _mode_owner(CONFIG) == (0o640, "root", "policyd")


def test_replicate_installs_and_enables_both_units(replicated: Replicated) -> None:
    for unit in REPL_UNITS:
        assert (UNIT_DIR / unit).read_text() == (REPO / "systemd" / unit).read_text()
    for link in [*ENABLED, *REPL_ENABLED]:
        assert os.readlink(WANTS / link) == str(UNIT_DIR / Path(link).name)
    for dropin in DROPINS:
        lines = dropin.read_text().splitlines()
        assert lines[1:] == ["[Service]", f"ReadWritePaths={replicated.replica}"]
    if not Path("/run/systemd/system").is_dir():
        assert (f"exec {LITESTREAM} replicate -config {LS_CONFIG}"
                in replicated.first.output)


def test_replicate_units_pass_systemd_analyze_verify(replicated: Replicated) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify",
                           *(str(UNIT_DIR / u) for u in [*UNITS, *REPL_UNITS])],
                          capture_output=True, text=True, timeout=120)
    about_us = [line for line in (done.stdout + done.stderr).splitlines() if "policyd" in line]
    assert (done.returncode, about_us) == (0, [])


def test_replicate_refuses_a_replica_with_data_on_a_host_without_a_database(
        replicated: Replicated, tmp_path: Path) -> None:
    # Another primary's replica: one row in a throwaway database, replicated once.
    throwaway = tmp_path / "primary.sqlite3"
    with sqlite3.connect(throwaway) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE marker (value TEXT)")
        conn.execute("INSERT INTO marker VALUES ('from the primary')")
    conn.close()
    other = replicated.backups / "primary-replica"
    url = f"file://{other}"
    once = subprocess.run([str(LITESTREAM), "replicate", "-once", str(throwaway), url],
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    subprocess.run(["chown", "-R", "policyd:postfix", str(other)], check=True)
    _drop_database()
    before = manifest(replicated.backups)

    refused = install("--replicate", url)

    assert refused.returncode == 1
    assert "already holds a database" in refused.output
    assert "--standby" in refused.output and "--restore" in refused.output
    assert manifest(replicated.backups) == before
    assert not DB.exists()

    standby = install("--replicate", url, "--standby")

    assert standby.returncode == 0, standby.output
    assert f'LITESTREAM_REPLICA_URL="{url}"' in LS_ENV.read_text().splitlines()
    for link in [*ENABLED, *REPL_ENABLED]:
        assert not os.path.lexists(WANTS / link), link
    assert f"--replicate '{url}' --restore" in standby.output
    assert not DB.exists()
    # a plain run (an upgrade) keeps a standby a standby
    plain = install()
    assert plain.returncode == 0, plain.output
    assert not any(os.path.lexists(WANTS / link) for link in [*ENABLED, *REPL_ENABLED])

    taken_over = install("--replicate", url, "--restore")

    assert taken_over.returncode == 0, taken_over.output
    assert _mode_owner(DB)[1:] == ("policyd", "postfix")
    with sqlite3.connect(f"file:{DB}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT value FROM marker").fetchall() == [("from the primary",)]
    conn.close()
    for link in [*ENABLED, *REPL_ENABLED]:
        assert os.readlink(WANTS / link) == str(UNIT_DIR / Path(link).name)
    again = install("--replicate", url, "--restore")
    assert again.returncode == 0, again.output
    assert "nothing changed" in again.output


@pytest.fixture
def moto_s3(tmp_path: Path) -> Iterator[str]:
    """moto in server mode (S3) with the bucket policyd-replica; yields its endpoint."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with (tmp_path / "moto.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, (tmp_path / "moto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.05)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="policyd-replica")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_replicate_to_s3_takes_the_credentials_from_the_environment(
        replicated: Replicated, moto_s3: str) -> None:
    # An S3-compatible store: the URL's '&' and the credentials must reach Litestream through
    # litestream.env alone (install.sh asks the replica with that file as the whole
    # environment, and refuses a new URL whose replica it cannot read).
    url = f"s3://policyd-replica/policyd?endpoint={moto_s3}&region=us-east-1"
    keys = {"LITESTREAM_ACCESS_KEY_ID": "testing", "LITESTREAM_SECRET_ACCESS_KEY": "testing"}

    switched = install("--replicate", url, env=keys)

    assert switched.returncode == 0, switched.output
    env = LS_ENV.read_text().splitlines()
    assert f'LITESTREAM_REPLICA_URL="{url}"' in env
    assert {f'{name}="{value}"' for name, value in keys.items()} <= set(env)
    for dropin in DROPINS:  # no file replica any more: no drop-in
        assert not dropin.exists()
    again = install("--replicate", url)
    assert again.returncode == 0, again.output
    assert "nothing changed" in again.output


def test_replicate_uninstall_keeps_litestreams_settings_and_the_replica(
        replicated: Replicated) -> None:
    settings = (LS_CONFIG.read_bytes(), LS_ENV.read_bytes())
    replica_files = sorted(p for p in replicated.backups.rglob("*") if p.is_file())
    assert replica_files
    removed = install("--uninstall")
    assert removed.returncode == 0, removed.output
    for path in (LITESTREAM, PREFIX, BIN, *(UNIT_DIR / u for u in [*UNITS, *REPL_UNITS]),
                 *DROPINS, *(dropin.parent for dropin in DROPINS),
                 *(WANTS / link for link in [*ENABLED, *REPL_ENABLED])):
        assert not os.path.lexists(path), path
    assert (LS_CONFIG.read_bytes(), LS_ENV.read_bytes()) == settings
    assert sorted(p for p in replicated.backups.rglob("*") if p.is_file()) == replica_files
