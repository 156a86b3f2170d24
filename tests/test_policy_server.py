"""The policy server against the real daemon: raw bytes on an ephemeral port.

Part one drives the wire (keep-alive, '=' in values, garbage, idle and surplus connections,
shutdown, the time budget); part two walks the SPEC §6 decision table through the real server
and checks the counters through the API.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

import pytest

from policyd.config import Config
from tests.conftest import (
    MASTER,
    WriteLock,
    Daemon,
    outbound,
    request_bytes,
    start_daemon,
)

EOF_WAIT = 10.0  # bound on waiting for the server to close a connection (never reached when ok)
TEMPFAIL = "DEFER_IF_PERMIT 4.3.0"


@pytest.fixture
async def make_daemon(make_config: Callable[..., Config]) -> AsyncIterator[Callable[..., Any]]:
    """Start daemons with config overrides ({section: {key: value}}); all stopped at the end."""
    started: list[Daemon] = []

    async def make(**overrides: dict[str, str]) -> Daemon:
        d = await start_daemon(make_config(**overrides))
        started.append(d)
        return d

    yield make
    for d in started:
        await d.stop()


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare connection to the policy port."""
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_without_reply(reader: asyncio.StreamReader) -> bool:
    """True when the server closes the connection without sending a byte."""
    try:
        data = await asyncio.wait_for(reader.read(), EOF_WAIT)
    except ConnectionResetError:
        return True
    return data == b""


async def outbound_stats(d: Daemon, name: str) -> dict[str, Any]:
    """GET /domains/{name}/outbound as the master."""
    status, body = await d.api("GET", f"/domains/{name}/outbound")
    assert status == 200, body
    return body


async def set_outbound(d: Daemon, name: str, **fields: Any) -> None:
    """PUT /domains/{name}/outbound as the master."""
    status, body = await d.api("PUT", f"/domains/{name}/outbound", fields)
    assert status == 200, body


async def metric(d: Daemon, prefix: str) -> float:
    """The sum of every sample of a metric whose line starts with prefix."""
    status, text = await d.api("GET", "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


# --- the wire ---------------------------------------------------------------------------

async def test_many_requests_on_one_connection_which_stays_open(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    actions = [await client.ask(**outbound("a@example.com")) for _ in range(30)]
    # a refusal does not close the connection either
    assert (await client.ask(**outbound("a@nothosted.test"))).startswith("REJECT 5.7.1")
    actions.append(await client.ask(**outbound("a@example.com")))
    assert actions == ["DUNNO"] * 31
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 31
    await client.close()


async def test_crlf_client_gets_replies_on_a_kept_connection(daemon: Daemon) -> None:
    """Postfix sends LF, but a hand-written client or test tool may send CRLF: each request
    ends at its empty line ("\\r\\n") and is answered, the connection stays open."""
    await daemon.domain("example.com")
    reader, writer = await raw(daemon.policy_port)
    crlf = request_bytes(**outbound("a@example.com")).replace(b"\n", b"\r\n")
    writer.write(crlf)
    assert await asyncio.wait_for(reader.readuntil(b"\n\n"), EOF_WAIT) == b"action=DUNNO\n\n"
    writer.write(crlf[:40])  # split across reads, and a second request in one write
    await asyncio.sleep(0.01)
    writer.write(crlf[40:] + crlf)
    for _ in range(2):
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), EOF_WAIT) == \
            b"action=DUNNO\n\n"
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 3
    writer.close()


async def test_value_split_on_the_first_equals_sign(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    action = await client.ask(**outbound("x@a=b.test"))
    assert action == "REJECT 5.7.1 Sender domain a=b.test is not hosted here"
    action = await client.ask(**outbound("tag=1@example.com"),
                              ccert_subject="CN=mx.example.net,O=Example=Org")
    assert action == "DUNNO"
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 1
    await client.close()


async def test_unknown_attributes_are_ignored(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    action = await client.ask(**outbound("a@example.com"), x_future_attribute="1",
                              policy_context="a=b=c", **{"weird-name": ""})
    assert action == "DUNNO"
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 1
    await client.close()


def _never_ending() -> bytes:
    return b"x=y\n" * 20_000  # 80 KB per write, never an empty line


GARBAGE = {
    "no-equals": b"request=smtpd_access_policy\nthis line has no equals sign\n\n",
    "not-utf8": b"request=smtpd_access_policy\nsender=\xff\xfe@example.com\n\n",
    "line-over-64k": b"ccert_subject=" + b"a" * (65536 + 10) + b"\n\n",
    "too-many-attributes": b"".join(b"attr%d=1\n" % i for i in range(300)) + b"\n",
    "empty-name": b"=value\n\n",
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_closes_only_its_own_connection(daemon: Daemon, garbage: bytes,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    await daemon.domain("example.com")
    good = await daemon.policy()
    assert await good.ask(**outbound("a@example.com")) == "DUNNO"
    reader, writer = await raw(daemon.policy_port)
    with caplog.at_level(logging.WARNING, logger="policyd.policyserver"):
        writer.write(garbage)
        assert await closed_without_reply(reader)
    assert "malformed request" in caplog.text
    assert await good.ask(**outbound("a@example.com")) == "DUNNO"
    assert await metric(daemon, "policyd_policy_protocol_errors_total") == 1
    writer.close()
    await good.close()


async def test_never_ending_request_is_cut_at_the_size_cap(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    good = await daemon.policy()
    reader, writer = await raw(daemon.policy_port)

    async def flood() -> None:
        try:
            while True:
                writer.write(_never_ending())
                await writer.drain()
        except ConnectionError:
            return

    flooding = asyncio.create_task(flood())
    assert await closed_without_reply(reader)
    await asyncio.wait_for(flooding, EOF_WAIT)
    assert await good.ask(**outbound("a@example.com")) == "DUNNO"
    writer.close()
    await good.close()


async def test_garbage_mid_conversation_keeps_the_other_connection_served(
        daemon: Daemon) -> None:
    await daemon.domain("example.com")
    good = await daemon.policy()
    bad = await daemon.policy()
    assert await bad.ask(**outbound("a@example.com")) == "DUNNO"
    bad.writer.write(b"sender=a@example.com\nno equals here\n\n")
    ask_good = asyncio.create_task(good.ask(**outbound("a@example.com")))
    assert await closed_without_reply(bad.reader)
    assert await ask_good == "DUNNO"
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 2
    await good.close()


async def test_idle_connection_is_closed_busy_one_is_not(make_daemon: Callable[..., Any],
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    d = await make_daemon(policy={"idle_timeout": "0.3"})
    await d.domain("example.com")
    await set_outbound(d, "example.com", tier="unlimited")
    idle, busy = await d.policy(), await d.policy()
    assert await idle.ask(**outbound("a@example.com")) == "DUNNO"
    idle_closed = asyncio.create_task(closed_without_reply(idle.reader))
    busy_replies = 0
    with caplog.at_level(logging.INFO, logger="policyd.policyserver"):
        while not idle_closed.done():
            assert await busy.ask(**outbound("a@example.com")) == "DUNNO"
            busy_replies += 1
    assert idle_closed.result() is True
    assert "idle" in caplog.text
    assert await busy.ask(**outbound("a@example.com")) == "DUNNO"
    assert (await outbound_stats(d, "example.com"))["sent_today"] == busy_replies + 2
    await busy.close()


async def test_max_connections_refuses_the_surplus_one(make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon(policy={"max_connections": "3"})
    await d.domain("example.com")
    clients = [await d.policy() for _ in range(3)]
    for client in clients:  # a reply proves the server has registered the connection
        assert await client.ask(**outbound("a@example.com")) == "DUNNO"
    reader, writer = await raw(d.policy_port)
    writer.write(request_bytes(**outbound("a@example.com")))
    assert await closed_without_reply(reader)
    for client in clients:
        assert await client.ask(**outbound("a@example.com")) == "DUNNO"
    await clients.pop().close()
    await _wait_connections(d, 2)
    replacement = await d.policy()
    assert await replacement.ask(**outbound("a@example.com")) == "DUNNO"
    assert (await outbound_stats(d, "example.com"))["sent_today"] == 7
    for client in [*clients, replacement]:
        await client.close()


async def _wait_connections(d: Daemon, count: int) -> None:
    """Wait until the daemon's open-connection gauge reads count (bounded)."""
    async def poll() -> None:
        while await metric(d, "policyd_policy_connections ") != count:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), EOF_WAIT)


async def test_shutdown_closes_idle_connections_and_does_not_wait_for_them(
        make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon()  # default idle_timeout: 300 s, far longer than the bound below
    await d.domain("example.com")
    clients = [await d.policy() for _ in range(5)]
    for client in clients:
        assert await client.ask(**outbound("a@example.com")) == "DUNNO"
    await asyncio.wait_for(d.stop(), EOF_WAIT)
    for client in clients:
        assert await closed_without_reply(client.reader)


# --- the time budget --------------------------------------------------------------------

@pytest.mark.parametrize(("on_error", "expected"), [("defer", TEMPFAIL), ("dunno", "DUNNO")])
async def test_time_budget_answers_on_error_and_recovers(
        make_daemon: Callable[..., Any], on_error: str, expected: str,
        caplog: pytest.LogCaptureFixture) -> None:
    d = await make_daemon(policy={"time_budget": "0.2", "on_error": on_error},
                          database={"busy_timeout": "60"})
    await d.domain("example.com")
    client, other = await d.policy(), await d.policy()
    with caplog.at_level(logging.ERROR, logger="policyd.service"):
        with WriteLock(str(d.rt.config.db_path)):
            replies = await asyncio.gather(client.ask(**outbound("a@example.com")),
                                           other.ask(**outbound("a@example.com")))
            assert all(r.startswith(expected) for r in replies), replies
            assert await metric(d, "policyd_db_errors_total") == 2
    assert "time" in caplog.text or "timeout" in caplog.text
    assert await client.ask(**outbound("a@example.com")) == "DUNNO"
    assert await other.ask(**outbound("a@example.com")) == "DUNNO"
    # the requests answered on_error were never counted, the two after the lock were
    assert (await outbound_stats(d, "example.com"))["sent_today"] == 2
    await client.close()
    await other.close()


# --- the decision table through the real server -----------------------------------------

async def test_outbound_allowed_is_counted(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    assert await client.ask(**outbound("a@example.com", recipient_count=3, size=1000)) == "DUNNO"
    stats = await outbound_stats(daemon, "example.com")
    assert (stats["sent_today"], stats["sent_month"], stats["bytes_month"]) == (3, 3, 3000)
    status, transfer = await daemon.api("GET", "/domains/example.com/transfer")
    assert transfer["used_bytes"] == 3000
    await client.close()


async def test_not_hosted_and_unverified_are_rejected(daemon: Daemon) -> None:
    await daemon.domain("pending.com", verified=False)
    client = await daemon.policy()
    assert (await client.ask(**outbound("a@elsewhere.test"))).startswith(
        "REJECT 5.7.1 Sender domain elsewhere.test is not hosted")
    action = await client.ask(**outbound("a@pending.com"))
    assert action.startswith("REJECT 5.7.1") and "not verified" in action
    assert (await outbound_stats(daemon, "pending.com"))["sent_today"] == 0
    await client.close()


async def test_login_of_another_partner_is_rejected(daemon: Daemon) -> None:
    acme, other = await daemon.partner("acme"), await daemon.partner("other")
    await daemon.domain("acme.com", partner_id=acme["id"])
    await daemon.domain("acme.net", partner_id=acme["id"])
    await daemon.domain("other.com", partner_id=other["id"])
    client = await daemon.policy()
    action = await client.ask(**outbound("a@acme.com", sasl_username="b@other.com"))
    assert action.startswith("REJECT 5.7.1") and "does not belong" in action
    # the same partner's other domain may send as acme.com
    assert await client.ask(**outbound("a@acme.com", sasl_username="b@acme.net")) == "DUNNO"
    assert (await outbound_stats(daemon, "acme.com"))["sent_today"] == 1
    await client.close()


async def test_suspended_domain_defers_outbound_and_holds_inbound(
        make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon()
    await d.domain("example.com")
    status, _ = await d.api("PUT", "/domains/example.com/suspend")
    assert status == 200
    client = await d.policy()
    assert (await client.ask(**outbound("a@example.com"))).startswith("DEFER 4.7.1")
    inbound = {"sender": "x@remote.test", "recipient": "a@example.com"}
    assert (await client.ask(**inbound)).startswith("HOLD ")
    assert (await outbound_stats(d, "example.com"))["sent_today"] == 0
    await client.close()


async def test_suspended_inbound_defer(make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon(policy={"suspended_inbound": "defer"})
    await d.domain("example.com")
    await d.api("PUT", "/domains/example.com/suspend")
    client = await d.policy()
    action = await client.ask(sender="x@remote.test", recipient="a@example.com")
    assert action.startswith("DEFER 4.7.1")
    await client.close()


async def test_wildcard_subdomain_inherits_verification(daemon: Daemon) -> None:
    await daemon.domain("parent.com")
    status, body = await daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    assert status == 200 and body["wildcard"] is True, body
    sub = await daemon.domain("sub.parent.com", verified=False)
    assert sub["parent"] == "parent.com" and sub["ses"]["status"] == "inherited", sub
    await daemon.domain("alone.com", verified=False)
    client = await daemon.policy()
    assert await client.ask(**outbound("a@sub.parent.com")) == "DUNNO"
    assert (await client.ask(**outbound("a@alone.com"))).startswith("REJECT 5.7.1")
    assert (await outbound_stats(daemon, "sub.parent.com"))["sent_today"] == 1
    assert (await outbound_stats(daemon, "parent.com"))["sent_today"] == 0
    await client.close()


async def test_blocked_is_rejected(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    await set_outbound(daemon, "example.com", status="blocked")
    client = await daemon.policy()
    action = await client.ask(**outbound("a@example.com"))
    assert action.startswith("REJECT 5.7.1") and "blocked" in action
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 0
    await client.close()


@pytest.mark.parametrize(("enforcement", "third", "counted"), [
    ("hard", "DEFER 4.7.1", 2), ("soft", "WARN ", 3), ("off", "DUNNO", 3)])
async def test_over_daily_quota_by_enforcement(daemon: Daemon, enforcement: str, third: str,
                                               counted: int) -> None:
    await daemon.domain("example.com")
    await set_outbound(daemon, "example.com", daily_limit=2, enforcement=enforcement)
    client = await daemon.policy()
    assert [await client.ask(**outbound("a@example.com")) for _ in range(2)] == ["DUNNO"] * 2
    assert (await client.ask(**outbound("a@example.com"))).startswith(third)
    stats = await outbound_stats(daemon, "example.com")
    assert (stats["sent_today"], stats["sent_month"]) == (counted, counted)
    await client.close()


async def test_null_sender_is_dunno_and_not_counted(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    assert await client.ask(sender="", sasl_username="a@example.com") == "DUNNO"
    assert await client.ask(sender="<>", sasl_username="a@example.com") == "DUNNO"
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 0
    await client.close()


async def test_rcpt_checks_without_counting(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    await set_outbound(daemon, "example.com", daily_limit=1)
    client = await daemon.policy()
    rcpt = outbound("a@example.com", protocol_state="RCPT", recipient_count=0)
    assert [await client.ask(**rcpt) for _ in range(3)] == ["DUNNO"] * 3
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 0
    assert await client.ask(**outbound("a@example.com")) == "DUNNO"  # END-OF-MESSAGE counts
    assert (await client.ask(**rcpt)).startswith("DEFER 4.7.1")  # would not fit any more
    assert (await outbound_stats(daemon, "example.com"))["sent_today"] == 1
    await client.close()


async def test_count_at_rcpt_counts_one_per_rcpt(make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon(policy={"count_at": "RCPT"})
    await d.domain("example.com")
    client = await d.policy()
    for state in ("RCPT", "RCPT", "DATA", "END-OF-MESSAGE"):
        assert await client.ask(**outbound("a@example.com", protocol_state=state,
                                           recipient_count=2, size=500)) == "DUNNO"
    stats = await outbound_stats(d, "example.com")
    assert (stats["sent_today"], stats["bytes_month"]) == (2, 1000)
    await client.close()


async def test_trusted_network_is_outbound_without_sasl(make_daemon: Callable[..., Any]) -> None:
    d = await make_daemon(policy={"trusted_networks": "192.0.2.0/24, 2001:db8::/32"})
    await d.domain("example.com")
    client = await d.policy()
    assert await client.ask(sender="a@example.com", client_address="192.0.2.10") == "DUNNO"
    assert await client.ask(sender="a@example.com", client_address="2001:db8::5") == "DUNNO"
    assert (await client.ask(sender="a@remote.test",
                             client_address="192.0.2.10")).startswith("REJECT 5.7.1")
    # outside the trusted networks, without SASL: inbound, nothing to decide, nothing counted
    assert await client.ask(sender="a@remote.test", client_address="198.51.100.1") == "DUNNO"
    assert (await outbound_stats(d, "example.com"))["sent_today"] == 2
    await client.close()


async def test_inbound_bytes_go_to_each_recipient_domain(daemon: Daemon) -> None:
    await daemon.domain("a.test")
    await daemon.domain("b.test")
    client = await daemon.policy()
    base = {"sender": "x@remote.test", "instance": "7f.1", "size": "1000"}
    for rcpt in ("u1@a.test", "u2@a.test", "u3@b.test"):
        assert await client.ask(**base, protocol_state="RCPT", recipient=rcpt,
                                recipient_count=0) == "DUNNO"
    assert await client.ask(**base, recipient="", recipient_count=3) == "DUNNO"
    used = {}
    for name in ("a.test", "b.test"):
        status, body = await daemon.api("GET", f"/domains/{name}/transfer")
        used[name] = body["used_bytes"]
    assert used == {"a.test": 2000, "b.test": 1000}
    # the instance was forgotten at END-OF-MESSAGE: a repeat counts nothing more
    assert await client.ask(**base, recipient="", recipient_count=3) == "DUNNO"
    status, body = await daemon.api("GET", "/domains/a.test/transfer")
    assert body["used_bytes"] == 2000
    await client.close()


async def test_decision_is_logged_once_per_request(daemon: Daemon,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    with caplog.at_level(logging.INFO, logger="policyd.service"):
        assert await client.ask(**outbound("a@example.com")) == "DUNNO"
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.service"]
    assert len(lines) == 1, lines
    assert "sender=a@example.com" in lines[0] and "action='DUNNO'" in lines[0]
    assert "latency_us=" in lines[0] and "rcpt_count=1" in lines[0]
    await client.close()


async def test_metrics_readable_with_master_token(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    client = await daemon.policy()
    await client.ask(**outbound("a@example.com"))
    status, text = await daemon.api("GET", "/metrics", token=MASTER)
    assert status == 200
    assert 'policyd_policy_requests_total{action="DUNNO",reason="allowed"} 1.0' in text
    await client.close()


async def test_pipelined_requests_get_their_replies_in_order(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    reader, writer = await raw(daemon.policy_port)
    writer.write(request_bytes(**outbound("a@one.test")) + request_bytes(**outbound(
        "a@example.com")) + request_bytes(**outbound("a@two.test")))
    replies = [await asyncio.wait_for(reader.readuntil(b"\n\n"), EOF_WAIT) for _ in range(3)]
    assert replies[0].startswith(b"action=REJECT") and b"one.test" in replies[0]
    assert replies[1] == b"action=DUNNO\n\n"
    assert replies[2].startswith(b"action=REJECT") and b"two.test" in replies[2]
    writer.close()
