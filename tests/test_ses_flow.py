"""Amazon SES end to end: the running daemon against moto in server mode on 127.0.0.1.

Creation starts verification (tokens and DNS records in the response), an unreachable SES never
fails creation and the poller starts it later, wildcard subdomains inherit without an SES call,
ses-verify is master-only and audited, ses-status stores what SES says, and the poller batches
by 100 and notifies the partner exactly once, signed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from policyd import jobs
from policyd.config import Config
from policyd.ses import SesUnavailable
from policyd.store import domains as domain_store
from policyd.store import outbox
from policyd.store.scope import MASTER as MASTER_SCOPE
from tests.conftest import Daemon, outbound, start_daemon
from tests.hookserver import HookReceiver, notifier_running
from tests.ports import free_port

REGION = "us-east-1"
pytestmark = pytest.mark.usefixtures("aws_env")
STATUS_OPS = ("GetIdentityVerificationAttributes", "GetIdentityDkimAttributes")
START_OPS = ["VerifyDomainIdentity", "VerifyDomainDkim"]


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """moto in server mode on loopback: the daemon reaches it through [ses] endpoint_url."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_url(moto_server: str) -> Iterator[str]:
    """The moto server's URL; every test starts from an empty SES."""
    yield moto_server
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset",
                                                  method="POST")).close()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (SES unreachable)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
async def ses_daemon(make_config: Any, moto_url: str) -> AsyncIterator[Daemon]:
    """A daemon whose SES is moto, with auto_verify on."""
    daemon = await start_daemon(make_config(ses={"endpoint_url": moto_url,
                                                 "auto_verify": "true"}))
    yield daemon
    await daemon.stop()


class SesCalls:
    """Records every SES operation the daemon's boto3 client sends (a botocore event hook)."""

    def __init__(self) -> None:
        self.operations: list[str] = []
        self.identities: dict[str, list[int]] = {}
        self.responses: dict[str, dict[str, Any]] = {}

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.operations.append(model.name)
        if "Identities" in params:
            self.identities.setdefault(model.name, []).append(len(params["Identities"]))

    def answered(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        """after-call hook: keep what SES answered, as parsed off the wire."""
        self.responses[model.name] = parsed

    def starts(self) -> list[str]:
        """The operations that start a verification."""
        return [op for op in self.operations if op in START_OPS]


async def record_ses_calls(daemon: Daemon) -> SesCalls:
    """Hook a recorder onto the daemon's own SES client."""
    calls = SesCalls()
    client = await daemon.rt.ses.boto_client()
    client.meta.events.register("provide-client-params.ses", calls)
    client.meta.events.register("after-call.ses", calls.answered)
    return calls


async def moto_dkim_tokens(url: str, name: str) -> list[str]:
    """The DKIM tokens moto holds for name, read with an independent client."""
    def read() -> list[str]:
        client = boto3.client("ses", endpoint_url=url, region_name=REGION)
        dkim = client.get_identity_dkim_attributes(Identities=[name])
        return list(dkim["DkimAttributes"][name]["DkimTokens"])
    return await asyncio.to_thread(read)


async def run_cli(*args: str) -> tuple[int | None, str, str]:
    """Run `python -m policyd ARGS` as a process of its own; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "policyd", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def expected_records(name: str, token: str, dkim: list[str]) -> list[dict[str, str]]:
    """The _amazonses TXT and the three DKIM CNAMEs of a domain."""
    return [{"type": "TXT", "name": f"_amazonses.{name}", "value": token}] + [
        {"type": "CNAME", "name": f"{t}._domainkey.{name}", "value": f"{t}.dkim.amazonses.com"}
        for t in dkim]


async def audit_actions(daemon: Daemon, target: str) -> list[tuple[str, str]]:
    """(actor, action) of every audit entry about target."""
    status, body = await daemon.api("GET", f"/audit?target={target}")
    assert status == 200, body
    return [(entry["actor"], entry["action"]) for entry in body["items"]]


# --- creation -------------------------------------------------------------------------------

async def test_create_starts_verification_with_tokens_and_dns_records(
        ses_daemon: Daemon, moto_url: str) -> None:
    calls = await record_ses_calls(ses_daemon)
    status, created = await ses_daemon.api("POST", "/domains/", {"name": "Shop.Example.COM"})

    assert status == 201, created
    assert calls.operations == START_OPS
    token = calls.responses["VerifyDomainIdentity"]["VerificationToken"]
    dkim = calls.responses["VerifyDomainDkim"]["DkimTokens"]
    assert dkim == await moto_dkim_tokens(moto_url, "shop.example.com")
    assert created["ses"]["status"] == "pending"
    assert created["ses"]["verification_token"] == token
    assert created["ses"]["dkim_tokens"] == dkim and len(set(dkim)) == 3
    assert created["dns_records"] == expected_records("shop.example.com", token, dkim)
    status, shown = await ses_daemon.api("GET", "/domains/shop.example.com")
    assert (shown["ses"], shown["dns_records"]) == (created["ses"], created["dns_records"])


async def test_ses_status_reads_ses_and_stores_the_change(ses_daemon: Daemon) -> None:
    partner = await ses_daemon.partner("acme")
    token = await ses_daemon.key(partner["id"])
    other = await ses_daemon.key((await ses_daemon.partner("other"))["id"])
    await ses_daemon.domain("acme.example", token=token, verified=False)
    client = await ses_daemon.policy()
    assert (await client.ask(**outbound("a@acme.example"))).startswith("REJECT 5.7.1")
    calls = await record_ses_calls(ses_daemon)

    status, body = await ses_daemon.api("GET", "/domains/acme.example/ses-status", token=token)

    assert status == 200, body
    assert sorted(calls.operations) == sorted(STATUS_OPS)
    assert (body["status"], body["dkim_status"]) == ("success", "success")
    assert len(body["dns_records"]) == 4
    _, shown = await ses_daemon.api("GET", "/domains/acme.example")
    assert shown["ses"]["status"] == "success" and shown["ses"]["verified"] is True
    assert await client.ask(**outbound("a@acme.example")) == "DUNNO"
    status, _ = await ses_daemon.api("GET", "/domains/acme.example/ses-status", token=other)
    assert status == 404
    await client.close()


async def test_unreachable_ses_never_fails_creation_and_the_poller_starts_it(
        make_config: Any, moto_url: str) -> None:
    daemon = await start_daemon(make_config(ses={"endpoint_url": closed_port_url(),
                                                 "auto_verify": "true"}))
    try:
        status, created = await daemon.api("POST", "/domains/", {"name": "late.example"})
        assert status == 201, created
        assert created["ses"]["status"] == "not_started"
        assert (created["ses"]["verification_token"], created["dns_records"]) == (None, [])
        status, body = await daemon.api("GET", "/domains/late.example/ses-status")
        assert (status, body["status"]) == (200, "not_started")
        with pytest.raises(SesUnavailable):  # the round failed (`policyd ses-poll` exits 1)
            await jobs.ses_poll(daemon.rt)

        # SES is back: `policyd ses-poll`, a process of its own on the same database, starts it.
        fixed: Config = make_config(ses={"endpoint_url": moto_url})
        code, out, err = await run_cli("ses-poll", "--config", str(fixed.source))
        assert code == 0, err
        assert json.loads(out) == {"checked": 1, "started": 1, "verified": 0}
        _, shown = await daemon.api("GET", "/domains/late.example")
        ses = shown["ses"]
        assert ses["status"] == "pending" and ses["verification_token"]
        assert ses["dkim_tokens"] == await moto_dkim_tokens(moto_url, "late.example")
        assert shown["dns_records"] == expected_records("late.example",
                                                        ses["verification_token"],
                                                        ses["dkim_tokens"])
    finally:
        await daemon.stop()


async def test_subdomain_of_verified_wildcard_parent_inherits_without_ses_call(
        ses_daemon: Daemon) -> None:
    await ses_daemon.api("POST", "/domains/", {"name": "parent.example"})
    await ses_daemon.api("GET", "/domains/parent.example/ses-status")
    status, _ = await ses_daemon.api("PUT", "/domains/parent.example/parent", {"wildcard": True})
    assert status == 200
    calls = await record_ses_calls(ses_daemon)

    status, sub = await ses_daemon.api("POST", "/domains/", {"name": "mail.parent.example"})

    assert status == 201, sub
    assert (sub["parent"], sub["ses"]["status"]) == ("parent.example", "inherited")
    assert await jobs.ses_poll(ses_daemon.rt) == {"checked": 0, "started": 0, "verified": 0}
    assert calls.operations == []
    client = await ses_daemon.policy()
    assert await client.ask(**outbound("news@mail.parent.example")) == "DUNNO"
    await client.close()


async def test_subdomain_of_unverified_wildcard_parent_is_verified_itself(
        ses_daemon: Daemon) -> None:
    status, _ = await ses_daemon.api("POST", "/domains/", {"name": "slow.example"})
    await ses_daemon.api("PUT", "/domains/slow.example/parent", {"wildcard": True})
    calls = await record_ses_calls(ses_daemon)

    status, sub = await ses_daemon.api("POST", "/domains/", {"name": "a.slow.example"})

    assert status == 201 and sub["parent"] == "slow.example"
    assert sub["ses"]["status"] == "pending" and calls.operations == START_OPS


# --- ses-verify -----------------------------------------------------------------------------

async def test_ses_verify_is_master_only_and_audited(ses_daemon: Daemon) -> None:
    partner = await ses_daemon.partner("acme")
    token = await ses_daemon.key(partner["id"])
    await ses_daemon.domain("own.example", token=token, verified=False)
    calls = await record_ses_calls(ses_daemon)

    status, body = await ses_daemon.api("POST", "/domains/own.example/ses-verify", token=token)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert calls.operations == []
    assert ("master", "domain.ses_verify") not in await audit_actions(ses_daemon, "own.example")

    status, body = await ses_daemon.api("POST", "/domains/own.example/ses-verify")
    assert status == 200, body
    assert calls.operations == START_OPS
    assert body["ses"]["verification_token"] and len(body["ses"]["dkim_tokens"]) == 3
    assert ("master", "domain.ses_verify") in await audit_actions(ses_daemon, "own.example")


async def test_ses_verify_of_a_verified_domain_keeps_it_sending(ses_daemon: Daemon) -> None:
    await ses_daemon.api("POST", "/domains/", {"name": "steady.example"})
    await ses_daemon.api("GET", "/domains/steady.example/ses-status")
    client = await ses_daemon.policy()
    assert await client.ask(**outbound("a@steady.example")) == "DUNNO"

    status, body = await ses_daemon.api("POST", "/domains/steady.example/ses-verify")

    assert (status, body["ses"]["status"]) == (200, "success")
    assert await client.ask(**outbound("a@steady.example")) == "DUNNO"
    await client.close()


async def test_ses_verify_with_ses_down_is_503_and_not_audited(make_config: Any) -> None:
    daemon = await start_daemon(make_config(ses={"endpoint_url": closed_port_url()}))
    try:
        await daemon.domain("down.example", verified=False)
        status, body = await daemon.api("POST", "/domains/down.example/ses-verify")
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert ("master", "domain.ses_verify") not in await audit_actions(daemon, "down.example")
    finally:
        await daemon.stop()


# --- the poller -----------------------------------------------------------------------------

async def test_poller_batches_identities_by_100(make_config: Any, moto_url: str) -> None:
    daemon = await start_daemon(make_config(ses={"endpoint_url": moto_url}))
    try:
        names = [f"d{i:03d}.example" for i in range(230)]
        tier = daemon.rt.config.tiers["standard"]
        await asyncio.gather(*(daemon.rt.store.write(
            domain_store.create_domain, MASTER_SCOPE, n, None, "standard", tier) for n in names))
        await asyncio.gather(*(daemon.verify(n, "pending") for n in names))
        backend = ses_backends[DEFAULT_ACCOUNT_ID][REGION]
        for name in names[:220]:  # SES knows (and has verified) these; the rest it lost
            backend.verify_domain(name)
        calls = await record_ses_calls(daemon)

        result = await jobs.ses_poll(daemon.rt)

        assert result == {"checked": 230, "started": 10, "verified": 220}
        assert {op: calls.identities[op] for op in STATUS_OPS} == {
            op: [100, 100, 30] for op in STATUS_OPS}
        assert calls.starts() == START_OPS * 10
        _, first = await daemon.api("GET", "/domains/d000.example")
        _, last = await daemon.api("GET", "/domains/d229.example")
        assert (first["ses"]["status"], last["ses"]["status"]) == ("success", "pending")
    finally:
        await daemon.stop()


async def test_poller_notifies_once_signed_on_success(
        ses_daemon: Daemon, receiver: HookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    partner = await ses_daemon.partner("acme", notify_url=receiver.url)
    receiver.secret = partner["notify_secret"]
    token = await ses_daemon.key(partner["id"])
    await ses_daemon.domain("fresh.example", token=token, verified=False)
    rt = ses_daemon.rt
    caplog.set_level(logging.INFO, logger="policyd.sesflow")
    async with notifier_running(rt):
        assert await rt.store.read(outbox.entries) == []  # pending is no news

        assert await jobs.ses_poll(rt) == {"checked": 1, "started": 0, "verified": 1}
        delivered = await receiver.wait_for(1)

        assert delivered == [{"event": "ses_verified", "domain": "fresh.example"}]
        attempt = receiver.attempts[0]
        assert attempt.body == b'{"domain":"fresh.example","event":"ses_verified"}'
        expected = hmac.new(partner["notify_secret"].encode(), attempt.body, hashlib.sha256)
        assert attempt.signature == "sha256=" + expected.hexdigest()
        assert "SES verification of fresh.example succeeded" in caplog.text
        assert await jobs.ses_poll(rt) == {"checked": 0, "started": 0, "verified": 0}
        status, _ = await ses_daemon.api("GET", "/domains/fresh.example/ses-status")
        assert status == 200
        assert await rt.notifier.deliver_due() == 0
    entries = await rt.store.read(outbox.entries)
    assert [(e.event, e.attempts, e.delivered_at is not None) for e in entries] == [
        ("ses_verified", 1, True)]
    assert len(receiver.attempts) == 1



@pytest.mark.parametrize(("http_status", "started"), [(400, 1), (503, 0)])
async def test_poller_skips_a_refused_identity_and_stops_when_ses_fails(
        daemon: Daemon, http_status: int, started: int) -> None:
    """A refusal (4xx) concerns one identity; an SES-side failure (5xx) ends the round."""
    for name in ("a.example", "b.example"):
        await daemon.domain(name, verified=False)
    stubber = Stubber(await daemon.rt.ses.boto_client())
    identities = {"Identities": ["a.example", "b.example"]}
    stubber.add_response("get_identity_verification_attributes",
                         {"VerificationAttributes": {}}, identities)
    stubber.add_response("get_identity_dkim_attributes", {"DkimAttributes": {}}, identities)
    code = "InvalidParameterValue" if http_status == 400 else "ServiceUnavailable"
    stubber.add_client_error("verify_domain_identity", service_error_code=code,
                             http_status_code=http_status, expected_params={"Domain": "a.example"})
    if started:
        stubber.add_response("verify_domain_identity", {"VerificationToken": "tok-b"},
                             {"Domain": "b.example"})
        stubber.add_response("verify_domain_dkim", {"DkimTokens": ["x", "y", "z"]},
                             {"Domain": "b.example"})
    with stubber:
        result = await jobs.ses_poll(daemon.rt)
        stubber.assert_no_pending_responses()
    assert result == {"checked": 2, "started": started, "verified": 0}
    _, shown = await daemon.api("GET", "/domains/b.example")
    assert shown["ses"]["status"] == ("pending" if started else "not_started")
