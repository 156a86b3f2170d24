"""Litestream replicating a real `policyd serve` to moto's S3, killed and restored.

The pieces of one disaster, all real processes on loopback: moto in server mode as the S3
endpoint (the real S3 code path of Litestream, offline), `litestream replicate` with a config
rendered from conf/litestream.yml (only paths, ports and intervals changed), `policyd serve`
on a database seeded through the store, and policy clients that note when each DUNNO came
back. Then SIGKILL of both, `litestream restore` and the restored counter against the answers.

Used by tests/test_litestream.py (one trial, in CI) and bench/litestream_rpo.py (many trials,
two sync intervals: the RPO in the README).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from policyd.ses import SesStatus
from policyd.sesflow import _store_status
from policyd.store import Store
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER
from tests.daemon_process import domain_totals
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "litestream.yml"
DOMAIN = "replicated.example"
BUCKET = "policyd-replica"
REGION = "us-east-1"
MASTER_TOKEN = "litestream-master-token-0123456789"
START_WAIT = 30.0  # bound on a process coming up (never reached when all is well)
# What conf/litestream.yml says, and what a rendering replaces it with.
CONF_DB = "/var/lib/policyd/policyd.sqlite3"
CONF_SOCKET = "/run/policyd-litestream/litestream.sock"
CONF_ADDR = "127.0.0.1:9090"
CONF_INTERVALS = ("monitor-interval: 1s", "sync-interval: 1s")


def litestream_binary() -> str | None:
    """The `litestream` of the replication extra (beside this Python), else one on PATH."""
    beside = Path(sys.executable).with_name("litestream")
    return str(beside) if beside.is_file() else shutil.which("litestream")


def render_conf(dest: Path, db: Path, control_socket: Path, metrics_port: int,
                interval: str = "1s") -> Path:
    """conf/litestream.yml with this run's database, socket, metrics port and intervals."""
    text = CONF.read_text(encoding="utf-8")
    swaps = {CONF_DB: str(db), CONF_SOCKET: str(control_socket),
             CONF_ADDR: f"127.0.0.1:{metrics_port}",
             **{line: line.replace("1s", interval) for line in CONF_INTERVALS}}
    for old, new in swaps.items():
        assert old in text, f"conf/litestream.yml no longer says {old!r}"
        text = text.replace(old, new)
    dest.write_text(text, encoding="utf-8")
    return dest


async def wait_port(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    """Return once 127.0.0.1:port accepts connections; fail if proc exits first."""
    async with asyncio.timeout(START_WAIT):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"{what} exited with {proc.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None
                ) -> asyncio.subprocess.Process:
    """Start a process with stdout and stderr going to log."""
    with open(log, "ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, env=env)


async def kill(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL proc if it still runs, and reap it."""
    if proc is None:
        return
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


class MotoS3:
    """moto in server mode on a free port, with the replica bucket created."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(self.port)], self.workdir / "moto.log")
        await wait_port(self.port, self.proc, "moto server")
        await asyncio.to_thread(self._create_bucket)

    def _create_bucket(self) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)

    def replica_url(self, prefix: str) -> str:
        """An S3-compatible replica URL as conf/litestream.env takes it."""
        return f"s3://{BUCKET}/{prefix}?endpoint={self.url}&region={REGION}"

    async def stop(self) -> None:
        await kill(self.proc)


class Litestream:
    """`litestream` with one rendered config: replicate (a process), sync, list, restore."""

    def __init__(self, binary: str, config: Path, db: Path, control_socket: Path,
                 metrics_port: int, replica_url: str) -> None:
        self.binary, self.config, self.db = binary, config, db
        self.socket, self.metrics_port = control_socket, metrics_port
        self.log = config.with_suffix(".log")
        # What /etc/policyd/litestream.env gives the units; nothing else of ours leaks in
        # (AWS_CA_BUNDLE, set on some machines, breaks Litestream's S3 client).
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "LITESTREAM_"))}
        self.env.update({"LITESTREAM_REPLICA_URL": replica_url,
                         "LITESTREAM_ACCESS_KEY_ID": "testing",
                         "LITESTREAM_SECRET_ACCESS_KEY": "testing",
                         "AWS_EC2_METADATA_DISABLED": "true"})
        self.proc: asyncio.subprocess.Process | None = None

    async def replicate(self) -> None:
        """Start `litestream replicate` and wait for its control socket."""
        self.proc = await spawn([self.binary, "replicate", "-config", str(self.config)],
                                self.log, self.env)
        async with asyncio.timeout(START_WAIT):
            while not self.socket.exists():
                if self.proc.returncode is not None:
                    raise AssertionError(f"litestream exited with {self.proc.returncode}: "
                                         + self.log.read_text()[-2000:])
                await asyncio.sleep(0.05)

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.request(method, f"http://litestream{path}", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json(content_type=None)

    async def entry(self) -> dict[str, Any] | None:
        """Our database in the control socket's `GET /list`, if listed."""
        listed = await self._call("GET", "/list")
        found = [d for d in listed["databases"] if d["path"] == str(self.db)]
        return found[0] if found else None

    async def first_sync(self) -> None:
        """Wait until the database has been synced to the replica once."""
        async with asyncio.timeout(START_WAIT):
            while True:
                entry = await self.entry()
                if entry and entry.get("last_sync_at"):
                    return
                await asyncio.sleep(0.05)

    async def sync(self) -> dict[str, Any]:
        """Force a sync and wait until the replica has it: {"txid", "replicated_txid", ...}."""
        return await self._call("POST", "/sync", {"path": str(self.db), "wait": True})

    async def metrics(self) -> str:
        """Litestream's Prometheus endpoint (`addr`)."""
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
                assert resp.status == 200
                return await resp.text()

    async def restore(self, output: Path) -> float:
        """`litestream restore -config ... -o output DB`; the seconds it took."""
        started = time.monotonic()
        proc = await spawn([self.binary, "restore", "-config", str(self.config),
                            "-integrity-check", "quick", "-o", str(output), str(self.db)],
                           self.log, self.env)
        assert await proc.wait() == 0, self.log.read_text()[-2000:]
        return time.monotonic() - started


def policyd_config(workdir: Path, db: Path, policy_port: int, api_port: int,
                   control_socket: Path | None = None) -> Path:
    """A daemon config: this database and ports, no AWS, no scheduler, no decision log."""
    lines = [f"[database]\npath = {db}",
             f"[policy]\nlisten = 127.0.0.1:{policy_port}\nlog_decisions = false",
             f"[api]\nlisten = 127.0.0.1:{api_port}",
             f"[auth]\nmaster_token = {MASTER_TOKEN}",
             "[ses]\nauto_verify = false\nendpoint_url = http://127.0.0.1:9",
             "[scheduler]\nenabled = false"]
    if control_socket is not None:
        lines.append(f"[replication]\ncontrol_socket = {control_socket}\npoll_interval = 0.2")
    path = workdir / f"policyd-{policy_port}.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Policyd:
    """`policyd serve` as a child process."""

    def __init__(self, workdir: Path, db: Path, control_socket: Path | None = None) -> None:
        self.policy_port, self.api_port = free_port(), free_port()
        self.config = policyd_config(workdir, db, self.policy_port, self.api_port,
                                     control_socket)
        self.log = self.config.with_suffix(".log")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "POLICYD_MASTER_TOKEN"}
        self.proc = await spawn([sys.executable, "-m", "policyd", "serve", "--config",
                                 str(self.config)], self.log, env)
        await wait_port(self.policy_port, self.proc, "policyd")
        await wait_port(self.api_port, self.proc, "policyd")

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {MASTER_TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.request(method, f"http://127.0.0.1:{self.api_port}{path}",
                                    json=body) as resp:
                return resp.status, await resp.json(content_type=None)

    async def ask(self) -> bytes:
        """One outbound END-OF-MESSAGE request on a new connection; the reply."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.policy_port)
        try:
            writer.write(REQUEST)
            return await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                pass
        await kill(self.proc)


def _request() -> bytes:
    sender = f"user@{DOMAIN}"
    attrs = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
             "protocol_name": "ESMTP", "client_address": "192.0.2.10",
             "sasl_username": sender, "sender": sender, "recipient": "rcpt@example.org",
             "recipient_count": "1", "size": "1000", "instance": "1.1"}
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


REQUEST = _request()


def _seed_rows(conn: Any) -> None:
    domain_store.create_domain(conn, MASTER, DOMAIN, None, "unlimited", (None, None))
    _store_status(conn, DOMAIN, SesStatus("success", "Success", "tok", ("a", "b", "c")))


async def seed(db: Path) -> None:
    """One SES-verified domain without limits, written through the store."""
    store = Store(db)
    await store.open()
    try:
        await store.write(_seed_rows)
    finally:
        await store.close()


def sent_month(db: Path) -> int:
    """The domain's messages this month, read from a database file."""
    return domain_totals(db, DOMAIN).sent_month


class Load:
    """Clients on persistent connections noting when each DUNNO came back (monotonic)."""

    def __init__(self, port: int, connections: int) -> None:
        self.port, self.connections = port, connections
        self.answered: list[float] = []
        self.other: list[bytes] = []
        self.in_flight = 0  # sent and never answered (the daemon died first)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.connections)]

    async def _client(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while True:
                writer.write(REQUEST)
                try:
                    reply = await reader.readuntil(b"\n\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.in_flight += 1
                    return
                if reply == b"action=DUNNO\n\n":
                    self.answered.append(time.monotonic())
                else:
                    self.other.append(reply)
        finally:
            writer.close()

    async def wait_answers(self, count: int) -> None:
        """Wait until count DUNNO replies have come back."""
        async with asyncio.timeout(START_WAIT):
            while len(self.answered) < count:
                await asyncio.sleep(0.01)

    async def finish(self) -> None:
        """Wait for every client to see its connection end (after the daemon is killed)."""
        async with asyncio.timeout(START_WAIT):
            await asyncio.gather(*self._tasks)


@dataclass(frozen=True)
class Outcome:
    """One trial: what was answered, what the restore holds, and the gap in seconds."""

    answered: int  # DUNNO replies received before the kill (each a committed increment)
    synced: int  # answered before a forced sync the replica confirmed
    in_flight: int  # requests sent and never answered
    restored: int  # the counter in the restored database
    lost: int  # answered increments the restore lacks
    lost_seconds: float  # how long before the kill the oldest lost answer came back
    load_seconds: float  # from the first answer to the kill
    restore_seconds: float
    max_wal_bytes: int  # largest -wal file seen during the load

    @property
    def rate(self) -> float:
        return self.answered / self.load_seconds if self.load_seconds else 0.0


def lost_window(answered: list[float], restored: int, killed_at: float) -> float:
    """Seconds of answered increments the restore misses: from the first answer not in it
    (answers come back in commit order: the restore holds the first `restored` of them) to
    the kill; 0 when it holds them all."""
    ordered = sorted(answered)
    if restored >= len(ordered):
        return 0.0
    return max(0.0, killed_at - ordered[restored])


During = Callable[["Policyd", Litestream], Awaitable[None]]


async def trial(workdir: Path, moto: MotoS3, binary: str, *, interval: str = "1s",
                connections: int = 10, load_seconds: float = 3.0,
                during: During | None = None) -> tuple[Outcome, Path]:
    """Seed, replicate under load, kill -9 both, restore: the outcome and the restored
    database. `during(daemon, litestream)` runs under load before the kill; with it the
    daemon watches Litestream's control socket ([replication])."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "primary" / "policyd.sqlite3"
    db.parent.mkdir()
    await seed(db)
    control = workdir / "litestream.sock"
    metrics_port = free_port()
    config = render_conf(workdir / "litestream.yml", db, control, metrics_port, interval)
    litestream = Litestream(binary, config, db, control, metrics_port,
                            moto.replica_url(workdir.name))
    daemon = Policyd(workdir, db, control if during else None)
    load = Load(daemon.policy_port, connections)
    wal = Path(f"{db}-wal")
    max_wal = 0
    try:
        await litestream.replicate()  # as the units order it: Litestream first
        await daemon.start()
        await litestream.first_sync()
        load.start()
        await load.wait_answers(100)
        synced = len(load.answered)
        # Returns once the replica holds all the WAL had when asked (its `txid` may already
        # be one more: a sync of Litestream's own that ran meanwhile).
        confirmed = await litestream.sync()
        assert confirmed["status"] in ("synced", "no_change"), confirmed
        deadline = time.monotonic() + load_seconds
        if during is not None:
            await during(daemon, litestream)
        while time.monotonic() < deadline:
            max_wal = max(max_wal, wal.stat().st_size if wal.exists() else 0)
            await asyncio.sleep(0.05)
        assert litestream.proc is not None and daemon.proc is not None
        litestream.proc.send_signal(signal.SIGKILL)  # the host dies: both at once
        daemon.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # reaped here, so that kill() below never signals (and reaps) them a second time
        assert await litestream.proc.wait() == await daemon.proc.wait() == -signal.SIGKILL
        await load.finish()
    finally:
        await kill(litestream.proc)
        await kill(daemon.proc)
    assert load.other == [], load.other[:3]
    answered = load.answered
    restored_db = workdir / "restored" / "policyd.sqlite3"
    restore_seconds = await litestream.restore(restored_db)
    restored = sent_month(restored_db)
    outcome = Outcome(
        answered=len(answered), synced=synced, in_flight=load.in_flight, restored=restored,
        lost=max(0, len(answered) - restored),
        lost_seconds=lost_window(answered, restored, killed_at),
        load_seconds=killed_at - min(load.answered), restore_seconds=restore_seconds,
        max_wal_bytes=max_wal)
    return outcome, restored_db
