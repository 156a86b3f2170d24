"""`policyd serve` and the other subcommands as real processes, for the operations tests."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from policyd.config import load_config
from policyd.ses import SesStatus
from policyd.sesflow import _store_status
from policyd.store import Store, connect, counters
from policyd.store import domains as domain_store
from policyd.timeutil import Periods, utcnow
from tests.conftest import MASTER, write_config
from tests.ports import free_port

START_WAIT = 30.0  # bound on a daemon's start (never reached when all is well)
CLI_WAIT = 120.0  # bound on one subcommand


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def daemon_config(tmp_path: Path, db_path: Path, **overrides: dict[str, str]) -> Path:
    """A config file for a daemon on free ports (no SES calls, no scheduler unless told)."""
    sections: dict[str, dict[str, str]] = {
        "database": {"path": str(db_path)},
        "policy": {"listen": f"127.0.0.1:{free_port()}"},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        "auth": {"master_token": MASTER},
        "ses": {"auto_verify": "false", "endpoint_url": closed_port_url()},
        "scheduler": {"enabled": "false"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return write_config(tmp_path / "policyd.ini", sections)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a subcommand: ours, without a master token or journal stream."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("POLICYD_MASTER_TOKEN", "JOURNAL_STREAM")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m policyd ARGS` as a process of its own; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "policyd", *args, env=cli_env() if env is None else env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class DaemonProcess:
    """`policyd serve` as a child process; its log is drained (it logs every decision)."""

    def __init__(self, proc: asyncio.subprocess.Process, config: Path, policy_port: int,
                 api_port: int) -> None:
        self.proc, self.config = proc, config
        self.policy_port, self.api_port = policy_port, api_port
        self.listening = {"policy server listening": asyncio.Event(),
                          "API listening": asyncio.Event()}
        self.log: deque[str] = deque(maxlen=100)  # the last lines, for a failure message
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))
            for marker, event in self.listening.items():
                if marker.encode() in line:
                    event.set()

    async def started(self) -> None:
        """Wait until both servers listen, or fail if the process exits first."""
        ready = asyncio.ensure_future(
            asyncio.gather(*(e.wait() for e in self.listening.values())))
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({ready, exited}, timeout=START_WAIT,
                                     return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if ready not in done:
            ready.cancel()
            raise AssertionError(f"daemon did not start (exit code {self.proc.returncode}): "
                                 + "".join(self.log))

    async def stop(self) -> int:
        """SIGTERM (a graceful stop, as systemctl stop does); the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), START_WAIT)
        await self.drain
        return code

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call the daemon's API as the master; (status, JSON body)."""
        headers = {"Authorization": f"Bearer {MASTER}"}
        url = f"http://127.0.0.1:{self.api_port}{path}"
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.request(method, url, json=body) as resp:
                return resp.status, await resp.json(content_type=None)


@asynccontextmanager
async def serving(config: Path) -> AsyncIterator[DaemonProcess]:
    """`policyd serve --config config` until the block ends (then stopped, or killed)."""
    loaded = load_config(config)
    policy_port, api_port = loaded.policy.listen[1], loaded.api.listen[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "policyd", "serve", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=cli_env())
    daemon = DaemonProcess(proc, config, policy_port, api_port)
    try:
        await daemon.started()
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await daemon.drain


def domain_totals(db_path: Path, domain: str) -> counters.Totals:
    """A domain's counters for today and this month, read straight from a database file (of
    a daemon that may be dead)."""
    conn = connect(db_path, readonly=True)
    try:
        found = domain_store.find_domain(conn, domain)
        assert found is not None
        day, month = Periods("UTC").keys(utcnow())
        return counters.totals(conn, found.id, day, month)
    finally:
        conn.close()


def sent_today(db_path: Path, domain: str) -> int:
    """A domain's counter for today, read straight from a database file."""
    return domain_totals(db_path, domain).sent_today


async def mark_ses_verified(db_path: Path, domain: str) -> None:
    """Store a domain's SES verification as the poller would, from a second writer process
    on the daemon's database (as a CLI job is)."""
    store = Store(db_path)
    await store.open()
    try:
        await store.write(_store_status, domain,
                          SesStatus("success", "Success", "tok", ("a", "b", "c")))
    finally:
        await store.close()
