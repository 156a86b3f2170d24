"""The metrics operators alert on: scheduled jobs, process metrics, series present at zero."""
from __future__ import annotations

import ast
import asyncio
import builtins
import itertools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client import ProcessCollector as LibraryProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import policyd.sns
from api.app import create_app
from policyd.config import Config
from policyd.main import build_runtime, services
from policyd.metrics import (DB_ERRORS, NOTIFICATION_OUTCOMES, POLICY_REPLIES, PROTOCOL_ERRORS,
                             WEBHOOK_OUTCOMES, Metrics, ProcessCollector, protocol_error_reason)
from policyd.policy import DomainFacts, Facts, Usage, decide
from policyd.policyserver import parse_request
from policyd.protocol import MAX_ATTRS, MAX_LINE, ProtocolError, to_request
from tests.conftest import MASTER, Daemon
from tests.daemon_process import closed_port_url

README = Path(__file__).resolve().parent.parent / "README.md"
JOBS = ("ses-poll", "reset-daily", "reset-monthly", "purge-retention", "housekeeping",
        "guillotine-sweep", "notify")
WAIT = 30.0  # bound on waiting for the scheduler (never reached when all is well)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {MASTER}"})
    assert resp.status == 200
    return samples(await resp.text())


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


# --- series at zero from the start ------------------------------------------------------------

async def test_labelled_series_exist_at_zero_before_any_event(daemon: Daemon) -> None:
    found = await scrape(daemon.client)
    for action, reason in POLICY_REPLIES:
        assert value(found, "policyd_policy_requests_total", action=action, reason=reason) == 0
    expected = [("policyd_db_errors_total", "where", DB_ERRORS),
                ("policyd_policy_protocol_errors_total", "reason", tuple(PROTOCOL_ERRORS)),
                ("policyd_ses_webhook_messages_total", "outcome", WEBHOOK_OUTCOMES),
                ("policyd_notifications_total", "outcome", NOTIFICATION_OUTCOMES)]
    for name, label, values in expected:
        for label_value in values:
            assert value(found, name, **{label: label_value}) == 0, (name, label_value)


async def test_a_malformed_request_counts_under_its_reason(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.policy_port)
    writer.write(b"no equals sign\n\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no reply
    writer.close()

    found = await scrape(daemon.client)
    counts = {reason: value(found, "policyd_policy_protocol_errors_total", reason=reason)
              for reason in PROTOCOL_ERRORS}
    assert counts == {reason: float(reason == "no_equals") for reason in PROTOCOL_ERRORS}


def protocol_messages() -> list[str]:
    """The messages the parser really gives for each kind of malformed request."""
    payloads = [b"no equals\n\n", b"\xff=1\n\n", b"=value\n\n",
                b"a=" + b"x" * (MAX_LINE + 1) + b"\n\n",
                b"".join(b"a%d=1\n" % i for i in range(MAX_ATTRS + 1)) + b"\n",
                b"size=1099511627777\n\n", b"recipient_count=1000001\n\n"]
    messages = []
    for payload in payloads:
        with pytest.raises(ProtocolError) as caught:
            parse_request(payload)
        messages.append(str(caught.value))
    return messages + ["request over 262144 bytes", "connection closed inside a request",
                       "max_connections"]


def test_every_protocol_error_has_its_own_reason() -> None:
    reasons = [protocol_error_reason(message) for message in protocol_messages()]
    assert "malformed" not in reasons
    assert sorted(set(reasons)) == sorted(set(PROTOCOL_ERRORS) - {"malformed"})
    assert protocol_error_reason("something new") == "malformed"


def every_decision() -> set[tuple[str, str]]:
    """(verb, reason) of the decisions over a grid of requests and facts."""
    base = DomainFacts(name="example.com", partner_id=1, ses_status="success")
    domains = [None, base, replace(base, status="suspended"), replace(base, ses_status="failed"),
               replace(base, ses_status="inherited", parent_ses_status="success"),
               replace(base, out_status="blocked"), replace(base, out_status="suspended")]
    for enforcement, limit in itertools.product(("hard", "soft", "off"),
                                                ("daily_limit", "monthly_limit",
                                                 "transfer_limit_bytes")):
        domains.append(replace(base, enforcement=enforcement, **{limit: 0}))
    seen = set()
    for state, sender, domain, login, count_at, held, outbound in itertools.product(
            ("MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY"), ("a@example.com", ""), domains,
            (None, 1, 2), ("RCPT", "DATA", "END-OF-MESSAGE"), ("hold", "defer"), (True, False)):
        req = to_request({"request": "smtpd_access_policy", "protocol_state": state,
                          "sender": sender, "recipient": "b@example.com", "size": "10",
                          "recipient_count": "1", "sasl_username": "a@example.com"})
        facts = Facts(sender=domain, recipient=domain, counters=Usage(),
                      login_partner_known=login is not None, login_partner_id=login)
        decision = decide(req, facts, count_at=count_at, suspended_inbound=held,
                          outbound=outbound)
        seen.add((decision.action.partition(" ")[0], decision.reason))
    return seen


def test_every_policy_reply_has_a_series_from_the_start() -> None:
    decided = every_decision()
    assert len(decided) >= 20  # the grid reaches every row of SPEC §6
    errors = {(verb, f"db_{where}") for verb in ("DEFER_IF_PERMIT", "DUNNO")
              for where in DB_ERRORS}
    assert decided | errors <= set(POLICY_REPLIES)


def test_every_sns_refusal_reason_has_a_series_from_the_start() -> None:
    tree = ast.parse(Path(policyd.sns.__file__).read_text(encoding="utf-8"))
    reasons = {node.args[0].value for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SnsError"
               and node.args and isinstance(node.args[0], ast.Constant)}
    assert len(reasons) >= 8
    assert reasons <= set(WEBHOOK_OUTCOMES)


# --- process metrics ------------------------------------------------------------------------

async def test_process_metrics_are_exported(daemon: Daemon) -> None:
    found = await scrape(daemon.client)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_virtual_memory_bytes", "process_open_fds", "process_max_fds"):
        assert (value(found, name) or 0) > 0, name
    start = value(found, "process_start_time_seconds")
    assert start is not None and start <= time.time()
    assert [key for key in found if key[0] == "python_info"]
    assert [key for key in found if key[0] == "python_gc_collections_total"]


def test_process_metrics_without_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """policyd.service's ProcSubset=pid hides /proc/stat: the library's collector then
    exports nothing, ours the same values as it does with /proc/stat."""
    with_stat = samples_of(LibraryProcessCollector)
    real_open = builtins.open

    def no_proc_stat(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == "/proc/stat":
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc_stat)
    assert samples_of(LibraryProcessCollector) == {}
    ours = samples_of(ProcessCollector)
    assert set(ours) == set(with_stat)
    assert abs(ours["process_start_time_seconds"] - with_stat["process_start_time_seconds"]) < 2


def samples_of(collector: Callable[..., Any]) -> dict[str, float]:
    registry = CollectorRegistry()
    collector(registry=registry)
    return {s.name: s.value for family in registry.collect() for s in family.samples}


PROC_SUBSET_PID = """
import json
from prometheus_client import CollectorRegistry, ProcessCollector as Library
from policyd.metrics import ProcessCollector
found = {}
for name, collector in (("library", Library), ("ours", ProcessCollector)):
    registry = CollectorRegistry()
    collector(registry=registry)
    found[name] = sorted(s.name for family in registry.collect() for s in family.samples)
print(json.dumps(found))
"""


def test_process_metrics_under_a_real_proc_subset_pid(tmp_path: Path) -> None:
    """The /proc that policyd.service's ProcSubset=pid gives, in a mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare (util-linux)")
    script = tmp_path / "collect.py"
    script.write_text(PROC_SUBSET_PID, encoding="utf-8")
    mount_and_run = ('mount -t proc -o subset=pid proc /proc 2>&1 || exit 77; '
                     f'test ! -e /proc/stat && exec "{sys.executable}" "{script}"')
    result = subprocess.run([unshare, "--mount", "--pid", "--fork", "sh", "-c", mount_and_run],
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode == 77 or result.stderr.startswith("unshare:"):
        pytest.skip("cannot mount a proc with subset=pid here (needs CAP_SYS_ADMIN, Linux 5.8)")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["library"] == []
    assert found["ours"] == sorted(["process_cpu_seconds_total", "process_max_fds",
                                    "process_open_fds", "process_resident_memory_bytes",
                                    "process_start_time_seconds",
                                    "process_virtual_memory_bytes"])


# --- scheduled jobs -------------------------------------------------------------------------

@pytest.fixture
async def scheduled(make_config: Callable[..., Config]) -> AsyncIterator[TestClient]:
    """A daemon whose scheduler runs every job often, with SES unreachable."""
    often = "0.05"
    config = make_config(
        scheduler={"enabled": "true", "reset_interval": often, "purge_interval": often,
                   "sweep_interval": often, "notify_interval": often},
        ses={"poll_interval": often, "endpoint_url": closed_port_url()})
    rt = build_runtime(config)
    client = TestClient(TestServer(create_app(rt, MASTER, services(rt)), host="127.0.0.1",
                                   port=0))
    await client.start_server()
    yield client
    await client.close()


async def wait_for_metrics(client: TestClient, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until ready(samples) holds (the jobs run on their own clock)."""
    deadline = time.monotonic() + WAIT
    while True:
        found = await scrape(client)
        if ready(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_each_job_exports_its_last_success_and_failures(
        scheduled: TestClient) -> None:
    found = await scrape(scheduled)
    for job in JOBS:  # present from the start, before any run
        assert value(found, "policyd_job_failures_total", job=job) is not None, job
        assert value(found, "policyd_job_last_success_timestamp_seconds", job=job) is not None
    resp = await scheduled.post("/domains/", json={"name": "pending.example"},
                                headers={"Authorization": f"Bearer {MASTER}"})
    assert resp.status == 201  # its SES verification is the poller's work: SES is down

    def ses_failures(found: Samples) -> float:
        return value(found, "policyd_job_failures_total", job="ses-poll") or 0

    def ready(found: Samples) -> bool:
        return ses_failures(found) >= 1 and all(
            (value(found, "policyd_job_last_success_timestamp_seconds", job=job) or 0) > 0
            for job in JOBS if job != "ses-poll")

    found = await wait_for_metrics(scheduled, ready)

    assert ready(found), found
    for job in JOBS:
        if job != "ses-poll":
            last = value(found, "policyd_job_last_success_timestamp_seconds", job=job)
            assert last is not None and 1.6e9 < last <= time.time(), job  # a Unix time
            assert value(found, "policyd_job_failures_total", job=job) == 0, job
    # failing rounds never move the poller's last success (it may have had one before the
    # domain existed, when there was nothing to ask)
    ses_success = value(found, "policyd_job_last_success_timestamp_seconds", job="ses-poll")
    failures = ses_failures(found)
    later = await wait_for_metrics(scheduled, lambda f: ses_failures(f) >= failures + 2)
    assert ses_failures(later) >= failures + 2
    assert value(later, "policyd_job_last_success_timestamp_seconds", job="ses-poll") == \
        ses_success


def test_jobs_are_not_exported_by_a_process_that_does_not_run_them() -> None:
    found = samples(Metrics().render().decode())
    assert not [key for key in found if key[0].startswith("policyd_job_")]


def test_the_readme_names_every_job_operators_alert_on() -> None:
    text = README.read_text(encoding="utf-8")
    assert "policyd_job_last_success_timestamp_seconds" in text
    for job in JOBS:
        assert f"`{job}`" in text, job
