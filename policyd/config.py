"""Configuration: an INI file read into one frozen dataclass per section.

Every key has a built-in default so `policyd serve` runs with no file at all. SCHEMA below is
the one list of keys, with their parsers and defaults; each section's dataclass holds the parsed
values under the same names (building it from SCHEMA fails on any mismatch), and
`conf/policyd.ini` documents each key (tests/test_config.py checks it).
"""
from __future__ import annotations

import configparser
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from policyd.names import has_control


class ConfigError(ValueError):
    """A config value is wrong; the message names section and key."""


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port")
    return host.strip("[]"), int(port)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _ratio(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError("must be in (0, 1]")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in _str_list(value))


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value
    return parse


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError("unknown time zone") from exc
    return value


def _text(value: str) -> str:
    return value.strip()


# section -> key -> (parser, default text). The one list of every key the code reads.
SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], str]]] = {
    "database": {
        "path": (_text, "./policyd.sqlite3"),
        "synchronous": (_choice("NORMAL", "FULL"), "NORMAL"),
        "busy_timeout": (_positive_float, "5"),
        "write_on_loop": (_bool, "true"),
    },
    "policy": {
        "listen": (_host_port, "127.0.0.1:10040"),
        "idle_timeout": (_positive_float, "300"),
        "max_connections": (_positive_int, "1000"),
        "trusted_networks": (_networks, ""),
        "count_at": (_choice("END-OF-MESSAGE", "DATA", "RCPT"), "END-OF-MESSAGE"),
        "time_budget": (_positive_float, "2"),
        "on_error": (_choice("defer", "dunno"), "defer"),
        "suspended_inbound": (_choice("hold", "defer"), "hold"),
        "log_decisions": (_bool, "true"),
    },
    "api": {
        "listen": (_host_port, "127.0.0.1:8040"),
        "max_body_bytes": (_positive_int, str(1 << 20)),
    },
    "auth": {
        "master_token": (_text, ""),
    },
    "ses": {
        "region": (_text, "us-east-1"),
        "endpoint_url": (_text, ""),
        "poll_interval": (_positive_float, "7200"),
        "auto_verify": (_bool, "true"),
        "instance_metadata": (_bool, "false"),
    },
    "sns": {
        "allowed_topic_arns": (_str_list, ""),
        "cert_host_pattern": (_text, "sns.*.amazonaws.com"),
        "insecure_http_certs": (_bool, "false"),
    },
    "dns": {
        "nameservers": (_str_list, ""),
        "port": (_positive_int, "53"),
        "timeout": (_positive_float, "3"),
        "mx_hosts": (_str_list, ""),
        "spf_include": (_text, "amazonses.com"),
    },
    "outbound": {
        "bounce_rate_limit": (_ratio, "0.03"),
        "bounce_min_sent": (_non_negative_int, "100"),
        "timezone": (_timezone, "UTC"),
        "default_tier": (_text, "standard"),
        "history_months": (_positive_int, "24"),
    },
    "mail": {
        "maildir_root": (_text, "/var/vmail/%d/%n/Maildir"),
        "expunge": (_choice("maildir", "doveadm"), "maildir"),
    },
    "scheduler": {
        "enabled": (_bool, "true"),
        "reset_interval": (_positive_float, "3600"),
        "purge_interval": (_positive_float, "86400"),
        "notify_interval": (_positive_float, "30"),
        "sweep_interval": (_positive_float, "60"),
    },
    "replication": {
        "control_socket": (_text, ""),
        "poll_interval": (_positive_float, "5"),
        "max_lag": (_positive_float, "30"),
    },
}

BUILTIN_TIERS: dict[str, tuple[int | None, int | None]] = {
    "trial": (100, 1000),
    "standard": (1000, 30000),
    "pro": (10000, 300000),
    "unlimited": (None, None),
}


@dataclass(frozen=True)
class DatabaseConfig:
    path: str
    synchronous: str
    busy_timeout: float
    write_on_loop: bool


@dataclass(frozen=True)
class PolicyConfig:
    listen: tuple[str, int]
    idle_timeout: float
    max_connections: int
    trusted_networks: tuple[Any, ...]
    count_at: str
    time_budget: float
    on_error: str
    suspended_inbound: str
    log_decisions: bool


@dataclass(frozen=True)
class ApiConfig:
    listen: tuple[str, int]
    max_body_bytes: int


@dataclass(frozen=True)
class AuthConfig:
    master_token: str


@dataclass(frozen=True)
class SesConfig:
    region: str
    endpoint_url: str
    poll_interval: float
    auto_verify: bool
    instance_metadata: bool


@dataclass(frozen=True)
class SnsConfig:
    allowed_topic_arns: tuple[str, ...]
    cert_host_pattern: str
    insecure_http_certs: bool


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...]
    port: int
    timeout: float
    mx_hosts: tuple[str, ...]
    spf_include: str


@dataclass(frozen=True)
class OutboundConfig:
    bounce_rate_limit: float
    bounce_min_sent: int
    timezone: str
    default_tier: str
    history_months: int


@dataclass(frozen=True)
class MailConfig:
    maildir_root: str
    expunge: str


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool
    reset_interval: float
    purge_interval: float
    notify_interval: float
    sweep_interval: float


@dataclass(frozen=True)
class ReplicationConfig:
    control_socket: str
    poll_interval: float
    max_lag: float


_SECTIONS: dict[str, type] = {
    "database": DatabaseConfig, "policy": PolicyConfig, "api": ApiConfig, "auth": AuthConfig,
    "ses": SesConfig, "sns": SnsConfig, "dns": DnsConfig, "outbound": OutboundConfig,
    "mail": MailConfig, "scheduler": SchedulerConfig, "replication": ReplicationConfig,
}


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    policy: PolicyConfig
    api: ApiConfig
    auth: AuthConfig
    ses: SesConfig
    sns: SnsConfig
    dns: DnsConfig
    outbound: OutboundConfig
    mail: MailConfig
    scheduler: SchedulerConfig
    replication: ReplicationConfig
    tiers: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    source: str = ""

    @property
    def db_path(self) -> Path:
        """The database file, resolved."""
        return Path(self.database.path).expanduser()


def _parse_limit(text: str) -> int | None:
    text = text.strip()
    if text == "-":
        return None
    number = int(text)
    if number < 0:
        raise ValueError("must be >= 0 or -")
    return number


def _parse_tiers(parser: configparser.ConfigParser) -> dict[str, tuple[int | None, int | None]]:
    tiers = dict(BUILTIN_TIERS)
    if not parser.has_section("tiers"):
        return tiers
    for name, value in parser.items("tiers", raw=True):
        daily, sep, monthly = value.partition("/")
        try:
            _check_text(name + value, False)
            if not sep:
                raise ValueError("expected DAILY/MONTHLY")
            tiers[name.lower()] = (_parse_limit(daily), _parse_limit(monthly))
        except ValueError as exc:
            raise ConfigError(f"[tiers] {name}: {exc} (got {value!r})") from None
    return tiers


_LISTS = (_str_list, _networks)  # may be written over several lines


def _check_text(text: str, multiline: bool) -> None:
    """No control characters in a value (a list may span lines): they would end up in log
    lines, SMTP replies and SQL file paths."""
    if has_control(text.replace("\n", "") if multiline else text):
        raise ValueError("contains a control character")


def _build_section(parser: configparser.ConfigParser, section: str) -> Any:
    values: dict[str, Any] = {}
    for key, (parse, default) in SCHEMA[section].items():
        text = parser.get(section, key, raw=True, fallback=default)
        try:
            _check_text(text, parse in _LISTS)
            values[key] = parse(text)
        except ValueError as exc:
            raise ConfigError(f"[{section}] {key}: {exc} (got {text!r})") from None
    return _SECTIONS[section](**values)


def _check_unknown(parser: configparser.ConfigParser) -> None:
    for section in parser.sections():
        if section == "tiers":
            continue
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]: unknown section")
        for key in parser.options(section):
            if key not in SCHEMA[section]:
                raise ConfigError(f"[{section}] {key}: unknown key")


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read the INI file at path (None: built-in defaults) into a Config."""
    environ = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"{path}: {exc.message.splitlines()[0]}") from None
    _check_unknown(parser)
    sections = {name: _build_section(parser, name) for name in SCHEMA}
    token = environ.get("POLICYD_MASTER_TOKEN")
    if token:
        if has_control(token):
            raise ConfigError("POLICYD_MASTER_TOKEN: contains a control character")
        sections["auth"] = AuthConfig(master_token=token)
    tiers = _parse_tiers(parser)
    if sections["outbound"].default_tier not in tiers:
        raise ConfigError(f"[outbound] default_tier: unknown tier "
                          f"{sections['outbound'].default_tier!r}")
    return Config(**sections, tiers=tiers, source=str(path or ""))


def warnings(config: Config) -> list[str]:
    """Settings that are valid but probably not what the operator wants (logged by `serve`,
    printed by `check-config`)."""
    found = []
    if not config.sns.allowed_topic_arns:
        found.append("[sns] allowed_topic_arns is empty: POST /webhooks/ses accepts no topic, "
                     "so SES bounces and complaints are not counted (list your topic ARNs, "
                     "or '*' for any)")
    return found

