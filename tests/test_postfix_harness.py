"""The private-Postfix harness, driven against a throwaway policy server defined here.

The real policy server is tested through the same harness elsewhere; this file proves the
harness itself: smtpd really asks the policy service at RCPT and END-OF-MESSAGE, the reply
codes of each stage are parsed, HOLD lands in the hold queue, the sqlite: maps answer from a
WAL database, SASL logins reach the policy service, and a dead policy service defers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_harness import (
    CONF_POSTFIX,
    MAP_FILES,
    PostfixError,
    PrivatePostfix,
    parse_swaks_transcript,
    policy_clause,
    postfix_workdir,
    read_main_cf_snippet,
    render_map_file,
    require_postfix,
    write_config_file,
)
from tests.ports import free_port

SCHEMA = CONF_POSTFIX.parent.parent / "schema.sql"
OUTSIDE = "127.0.0.2"  # not in mynetworks: an inbound client
SASL_USER, SASL_PASSWORD = "user@example.com", "s3cret-pass"


class ThrowawayPolicy:
    """A tiny asyncio policy server (in its own thread): the action depends on the sender."""

    ACTIONS = {"good": "DUNNO", "bad": "REJECT 5.7.1 no", "late": "DEFER 4.7.1 later",
               "hold": "HOLD held"}

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def decide(self, attrs: dict[str, str]) -> str:
        local = attrs.get("sender", "").partition("@")[0]
        if local == "eod":  # fine at RCPT, refused once the message is complete
            return "REJECT 5.7.1 eod" if attrs.get("protocol_state") == "END-OF-MESSAGE" else "DUNNO"
        return self.ACTIONS.get(local, "DUNNO")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            attrs: dict[str, str] = {}
            while line := (await reader.readline()).decode().rstrip("\n"):
                name, _, value = line.partition("=")
                attrs[name] = value
            if not attrs:  # EOF: smtpd closed its persistent connection
                break
            self.requests.append(attrs)
            writer.write(f"action={self.decide(attrs)}\n\n".encode())
            await writer.drain()
        writer.close()

    def start(self) -> None:
        self.thread.start()
        make = asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(make, self.loop).result(5)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def seen(self, sender: str) -> list[dict[str, str]]:
        return [r for r in self.requests if r.get("sender") == sender]


def build_db(path: Path) -> sqlite3.Connection:
    """A WAL database like policyd's: example.com with two mailboxes and a catch-all, and
    strict.example without any address.

    The connection stays open (as policyd's does) so the -wal/-shm files exist and the
    postfix user can read the database without write access.
    """
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA.read_text())
    now = "2026-11-24T12:00:00Z"
    for domain_id, name in ((1, "example.com"), (2, "strict.example")):  # 2: no catch-all
        conn.execute("INSERT INTO domains (id, name, out_tier, created_at, updated_at) "
                     "VALUES (?, ?, 'standard', ?, ?)", (domain_id, name, now, now))
    for local in ("user", "other"):
        conn.execute("INSERT INTO mailboxes (domain_id, local_part, email, password_hash, "
                     "created_at, updated_at) VALUES (1, ?, ?, 'x', ?, ?)",
                     (local, f"{local}@example.com", now, now))
    conn.execute("INSERT INTO aliases (id, domain_id, source, created_at, updated_at) "
                 "VALUES (1, 1, '@example.com', ?, ?)", (now, now))
    conn.execute("INSERT INTO alias_destinations VALUES (1, 0, 'user@example.com')")
    conn.commit()
    return conn


@pytest.fixture(scope="module")
def policy() -> Iterator[ThrowawayPolicy]:
    server = ThrowawayPolicy()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postfix(policy: ThrowawayPolicy) -> Iterator[PrivatePostfix]:
    require_postfix()
    with postfix_workdir() as workdir:
        db = build_db(workdir / "policyd.sqlite3")
        instance = PrivatePostfix(workdir, policy_port=policy.port,
                                  db_path=workdir / "policyd.sqlite3",
                                  sasl_users={SASL_USER: SASL_PASSWORD})
        with instance:
            yield instance
        db.close()


# ---------------------------------------------------------------- pure parts (no Postfix)

TRANSCRIPT = """\
=== Trying 127.0.0.1:2525...
=== Connected to 127.0.0.1.
<-  220 mx ESMTP Postfix
 -> EHLO client
<-  250-mx
<-  250 CHUNKING
 -> MAIL FROM:<a@example.com>
<-  250 2.1.0 Ok
 -> RCPT TO:<b@example.net>
<-  250 2.1.5 Ok
 -> RCPT TO:<c@example.net>
<** 554 5.7.1 <c@example.net>: Recipient address rejected: no
 -> DATA
<-  354 End data with <CR><LF>.<CR><LF>
 -> Subject: test
 -> 
 -> body
 -> .
<** 451 4.3.0 Error: queue file write error
 -> QUIT
<-  221 2.0.0 Bye
"""


def test_parse_swaks_transcript_assigns_each_reply_to_its_stage() -> None:
    steps = parse_swaks_transcript(TRANSCRIPT)
    assert [(stage, code) for stage, code, _ in steps] == [
        ("CONNECT", 220), ("EHLO", 250), ("MAIL", 250), ("RCPT", 250), ("RCPT", 554),
        ("DATA", 354), ("DATA_END", 451), ("QUIT", 221)]


def test_policy_clause_wraps_values_with_spaces() -> None:
    clause = policy_clause(10040, {"timeout": "10s", "default_action": "DEFER_IF_PERMIT 4.3.0 x"})
    assert clause == ("check_policy_service { inet:127.0.0.1:10040, timeout=10s, "
                      "{ default_action = DEFER_IF_PERMIT 4.3.0 x } }")


def test_render_map_file_points_dbpath_at_the_test_database(tmp_path: Path) -> None:
    text = render_map_file("virtual_alias_maps.cf", tmp_path / "x.sqlite3")
    assert f"dbpath = {tmp_path / 'x.sqlite3'}\n" in text
    assert "/var/lib/policyd" not in text.split("dbpath", 1)[1]


# ---------------------------------------------------------------- against real Postfix

def test_outbound_dunno_is_queued_and_policy_is_asked_at_rcpt_and_end_of_message(
        postfix: PrivatePostfix, policy: ThrowawayPolicy) -> None:
    result = postfix.swaks(from_="good@example.com", to="someone@example.org")
    assert result.stage_codes["RCPT"] == 250
    assert result.accepted and result.final_code == 250 and result.queue_id
    states = [r["protocol_state"] for r in policy.seen("good@example.com")]
    assert states == ["RCPT", "END-OF-MESSAGE"]
    assert policy.seen("good@example.com")[0]["client_address"] == "127.0.0.1"


def test_reject_at_rcpt_is_a_5xx(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="bad@example.com", to="someone@example.org")
    assert result.final_code is not None and 500 <= result.final_code < 600
    assert "5.7.1" in result.final_reply and "DATA_END" not in result.stage_codes


def test_defer_at_rcpt_is_a_4xx(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="late@example.com", to="someone@example.org")
    assert result.stage_codes["RCPT"] == 450 and "4.7.1" in result.final_reply
    assert not result.accepted


def test_hold_is_accepted_into_the_hold_queue(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="hold@example.com", to="someone@example.org")
    assert result.accepted and result.queue_id
    assert result.queue_id in postfix.held_queue_ids()
    assert "sender: hold@example.com" in postfix.message(result.queue_id)


def test_reject_at_end_of_data_is_reported_for_that_stage(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="eod@example.com", to="someone@example.org")
    assert result.stage_codes["RCPT"] == 250 and result.stage_codes["DATA"] == 354
    assert result.stage_codes["DATA_END"] == 554 and result.final_code == 554


def test_inbound_client_is_outside_mynetworks(postfix: PrivatePostfix,
                                              policy: ThrowawayPolicy) -> None:
    result = postfix.swaks(from_="in@remote.test", to="user@example.com",
                           local_interface=OUTSIDE)
    assert result.accepted
    request = policy.seen("in@remote.test")[0]
    assert request["client_address"] == OUTSIDE and request["sasl_username"] == ""


def test_inbound_to_an_unhosted_domain_is_relay_denied(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="in@remote.test", to="x@unhosted.test", local_interface=OUTSIDE)
    assert result.final_code == 554 and "Relay access denied" in result.final_reply


def test_catch_all_takes_unknown_addresses_but_never_a_mailbox(postfix: PrivatePostfix) -> None:
    to_mailbox = postfix.swaks(from_="in@remote.test", to="other@example.com",
                               local_interface=OUTSIDE)
    to_unknown = postfix.swaks(from_="in@remote.test", to="nobody@example.com",
                               local_interface=OUTSIDE)
    assert to_mailbox.accepted and to_unknown.accepted
    postfix.wait_for_maillog(rf"{to_mailbox.queue_id}: to=<other@example\.com>, relay=none")
    postfix.wait_for_maillog(
        rf"{to_unknown.queue_id}: to=<user@example\.com>, orig_to=<nobody@example\.com>")


def test_sasl_login_reaches_the_policy_service(postfix: PrivatePostfix,
                                               policy: ThrowawayPolicy) -> None:
    result = postfix.swaks(from_="good@example.com", to="sasl@example.org",
                           local_interface=OUTSIDE, auth_user=SASL_USER,
                           auth_password=SASL_PASSWORD)
    assert result.stage_codes["AUTH"] == 235 and result.accepted
    request = [r for r in policy.requests if r.get("recipient") == "sasl@example.org"][0]
    assert request["sasl_username"] == SASL_USER and request["sasl_method"] == "PLAIN"


def test_wrong_sasl_password_is_refused(postfix: PrivatePostfix) -> None:
    result = postfix.swaks(from_="good@example.com", to="x@example.org",
                           local_interface=OUTSIDE, auth_user=SASL_USER,
                           auth_password="wrong-password")
    assert result.stage_codes["AUTH"] == 535 and not result.accepted


async def test_swaks_async_leaves_the_event_loop_free(postfix: PrivatePostfix) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    result = await postfix.swaks_async(from_="good@example.com", to="async@example.org")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert result.accepted and ticks > 1


def test_dead_policy_service_defers_and_never_bounces() -> None:
    require_postfix()
    with postfix_workdir() as workdir, PrivatePostfix(
            workdir, policy_port=free_port(), relay_domains=["example.net"]) as instance:
        result = instance.swaks(from_="in@remote.test", to="x@example.net",
                                local_interface=OUTSIDE)
        assert result.stage_codes["RCPT"] == 450 and "4.3.0" in result.final_reply
        assert "policy service unavailable" in result.final_reply


def test_failed_start_raises_and_leaves_nothing_running() -> None:
    require_postfix()
    with postfix_workdir() as workdir:
        instance = PrivatePostfix(workdir, policy_port=free_port(),
                                  extra_main={"mail_owner": "no-such-user-policyd"})
        with pytest.raises(PostfixError, match="no-such-user-policyd"):
            instance.start()
        assert not instance.running


# ---------------------------------------------------------------- conf/postfix/main.cf.snippet

def test_main_cf_snippet_has_no_unknown_parameters(tmp_path: Path) -> None:
    require_postfix(swaks=False)
    for name in MAP_FILES.values():  # postconf also checks the parameters of sqlite: maps
        write_config_file(tmp_path / name, render_map_file(name, tmp_path / "db.sqlite3"))
    snippet = (CONF_POSTFIX / "main.cf.snippet").read_text()
    write_config_file(tmp_path / "main.cf", snippet.replace("/etc/postfix/sqlite/", f"{tmp_path}/"))
    write_config_file(tmp_path / "master.cf", (CONF_POSTFIX / "master.cf.snippet").read_text())
    done = subprocess.run(["postconf", "-c", str(tmp_path), "-n"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "smtpd_policy_service_max_idle = 300s" in done.stdout


def test_main_cf_snippet_asks_policyd_for_every_known_recipient(
        policy: ThrowawayPolicy, postfix: PrivatePostfix) -> None:
    with postfix_workdir() as workdir:
        config_dir = workdir / "etc"  # where PrivatePostfix writes the map files
        extra = {name: value.replace("inet:127.0.0.1:10040", f"inet:127.0.0.1:{policy.port}")
                 .replace("/etc/postfix/sqlite/", f"{config_dir}/")
                 for name, value in read_main_cf_snippet().items()
                 if name.startswith(("smtpd_", "virtual_"))}
        extra["virtual_transport"] = "discard:"  # the snippet's LMTP to Dovecot: not here
        with PrivatePostfix(workdir, policy_port=policy.port, db_path=postfix.db_path,
                            extra_main=extra) as instance:
            assert instance.config_dir == config_dir
            outbound = instance.swaks(from_="good@example.com", to="snippet-out@example.org")
            unlisted = instance.swaks(from_="unlisted@remote.test", to="nobody@strict.example",
                                      local_interface=OUTSIDE)
            inbound = instance.swaks(from_="snippet-in@remote.test", to="user@example.com",
                                     local_interface=OUTSIDE)
    assert outbound.accepted and inbound.accepted
    # reject_unlisted_recipient comes first: unknown users never reach (or cost) policyd
    assert unlisted.final_code == 550 and "5.1.1" in unlisted.final_reply
    assert policy.seen("unlisted@remote.test") == []
    states = [r["protocol_state"] for r in policy.requests
              if r.get("recipient") == "snippet-out@example.org"]
    assert states == ["RCPT", "END-OF-MESSAGE"]
    assert [r["protocol_state"] for r in policy.seen("snippet-in@remote.test")] == [
        "RCPT", "END-OF-MESSAGE"]


def test_workdir_the_postfix_user_cannot_reach_is_refused_up_front(tmp_path: Path) -> None:
    require_postfix()
    tmp_path.chmod(0o700)  # like pytest's own base directory
    instance = PrivatePostfix(tmp_path / "pf", policy_port=free_port())
    with pytest.raises(PostfixError, match="cannot traverse"):
        instance.start()
    assert not instance.running and not (tmp_path / "pf" / "queue").exists()
