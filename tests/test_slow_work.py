"""Slow work never stalls policy replies (SPEC §8): a DNS server that never answers."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import outbound, start_daemon
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.slow  # a stress test: `pytest -m "not slow"` skips it


async def test_policy_replies_flow_while_dns_checks_wait_on_a_silent_server(
        make_config: Any, dns_server: DnsServer) -> None:
    dns_server.silent = True
    timeout = 1.5
    daemon = await start_daemon(make_config(dns={"nameservers": "127.0.0.1",
                                                 "port": str(dns_server.port),
                                                 "timeout": str(timeout)}))
    try:
        await daemon.domain("example.com")
        checks = [asyncio.create_task(daemon.api("GET", "/domains/example.com/dns-check"))
                  for _ in range(5)]
        client = await daemon.policy()
        worst = 0.0
        replies = 0
        while not all(task.done() for task in checks):
            started = time.perf_counter()
            reply = await client.ask(**outbound("bob@example.com", protocol_state="RCPT"))
            assert reply == "DUNNO"
            worst = max(worst, time.perf_counter() - started)
            replies += 1
        await client.close()
        for task in checks:
            status, body = task.result()
            assert status == 200 and body["ok"] is False
            assert all(check["found"] == "timeout" for check in body["checks"]
                       if check["name"] is not None)
        assert dns_server.queries > 0  # the silent server was really asked
        assert replies > 10
        assert worst < 1.0, f"a policy reply took {worst:.3f} s while DNS waited"
        print(f"worst policy latency while DNS waited: {worst * 1000:.1f} ms "
              f"over {replies} replies")
    finally:
        await daemon.stop()
