"""The one-shot subcommands as an operator (or a systemd timer) runs them (SPEC §10).

A missing database is refused, never created; `ses-poll` fails when SES could not be asked;
every failure is one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from policyd.config import load_config
from policyd.store import Store
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER as MASTER_SCOPE
from tests.daemon_process import cli_env, closed_port_url, daemon_config, run_cli

# Every subcommand but serve, init-db and check-config, with its arguments.
ONE_SHOT = [
    ["reset-daily"], ["reset-monthly"], ["purge-retention"], ["ses-poll"],
    ["partner", "create", "acme"], ["key", "create", "--partner", "1"],
    ["backup", "{dest}"],
]


def last_line(err: str) -> str:
    """The line a failing command ends with; there is no traceback before it."""
    assert "Traceback" not in err, err
    return err.rstrip("\n").splitlines()[-1]


async def test_one_shot_commands_refuse_a_missing_database(tmp_path: Path) -> None:
    db_path = tmp_path / "typo" / "policyd.sqlite3"
    config = daemon_config(tmp_path, db_path)
    dest = str(tmp_path / "copy.sqlite3")
    runs = [[part.format(dest=dest) for part in command] for command in ONE_SHOT]

    results = await asyncio.gather(*(run_cli(*command, "--config", str(config))
                                     for command in runs))

    for command, (code, out, err) in zip(runs, results):
        name = " ".join(command[:1])
        assert code == 1 and out == "", (command, code, out, err)
        assert err.splitlines() == [
            f"policyd: {name}: database {db_path} does not exist (check [database] path; "
            "`policyd init-db` creates it)"], command
    assert not db_path.parent.exists()
    assert not Path(dest).exists()


async def test_init_db_creates_the_database_and_check_config_only_notes_it(
        tmp_path: Path) -> None:
    db_path = tmp_path / "new" / "policyd.sqlite3"
    config = daemon_config(tmp_path, db_path)

    code, out, err = await run_cli("check-config", "--config", str(config))
    assert code == 0, err
    assert out.splitlines() == [f"configuration ok ({config})",
                                f"database {db_path} does not exist yet"]
    assert not db_path.exists()

    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err
    code, out, err = await run_cli("reset-daily", "--config", str(config))
    assert code == 0, err
    assert '"kind": "daily"' in out


async def test_a_database_path_that_is_no_database_file_fails_in_one_line(
        tmp_path: Path) -> None:
    db_path = tmp_path / "a-directory"
    db_path.mkdir()
    config = daemon_config(tmp_path, db_path)

    code, out, err = await run_cli("reset-daily", "--config", str(config))

    assert code == 1 and out == ""
    assert last_line(err) == "policyd: reset-daily: unable to open database file"


async def pending_domain(config: Path) -> None:
    """A domain whose SES verification has not started (the poller's work)."""
    loaded = load_config(config)
    store = Store(loaded.db_path)
    await store.open()
    try:
        await store.write(domain_store.create_domain, MASTER_SCOPE, "pending.example", None,
                          "standard", loaded.tiers["standard"])
    finally:
        await store.close()


async def test_ses_poll_fails_when_ses_is_unreachable(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3",
                           ses={"endpoint_url": closed_port_url()})
    await pending_domain(config)

    code, out, err = await run_cli("ses-poll", "--config", str(config))

    assert code == 1 and out == ""
    assert last_line(err) == ("policyd: ses-poll: SES get_identity_verification_attributes "
                              "failed: EndpointConnectionError")


async def test_ses_poll_fails_without_aws_credentials(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3")
    await pending_domain(config)
    env = {k: v for k, v in cli_env().items()
           if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))

    code, out, err = await run_cli("ses-poll", "--config", str(config), env=env)

    assert code == 1 and out == ""
    assert last_line(err) == ("policyd: ses-poll: SES get_identity_verification_attributes "
                              "failed: NoCredentialsError")


async def test_ses_poll_with_nothing_pending_asks_nothing_and_succeeds(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3",
                           ses={"endpoint_url": closed_port_url()})
    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err

    code, out, err = await run_cli("ses-poll", "--config", str(config))

    assert code == 0, err
    assert '"checked": 0' in out


async def test_key_create_logs_the_key_id_never_the_token(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3")
    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err
    code, _, err = await run_cli("partner", "create", "acme", "--config", str(config))
    assert code == 0, err

    code, out, err = await run_cli("key", "create", "--partner", "1", "--config", str(config),
                                   "--log-level", "INFO")

    assert code == 0, err
    created = json.loads(out)
    assert f"API key {created['id']} created for partner 1 by cli" in err
    assert created["token"] not in err
