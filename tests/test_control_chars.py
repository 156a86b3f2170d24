"""Names never carry control characters (SPEC §8): every name the API, the CLI or the config
takes refuses C0, C1 and DEL with a clear error, and nothing of it is stored."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from policyd import cli
from policyd.config import ConfigError, load_config
from policyd.names import InvalidName, clean_text, normalize_domain, normalize_email
from tests.conftest import Daemon, write_config

CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9f"]


def _spliced(text: str, char: str) -> list[str]:
    """text with char at its start, inside it and at its end."""
    middle = len(text) // 2
    return [char + text, text[:middle] + char + text[middle:], text + char]


@pytest.mark.parametrize("char", CONTROLS, ids=repr)
def test_normalisers_refuse_control_characters(char: str) -> None:
    for name in _spliced("evil.example.com", char):
        with pytest.raises(InvalidName, match="control character"):
            normalize_domain(name)
    for address in _spliced("bob@example.com", char):
        with pytest.raises(InvalidName, match="control character"):
            normalize_email(address)
    with pytest.raises(InvalidName, match="control characters"):
        clean_text("Acme" + char + "Corp", "partner name")


def test_trailing_newline_no_longer_slips_past_the_label_pattern() -> None:
    # re.match with "$" accepts "evil\n": the label pattern must match whole labels
    with pytest.raises(InvalidName):
        normalize_domain("evil\n.example.com")
    assert normalize_domain(" Example.COM. ") == "example.com"


def _assert_invalid(status: int, body: Any) -> None:
    assert status == 400, body
    assert body["error"]["code"] == "invalid"


@pytest.mark.parametrize("char", ["\n", "\t", "\x00", "\x7f", "\x85"], ids=repr)
async def test_api_refuses_control_characters_in_every_name(daemon: Daemon, char: str) -> None:
    await daemon.domain("example.com")
    await daemon.api("POST", "/users/", {"email": "bob@example.com", "password": "x" * 12})
    partner = await daemon.partner("acme")

    for name in _spliced("evil.example.com", char):
        _assert_invalid(*await daemon.api("POST", "/domains/", {"name": name}))
    for email in _spliced("eve@example.com", char):
        _assert_invalid(*await daemon.api("POST", "/users/",
                                          {"email": email, "password": "x" * 12}))
    _assert_invalid(*await daemon.api("POST", "/aliases/", {
        "source": "info@example.com", "destinations": ["bob@example.com" + char]}))
    _assert_invalid(*await daemon.api("POST", "/aliases/", {
        "source": "in" + char + "fo@example.com", "destinations": ["bob@example.com"]}))
    _assert_invalid(*await daemon.api("POST", "/aliases/", {
        "source": "@example.com" + char, "destinations": ["bob@example.com"]}))
    _assert_invalid(*await daemon.api("POST", "/partners/", {"name": "Ev" + char + "il"}))
    _assert_invalid(*await daemon.api("PUT", f"/partners/{partner['id']}",
                                      {"name": "Ev" + char + "il"}))
    _assert_invalid(*await daemon.api("PUT", f"/partners/{partner['id']}",
                                      {"notify_url": "https://hook.example/" + char}))
    _assert_invalid(*await daemon.api("POST", "/api-keys/",
                                      {"partner_id": partner["id"], "name": "k" + char}))
    _assert_invalid(*await daemon.api("PUT", "/users/bob@example.com",
                                      {"name": "Bob" + char}))
    # path parameters too, percent-encoded
    status, body = await daemon.api("GET", "/domains/" + quote("example.com" + char))
    _assert_invalid(status, body)

    # nothing of it was stored
    _, domains = await daemon.api("GET", "/domains/")
    assert [d["name"] for d in domains["items"]] == ["example.com"]
    _, users = await daemon.api("GET", "/users/")
    assert [u["email"] for u in users["items"]] == ["bob@example.com"]
    _, aliases = await daemon.api("GET", "/aliases/")
    assert aliases["items"] == []
    _, partners = await daemon.api("GET", "/partners/")
    assert [p["name"] for p in partners["items"]] == ["acme"]
    assert partners["items"][0]["notify_url"] is None


async def test_refused_name_never_forges_a_log_line(daemon: Daemon,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await daemon.api("POST", "/domains/", {"name": "evil\nINFO forged: admin logged in"})
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()


@pytest.mark.parametrize("section,key,value", [
    ("dns", "spf_include", "amazonses.com\x01"),
    ("database", "path", "/tmp/db\x1b[31m.sqlite3"),
    ("auth", "master_token", "tok\x7fen"),
    ("policy", "trusted_networks", "10.0.0.0/8,\x0b192.168.0.0/16"),
    ("tiers", "gold", "5/\x0710"),
])
def test_config_refuses_control_characters(tmp_path: Path, section: str, key: str,
                                           value: str) -> None:
    path = write_config(tmp_path / "p.ini", {section: {key: value}})
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}: contains a control"):
        load_config(path)


def test_config_lists_may_span_lines(tmp_path: Path) -> None:
    path = write_config(tmp_path / "p.ini",
                        {"policy": {"trusted_networks": "10.0.0.0/8,\n    192.168.0.0/16"}})
    assert len(load_config(path).policy.trusted_networks) == 2


def test_environment_token_refuses_control_characters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POLICYD_MASTER_TOKEN"):
        load_config(None, environ={"POLICYD_MASTER_TOKEN": "abc\ndef"})


def test_cli_refuses_control_characters(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "p.ini",
                          {"database": {"path": str(tmp_path / "db.sqlite3")}})
    assert cli.main(["init-db", "--config", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["partner", "create", "Ev\nil", "--config", str(config)]) == 1
    assert "control characters" in capsys.readouterr().err
    assert cli.main(["partner", "create", "Acme", "--notify-url", "https://x/\r\n",
                     "--config", str(config)]) == 1
    assert cli.main(["partner", "create", "Acme", "--config", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["key", "create", "--partner", "1", "--name", "k\x00",
                     "--config", str(config)]) == 1
    assert "control characters" in capsys.readouterr().err
