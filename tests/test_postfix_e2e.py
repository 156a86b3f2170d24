"""policyd behind a real Postfix: smtpd asks our policy server, swaks sends the mail.

A private Postfix instance (own config and queue, loopback port, every transport discard:)
uses policyd's check_policy_service at RCPT and END-OF-MESSAGE, as conf/postfix/ configures
it. Outbound mail logs in with SASL (a small stand-in for Dovecot's auth server), inbound mail
comes from 127.0.0.2, outside mynetworks.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import pytest

from tests.conftest import Daemon, start_daemon
from tests.postfix_harness import PrivatePostfix, postfix_workdir, require_postfix

pytestmark = pytest.mark.postfix
PASSWORD = "s3cret-pass"
USERS = {"bob@verified.test": PASSWORD, "eve@unverified.test": PASSWORD,
         "ann@capped.test": PASSWORD}


@pytest.fixture
async def policyd(make_config: Any) -> AsyncIterator[Daemon]:
    require_postfix()
    daemon = await start_daemon(make_config())
    yield daemon
    await daemon.stop()


@pytest.fixture
def postfix(policyd: Daemon) -> Iterator[PrivatePostfix]:
    with postfix_workdir() as workdir:
        with PrivatePostfix(workdir, policy_port=policyd.policy_port, sasl_users=USERS,
                            relay_domains=("verified.test", "frozen.test")) as instance:
            yield instance


async def _send(postfix: PrivatePostfix, sender: str, rcpt: str, **kw: Any) -> Any:
    if sender in USERS:
        kw.update(auth_user=sender, auth_password=USERS[sender])
    return await postfix.swaks_async(from_=sender, to=rcpt, **kw)


async def test_verified_domain_is_accepted_and_counted(policyd: Daemon,
                                                       postfix: PrivatePostfix) -> None:
    await policyd.domain("verified.test")
    result = await _send(postfix, "bob@verified.test", "someone@example.org")
    assert result.final_code == 250, result.transcript
    _, out = await policyd.api("GET", "/domains/verified.test/outbound")
    assert out["sent_today"] == 1 and out["sent_month"] == 1


async def test_unverified_sender_domain_is_rejected(policyd: Daemon,
                                                    postfix: PrivatePostfix) -> None:
    await policyd.domain("unverified.test", verified=False)
    result = await _send(postfix, "eve@unverified.test", "someone@example.org")
    assert 500 <= result.rcpt_codes[0] < 600, result.transcript
    assert "not verified" in result.transcript
    _, out = await policyd.api("GET", "/domains/unverified.test/outbound")
    assert out["sent_today"] == 0


async def test_over_quota_is_deferred_and_not_counted(policyd: Daemon,
                                                      postfix: PrivatePostfix) -> None:
    await policyd.domain("capped.test")
    status, _ = await policyd.api("PUT", "/domains/capped.test/outbound", {"daily_limit": 1})
    assert status == 200
    first = await _send(postfix, "ann@capped.test", "someone@example.org")
    assert first.final_code == 250, first.transcript
    second = await _send(postfix, "ann@capped.test", "someone@example.org")
    assert 400 <= second.rcpt_codes[0] < 500, second.transcript
    _, out = await policyd.api("GET", "/domains/capped.test/outbound")
    assert out["sent_today"] == 1


async def test_suspended_domain_inbound_mail_is_held(policyd: Daemon,
                                                     postfix: PrivatePostfix) -> None:
    await policyd.domain("frozen.test")
    status, _ = await policyd.api("PUT", "/domains/frozen.test/suspend")
    assert status == 200
    result = await _send(postfix, "sender@example.org", "user@frozen.test",
                         local_interface="127.0.0.2")
    assert result.final_code == 250, result.transcript  # accepted, never bounced
    assert result.queue_id in postfix.held_queue_ids()
