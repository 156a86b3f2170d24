"""The replication units and config: hardened like the daemon, wired to conf/litestream.yml,
ordered around policyd.service, and `systemd-analyze verify` clean beside it."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.test_systemd import HARDENING, SERVICES, TIMERS, UNIT_DIR, parse_unit, values, verify

ROOT = Path(__file__).resolve().parent.parent
LITESTREAM = "/usr/local/bin/litestream"
CONFIG = "/etc/policyd/litestream.yml"
ENV_FILE = "/etc/policyd/litestream.env"
UNITS = ["policyd-litestream.service", "policyd-restore.service"]
YML = (ROOT / "conf" / "litestream.yml").read_text(encoding="utf-8")


def yml_value(key: str) -> str:
    """The value of the one uncommented `key:` line of conf/litestream.yml."""
    [value] = re.findall(rf"^\s*-?\s*{key}:\s*(\S+)\s*$", YML, flags=re.MULTILINE)
    return value.strip('"')


@pytest.mark.parametrize("name", UNITS)
def test_replication_units_are_hardened_like_the_daemon(name: str) -> None:
    unit = parse_unit(UNIT_DIR / name)
    want = {k: v for k, v in HARDENING.items() if k != "TimeoutStopSec"}
    missing = {key: v for key, v in want.items() if v not in values(unit, "Service", key)}
    assert missing == {}
    assert values(unit, "Service", "EnvironmentFile") == [ENV_FILE]
    assert values(unit, "Service", "MemoryDenyWriteExecute") == ["true"]  # a Go binary


def test_replication_runs_litestream_on_the_shipped_config() -> None:
    unit = parse_unit(UNIT_DIR / "policyd-litestream.service")
    assert values(unit, "Service", "ExecStart") == [f"{LITESTREAM} replicate -config {CONFIG}"]
    # the control socket lives in the unit's runtime directory
    [runtime] = values(unit, "Service", "RuntimeDirectory")
    socket = re.search(r"socket:\s*\n\s*enabled: true\s*\n\s*path: (\S+)", YML)
    assert socket is not None and Path(socket.group(1)).parent == Path("/run") / runtime
    # Litestream syncs once more on SIGTERM, for up to 30 s (shutdown-sync-timeout)
    assert int(values(unit, "Service", "TimeoutStopSec")[0].rstrip("s")) > 30


def test_replication_starts_before_the_daemon_and_stops_after_it() -> None:
    unit = parse_unit(UNIT_DIR / "policyd-litestream.service")
    assert values(unit, "Unit", "Before") == ["policyd.service"]
    assert values(unit, "Unit", "PartOf") == ["policyd.service"]
    assert "policyd-restore.service" in " ".join(values(unit, "Unit", "After"))
    assert values(unit, "Install", "WantedBy") == ["policyd.service"]


def test_the_daemon_requires_a_restore_of_a_missing_database_first() -> None:
    unit = parse_unit(UNIT_DIR / "policyd-restore.service")
    assert values(unit, "Service", "Type") == ["oneshot"]
    assert values(unit, "Install", "RequiredBy") == ["policyd.service"]
    assert set(" ".join(values(unit, "Unit", "Before")).split()) == {
        "policyd.service", "policyd-litestream.service"}
    [command] = values(unit, "Service", "ExecStart")
    argv = shlex.split(command)
    assert argv[:4] == [LITESTREAM, "restore", "-config", CONFIG]
    assert {"-if-db-not-exists", "-if-replica-exists"} <= set(argv)
    db = [line.split("path:")[1].strip() for line in YML.splitlines()
          if line.strip().startswith("- path:")]
    assert db == [argv[-1]] == ["/var/lib/policyd/policyd.sqlite3"]


def test_the_config_takes_the_replica_and_its_secrets_from_the_environment() -> None:
    assert yml_value("url") == "${LITESTREAM_REPLICA_URL}"
    for secret in ("access-key-id", "secret-access-key", "password", "account-key"):
        assert not re.search(rf"^\s*{secret}:", YML, flags=re.MULTILINE), secret
    env = (ROOT / "conf" / "litestream.env").read_text(encoding="utf-8")
    assert re.search(r"^LITESTREAM_REPLICA_URL=\S+$", env, flags=re.MULTILINE)
    assert not re.search(r"^LITESTREAM_(ACCESS|SECRET)", env, flags=re.MULTILINE)


def test_replication_units_verify_beside_the_daemon(tmp_path: Path) -> None:
    copies = []
    for name in [*SERVICES, *TIMERS, *UNITS]:
        copy = tmp_path / name
        copy.write_text((UNIT_DIR / name).read_text()
                        .replace("/usr/local/bin/policyd", "/bin/true")
                        .replace(LITESTREAM, "/bin/true"))
        copies.append(copy)
    status, about_us = verify(copies, tmp_path)
    assert about_us == []
    assert status == 0


@pytest.mark.parametrize("name", UNITS)
def test_replication_units_keep_the_state_directory_the_daemons(name: str) -> None:
    # systemd chowns a StateDirectory= recursively to the unit's User:Group whenever they
    # differ: another group would take the database away from Postfix (group postfix).
    daemon = parse_unit(UNIT_DIR / "policyd.service")
    unit = parse_unit(UNIT_DIR / name)
    assert values(unit, "Service", "StateDirectory") == values(daemon, "Service",
                                                               "StateDirectory")
    for key in ("User", "Group"):
        assert values(unit, "Service", key) == values(daemon, "Service", key), key
