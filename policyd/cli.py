"""The `policyd` command line: serve, and the one-shot jobs systemd timers and operators run."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from policyd import jobs, logsetup
from policyd.config import Config, ConfigError, load_config
from policyd.config import warnings as config_warnings
from policyd.errors import Invalid, PolicydError
from policyd.names import InvalidName, clean_text, has_control
from policyd.runtime import Runtime
from policyd.ses import SesError
from policyd.store import StoreError
from policyd.store.backup import BackupError, backup
from policyd.store import partners as partner_store
from policyd.store.scope import Scope

log = logging.getLogger("policyd")
CLI = Scope(actor="cli")
# The subcommands that run without a database file (serve and init-db create it); every other
# one refuses a missing file, so a wrong path (a typo in --config or [database] path) fails
# instead of working on a new, empty database.
DATABASE_OPTIONAL = ("serve", "init-db", "check-config")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policyd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", metavar="PATH", help="INI file (default: built-in defaults)")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
        return p

    command("serve", "run the policy server, the API and the scheduler")
    command("init-db", "create or migrate the database")
    command("check-config", "validate the configuration and report errors")
    for name in ("reset-daily", "reset-monthly", "purge-retention", "ses-poll"):
        command(name, f"run the {name} job once")
    backup_cmd = command("backup", "write a consistent copy of the database while serve runs")
    backup_cmd.add_argument("dest", metavar="DEST",
                            help="file to write (replaced whole), or a directory for a dated file")
    partner = sub.add_parser("partner", help="manage partners").add_subparsers(
        dest="action", required=True)
    p = partner.add_parser("create", help="create a partner (prints its id and notify secret)")
    p.add_argument("name")
    for flag_name in ("--max-domains", "--max-mailboxes-per-domain", "--max-aliases-per-mailbox"):
        p.add_argument(flag_name, type=int, default=None)
    p.add_argument("--notify-url", default=None)
    p.add_argument("--config", metavar="PATH")
    p.add_argument("--log-level", default="WARNING")
    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action",
                                                                      required=True)
    k = key.add_parser("create", help="create an API key (prints its id and token, once)")
    k.add_argument("--partner", type=int, required=True)
    k.add_argument("--expires", default=None, help="ISO-8601 expiry")
    k.add_argument("--name", default=None)
    k.add_argument("--config", metavar="PATH")
    k.add_argument("--log-level", default="WARNING")
    return parser


async def _with_store(config: Config, job: Callable[[Runtime], Awaitable[Any]]) -> Any:
    from policyd.main import build_runtime

    rt = build_runtime(config)
    await rt.store.open()
    try:
        return await job(rt)
    finally:
        if rt.sns is not None:
            await rt.sns.close()
        await rt.store.close()


def _text_arg(value: str | None, what: str) -> str | None:
    """A name given on the command line, held to the API's rules (no control characters)."""
    if value is None:
        return None
    try:
        return clean_text(value, what)
    except InvalidName as exc:
        raise Invalid(str(exc)) from None


def _url_arg(value: str | None) -> str | None:
    if value is not None and (has_control(value) or
                              not value.startswith(("https://", "http://"))):
        raise Invalid("--notify-url must be an http(s) URL without control characters")
    return value


async def _partner_create(rt: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    fields = {"name": _text_arg(args.name, "partner name"), "max_domains": args.max_domains,
              "max_mailboxes_per_domain": args.max_mailboxes_per_domain,
              "max_aliases_per_mailbox": args.max_aliases_per_mailbox,
              "notify_url": _url_arg(args.notify_url)}
    partner, secret = await rt.store.write(partner_store.create_partner, CLI, fields)
    return {**partner.public(), "notify_secret": secret}


async def _key_create(rt: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    key, token = await rt.store.write(partner_store.create_key, CLI,
                                      args.partner, _text_arg(args.name, "key name"),
                                      partner_store.parse_expiry(args.expires))
    log.info("API key %s created for partner %s by cli", key.id, key.partner_id)
    return {"id": key.id, "token": token, "partner_id": key.partner_id,
            "expires_at": key.expires_at}


def _jobs(args: argparse.Namespace) -> Callable[[Runtime], Awaitable[Any]] | None:
    table: dict[str, Callable[[Runtime], Awaitable[Any]]] = {
        "reset-daily": lambda rt: jobs.reset(rt, "day"),
        "reset-monthly": lambda rt: jobs.reset(rt, "month"),
        "purge-retention": jobs.purge_retention,
        "ses-poll": jobs.ses_poll,
        "init-db": lambda rt: asyncio.sleep(0, {"database": str(rt.config.db_path)}),
    }
    if args.command == "partner":
        return lambda rt: _partner_create(rt, args)
    if args.command == "key":
        return lambda rt: _key_create(rt, args)
    return table.get(args.command)


def _check_config(config: Config) -> int:
    from policyd.retention import maildir_root

    try:
        maildir_root(config.mail.maildir_root)
    except ValueError as exc:
        _fail(f"[mail] maildir_root: {exc}")
        return 1
    for warning in config_warnings(config):
        print(f"policyd: warning: {warning}", file=sys.stderr)
    print(f"configuration ok ({config.source or 'built-in defaults'})")
    if not config.db_path.exists():  # not an error: serve or init-db creates it
        print(f"database {config.db_path.resolve()} does not exist yet")
    return 0


def _fail(text: str) -> None:
    """The one-line error a failing command ends with."""
    logsetup.error_line(f"policyd: {text}")


def _missing_database(config: Config) -> str | None:
    """The error for a database file that does not exist, or None when it does."""
    if config.db_path.exists():
        return None
    return (f"database {config.db_path.resolve()} does not exist (check [database] path; "
            "`policyd init-db` creates it)")


def _run(args: argparse.Namespace, config: Config) -> Any:
    """Run a command on the database; returns what to print (None: nothing)."""
    if args.command == "serve":
        from policyd.main import serve
        asyncio.run(serve(config))
        return None
    if args.command == "backup":
        return backup(config.db_path, Path(args.dest),
                      busy_timeout=config.database.busy_timeout)
    job = _jobs(args)
    assert job is not None
    return asyncio.run(_with_store(config, job))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `policyd` command."""
    args = _parser().parse_args(argv)
    # one line per policy decision: skip record fields the format never shows
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logsetup.configure(args.log_level)
    try:
        config = load_config(args.config)
        if args.command == "check-config":
            return _check_config(config)
        missing = None if args.command in DATABASE_OPTIONAL else _missing_database(config)
        if missing:
            _fail(f"{args.command}: {missing}")
            return 1
        result = _run(args, config)
    except ConfigError as exc:
        _fail(f"config error: {exc}")
        return 2
    except (PolicydError, StoreError, SesError, BackupError, OSError, sqlite3.Error) as exc:
        _fail(f"{args.command}: {_one_line(getattr(exc, 'message', exc))}")
        return 1
    except KeyboardInterrupt:
        return 130
    if isinstance(result, Path):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _one_line(message: object) -> str:
    """An error message as one line (journald and timers show the first line only)."""
    return " ".join(str(message).split())


if __name__ == "__main__":
    sys.exit(main())
