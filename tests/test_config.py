"""Configuration: defaults, parsing, errors naming section and key, and documentation."""
from __future__ import annotations

import configparser
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from policyd.config import BUILTIN_TIERS, SCHEMA, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "policyd.ini"


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config.database.path == "./policyd.sqlite3"
    assert config.policy.listen == ("127.0.0.1", 10040)
    assert config.api.listen == ("127.0.0.1", 8040)
    assert config.ses.poll_interval == 7200 and config.ses.auto_verify is True
    assert config.outbound.bounce_rate_limit == 0.03 and config.outbound.bounce_min_sent == 100
    assert config.tiers["standard"] == (1000, 30000) and config.tiers["unlimited"] == (None, None)


def test_every_key_the_code_reads_is_documented() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(EXAMPLE, encoding="utf-8")
    for section, keys in SCHEMA.items():
        assert parser.has_section(section), f"[{section}] missing from conf/policyd.ini"
        for key, (_, default) in keys.items():
            assert parser.has_option(section, key), f"[{section}] {key} is not documented"
            assert parser.get(section, key) == default, f"[{section}] {key} default differs"
    assert dict(parser.items("tiers")) == {
        name: "/".join("-" if v is None else str(v) for v in limits)
        for name, limits in BUILTIN_TIERS.items()}


def test_the_documented_example_loads_to_the_defaults() -> None:
    example = dataclasses.replace(load_config(EXAMPLE, environ={}), source="")
    assert example == load_config(None, environ={})


def test_env_master_token_wins(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text("[auth]\nmaster_token = from-file\n")
    assert load_config(path, environ={}).auth.master_token == "from-file"
    assert load_config(path, environ={"POLICYD_MASTER_TOKEN": "env"}).auth.master_token == "env"


def test_tiers_override_and_add(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text("[tiers]\ngold = 5000/-\ntrial = 10/20\n[outbound]\ndefault_tier = gold\n")
    config = load_config(path, environ={})
    assert config.tiers["gold"] == (5000, None) and config.tiers["trial"] == (10, 20)
    assert config.outbound.default_tier == "gold"


def test_trusted_networks_v4_and_v6(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text("[policy]\ntrusted_networks = 10.0.0.0/8, ::1/128\n")
    nets = load_config(path, environ={}).policy.trusted_networks
    assert [str(n) for n in nets] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("text, where", [
    ("[policy]\nlisten = nowhere\n", "[policy] listen"),
    ("[policy]\ncount_at = QUIT\n", "[policy] count_at"),
    ("[policy]\ntrusted_networks = 10.0.0.0/33\n", "[policy] trusted_networks"),
    ("[policy]\nidle_timeout = -1\n", "[policy] idle_timeout"),
    ("[outbound]\nbounce_rate_limit = 3\n", "[outbound] bounce_rate_limit"),
    ("[outbound]\ntimezone = Mars/Olympus\n", "[outbound] timezone"),
    ("[outbound]\ndefault_tier = platinum\n", "[outbound] default_tier"),
    ("[tiers]\ngold = lots\n", "[tiers] gold"),
    ("[ses]\nauto_verify = maybe\n", "[ses] auto_verify"),
    ("[policy]\nlisen = 127.0.0.1:1\n", "[policy] lisen"),
    ("[polcy]\nlisten = 127.0.0.1:1\n", "[polcy]"),
])
def test_errors_name_section_and_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "c.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(where)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policyd", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_check_config_command(tmp_path: Path) -> None:
    good = _cli("check-config", "--config", str(EXAMPLE))
    assert good.returncode == 0 and "configuration ok" in good.stdout
    bad = tmp_path / "bad.ini"
    bad.write_text("[policy]\non_error = explode\n")
    result = _cli("check-config", "--config", str(bad))
    assert result.returncode != 0
    assert "[policy] on_error" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = _cli("check-config", "--config", str(tmp_path / "nope.ini"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr


def test_check_config_and_serve_warn_about_an_empty_topic_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from policyd import cli
    from policyd.config import warnings

    empty = tmp_path / "empty.ini"
    empty.write_text("[sns]\nallowed_topic_arns =\n")
    assert cli.main(["check-config", "--config", str(empty)]) == 0
    err = capsys.readouterr().err
    assert "warning: [sns] allowed_topic_arns is empty" in err
    listed = tmp_path / "listed.ini"
    listed.write_text("[sns]\nallowed_topic_arns = arn:aws:sns:us-east-1:1:t\n")
    assert cli.main(["check-config", "--config", str(listed)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert warnings(load_config(listed)) == []
