"""Shared fixtures: a real daemon (store on a tmp_path SQLite file, the aiohttp app through
aiohttp's test server, the policy server on an ephemeral port) and raw-bytes policy clients."""
from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from policyd.config import Config, load_config
from policyd.main import build_runtime, services
from policyd.runtime import Runtime
from policyd.ses import SesStatus
from policyd.sesflow import _store_status
from policyd.store import Store
from tests.dnsserver import dns_server  # noqa: F401  (pytest fixture)
from tests.hookserver import HookReceiver
from tests.snsfake import CertServer

MASTER = "test-master-token-0123456789abcdef"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.pop("POLICYD_MASTER_TOKEN", None)

BASE_SECTIONS: dict[str, dict[str, str]] = {
    "policy": {"listen": "127.0.0.1:0"},
    "api": {"listen": "127.0.0.1:0"},
    "auth": {"master_token": MASTER},
    "ses": {"auto_verify": "false", "endpoint_url": "http://127.0.0.1:9"},
    "scheduler": {"enabled": "false"},
}


def write_config(path: Path, sections: dict[str, dict[str, str]]) -> Path:
    """Write an INI file from {section: {key: value}}."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config on a SQLite file in tmp_path; keyword args override sections."""
    def make(**overrides: dict[str, str]) -> Config:
        sections = {name: dict(values) for name, values in BASE_SECTIONS.items()}
        sections["database"] = {"path": str(tmp_path / "policyd.sqlite3")}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return load_config(write_config(tmp_path / "policyd.ini", sections))
    return make


class PolicyClient:
    """A raw-bytes Postfix policy client on one persistent connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "PolicyClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def ask(self, **attrs: Any) -> str:
        """Send one request; return the action (the text after 'action=')."""
        self.writer.write(request_bytes(**attrs))
        reply = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), 10)
        assert reply.startswith(b"action="), reply
        return reply[7:-2].decode()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def request_bytes(**attrs: Any) -> bytes:
    """Encode a policy request; defaults to an outbound END-OF-MESSAGE from attrs['sender']."""
    base = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "protocol_name": "ESMTP", "client_address": "192.0.2.10", "recipient_count": "1",
            "size": "1000", "instance": "1.1"}
    base.update({k: str(v) for k, v in attrs.items()})
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


async def reply_until_closed(port: int, payload: bytes) -> bytes:
    """Send payload to the policy port; everything it sends back until it closes the
    connection (b'' when it sends nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def outbound(sender: str, **attrs: Any) -> dict[str, Any]:
    """Attributes of an authenticated (outbound) request from sender."""
    return {"sender": sender, "sasl_username": attrs.pop("sasl_username", sender),
            "recipient": "rcpt@example.org", **attrs}


class Daemon:
    """A running daemon: the API through aiohttp's test client, the policy port, the store."""

    def __init__(self, rt: Runtime, client: TestClient, app: web.Application) -> None:
        self.rt, self.client, self.app = rt, client, app

    @property
    def policy_port(self) -> int:
        return self.rt.policy_server.port

    async def api(self, method: str, path: str, body: Any = None, *,
                  token: str | None = MASTER, raw: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Call the API; returns (status, parsed JSON or text)."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": hdrs}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        resp = await self.client.request(method, path, **kwargs)
        text = await resp.text()
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, text

    async def partner(self, name: str = "acme", **fields: Any) -> dict[str, Any]:
        status, body = await self.api("POST", "/partners/", {"name": name, **fields})
        assert status == 201, body
        return body

    async def key(self, partner_id: int, **fields: Any) -> str:
        status, body = await self.api("POST", "/api-keys/", {"partner_id": partner_id, **fields})
        assert status == 201, body
        return body["token"]

    async def domain(self, name: str, *, token: str = MASTER, verified: bool = True,
                     **fields: Any) -> dict[str, Any]:
        status, body = await self.api("POST", "/domains/", {"name": name, **fields}, token=token)
        assert status == 201, body
        if verified:
            await self.verify(name)
        return body

    async def verify(self, name: str, status: str = "success") -> None:
        """Mark a domain's SES status (a store factory; SES itself is tested with moto)."""
        await self.rt.store.write(_store_status, name,
                                  SesStatus(status, "Success", "tok-" + name, ("a", "b", "c")))

    async def policy(self) -> PolicyClient:
        return await PolicyClient.connect(self.policy_port)

    async def stop(self) -> None:
        await self.client.close()


async def start_daemon(config: Config, *, ses: Any = "default") -> Daemon:
    """Start a daemon (store, API, policy server) for a test."""
    rt = build_runtime(config)
    if ses != "default":
        rt.ses = ses
    app = create_app(rt, config.auth.master_token, services(rt, scheduler=False, notifier=False))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    return Daemon(rt, client, app)


@pytest.fixture
async def daemon(make_config: Callable[..., Config]) -> AsyncIterator[Daemon]:
    """A running daemon with default test config (no SES calls, no scheduler)."""
    d = await start_daemon(make_config())
    yield d
    await d.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials and no local AWS profile, so nothing can reach a real account."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
async def cert_server() -> AsyncIterator[CertServer]:
    """Serves the SNS signing certificate and the SubscribeURL on 127.0.0.1."""
    server = CertServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[HookReceiver]:
    """A partner's notify_url on 127.0.0.1 that checks the HMAC signature."""
    hook = HookReceiver()
    await hook.start()
    yield hook
    await hook.stop()


@pytest.fixture(params=[True, False], ids=["on-loop", "thread-only"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A store whose policy batches run on the loop when they can, or always in its thread."""
    s = Store(tmp_path / "store.sqlite3", write_on_loop=request.param)
    await s.open()
    yield s
    await s.close()


class WriteLock:
    """Another process's write transaction on the daemon's database file."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> "WriteLock":
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def password_hash_of(conn: sqlite3.Connection, email: str) -> str | None:
    """A mailbox's password hash as stored (what Dovecot's passdb reads): a test oracle, read
    straight from the table (the product never reads it back)."""
    row = conn.execute("SELECT password_hash FROM mailboxes WHERE email = ?", (email,)).fetchone()
    return row[0] if row else None


def submit_batched(store: Store, fn: Callable[..., Any], arg: Any,
                   budget: float | None = None) -> asyncio.Future[Any]:
    """Store.submit_batched, its callback turned into a future."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(result: Any, error: BaseException | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    store.submit_batched(fn, arg, done, budget=budget)
    return future
