"""systemd/ units: hardening present everywhere, timers wired to services, and
`systemd-analyze verify` clean (when available; systemd need not be running)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
POLICYD = "/usr/local/bin/policyd"
CONFIG_ARGS = "--config /etc/policyd/policyd.ini"
JOBS = {"reset-daily", "reset-monthly", "purge-retention"}
SERVICES = ["policyd.service", *(f"policyd-{job}.service" for job in sorted(JOBS))]
TIMERS = [f"policyd-{job}.timer" for job in sorted(JOBS)]
HARDENING = {
    "User": "policyd",
    "DynamicUser": "no",
    "StateDirectory": "policyd",
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "NoNewPrivileges": "true",
    "PrivateTmp": "true",
    "PrivateDevices": "true",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "ReadWritePaths": "/var/lib/policyd",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "30",
}

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections of a unit file as ordered (key, value) lists (keys may repeat)."""
    unit: Unit = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of `key` in `section`, in order."""
    return [v for k, v in unit.get(section, []) if k == key]


def test_the_expected_units_are_shipped() -> None:
    shipped = {p.name for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".timer")}
    replication = {"policyd-litestream.service", "policyd-restore.service"}  # their own tests
    assert shipped == set(SERVICES) | set(TIMERS) | replication


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_every_hardening_setting(name: str) -> None:
    service = parse_unit(UNIT_DIR / name)
    missing = {key: want for key, want in HARDENING.items()
               if want not in values(service, "Service", key)}
    assert missing == {}


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_policyd_with_the_config_file(name: str) -> None:
    service = parse_unit(UNIT_DIR / name)
    job = "serve" if name == "policyd.service" else name.removeprefix("policyd-").split(".")[0]
    assert values(service, "Service", "ExecStart") == [f"{POLICYD} {job} {CONFIG_ARGS}"]


def test_main_service_restarts_and_may_purge_the_mail_store() -> None:
    service = parse_unit(UNIT_DIR / "policyd.service")
    assert values(service, "Service", "Restart") == ["on-failure"]
    assert "-/var/vmail" in values(service, "Service", "ReadWritePaths")
    assert values(service, "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_services_are_oneshot(job: str) -> None:
    service = parse_unit(UNIT_DIR / f"policyd-{job}.service")
    assert values(service, "Service", "Type") == ["oneshot"]
    assert "Install" not in service  # started by its timer only


def test_only_the_purge_job_writes_the_mail_store() -> None:
    writes = {job: "-/var/vmail" in values(parse_unit(UNIT_DIR / f"policyd-{job}.service"),
                                           "Service", "ReadWritePaths") for job in JOBS}
    assert writes == {"reset-daily": False, "reset-monthly": False, "purge-retention": True}


@pytest.mark.parametrize("name", TIMERS)
def test_timer_names_an_existing_service_and_catches_up(name: str) -> None:
    timer = parse_unit(UNIT_DIR / name)
    target = values(timer, "Timer", "Unit") or [name.replace(".timer", ".service")]
    assert (UNIT_DIR / target[0]).is_file()
    assert target == [name.replace(".timer", ".service")]
    assert values(timer, "Timer", "Persistent") == ["true"]
    assert values(timer, "Install", "WantedBy") == ["timers.target"]


def test_timer_schedules() -> None:
    calendar = {job: values(parse_unit(UNIT_DIR / f"policyd-{job}.timer"), "Timer",
                            "OnCalendar") for job in JOBS}
    assert re.fullmatch(r"\*-\*-\* 00:\d\d:00", calendar["reset-daily"][0])
    assert re.fullmatch(r"\*-\*-01 00:\d\d:00", calendar["reset-monthly"][0])
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:00", calendar["purge-retention"][0])


@pytest.mark.parametrize("name", TIMERS)
def test_timer_calendar_parses(name: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for spec in values(parse_unit(UNIT_DIR / name), "Timer", "OnCalendar"):
        done = subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr


def test_sysusers_creates_the_policyd_user_and_lets_postfix_read() -> None:
    lines = [line.split() for line in (UNIT_DIR / "policyd.sysusers").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    # Postfix reads the database with its primary group only: policyd's files are group postfix
    assert ["u", "policyd", "-:postfix"] in [line[:3] for line in lines]
    assert ["g", "policyd", "-"] in lines and ["m", "policyd", "policyd"] in lines
    for name in SERVICES:
        assert values(parse_unit(UNIT_DIR / name), "Service", "Group") == ["postfix"]


# -------------------------------------------------------------------- systemd-analyze verify

def copy_units(dest: Path) -> list[Path]:
    """Copy the units with ExecStart pointing at /bin/true (policyd need not be installed)."""
    copies = []
    for name in [*SERVICES, *TIMERS]:
        copy = dest / name
        copy.write_text((UNIT_DIR / name).read_text().replace(POLICYD, "/bin/true"))
        copies.append(copy)
    return copies


def verify(units: list[Path], unit_dir: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify`; return its status and the output lines about our units."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                          text=True, env=env, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if "policyd" in line]


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    status, about_us = verify(copy_units(tmp_path), tmp_path)
    assert about_us == []
    assert status == 0


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    units = copy_units(tmp_path)
    broken = tmp_path / "policyd.service"
    broken.write_text(broken.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    _, about_us = verify(units, tmp_path)
    assert any("protect system" in line.lower() for line in about_us)
