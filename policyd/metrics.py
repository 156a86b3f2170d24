"""Prometheus metrics of one process (own registry, so tests can run several side by side).

Every labelled series whose label values are known in advance exists from the start, at
zero: an alert on `rate(...)` or `increase(...)` then sees the first event, not only the
second (a series born with the value 1 has no rate until it moves again).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (action verb, reason) of every policy reply policyd.policy and policyd.service give
# (tests/test_metrics_ops.py checks the decisions against this list).
POLICY_REPLIES: tuple[tuple[str, str], ...] = (
    *(("DUNNO", r) for r in ("no_rule", "null_sender", "allowed", "inbound", "quota_daily",
                             "quota_monthly", "transfer", "db_timeout", "db_error")),
    *(("REJECT", r) for r in ("not_hosted", "login_mismatch", "ses_unverified", "blocked",
                              "out_suspended")),
    *(("DEFER", r) for r in ("suspended", "quota_daily", "quota_monthly", "transfer",
                             "inbound_suspended")),
    *(("WARN", r) for r in ("quota_daily", "quota_monthly", "transfer")),
    ("HOLD", "inbound_suspended"),
    ("DEFER_IF_PERMIT", "db_timeout"), ("DEFER_IF_PERMIT", "db_error"),
)
DB_ERRORS = ("timeout", "error")
# reason label -> how the policy server's message for it starts (policyd.protocol and
# policyd.policyserver); anything else counts as "malformed".
PROTOCOL_ERRORS: dict[str, tuple[str, ...]] = {
    "too_long": ("line over", "request over"),
    "not_utf8": ("not UTF-8",),
    "no_equals": ("no '='",),
    "empty_name": ("empty attribute name",),
    "too_many_attributes": ("more than",),
    "number_too_big": ("size over", "recipient_count over"),
    "truncated": ("connection closed inside",),
    "max_connections": ("max_connections",),
    "malformed": (),
}
# Outcomes of an SNS message: processed, or the policyd.sns.SnsError reason it was refused for.
WEBHOOK_OUTCOMES = ("counted", "duplicate", "subscribed", "unsubscribe", "bad_envelope",
                    "unsigned", "bad_signature", "signature_version", "bad_cert", "cert_fetch",
                    "cert_host", "cert_scheme", "confirm_failed", "topic_not_allowed",
                    "bad_timestamp")
NOTIFICATION_OUTCOMES = ("delivered", "failed", "gave_up")


def protocol_error_reason(message: str) -> str:
    """The metric label of a malformed-request message (one of PROTOCOL_ERRORS)."""
    for reason, prefixes in PROTOCOL_ERRORS.items():
        if message.startswith(prefixes):
            return reason
    return "malformed"


class Metrics:
    """The counters, gauges and histograms the daemon exposes at /metrics."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("policyd_policy_requests", "Policy requests by action and reason",
                                ["action", "reason"], registry=registry)
        self.latency = Histogram(
            "policyd_policy_decision_seconds", "Time from a complete request to its reply",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
            registry=registry)
        self.connections = Gauge("policyd_policy_connections", "Open policy connections",
                                 registry=registry)
        self.db_errors = Counter("policyd_db_errors", "Database errors and time-budget overruns",
                                 ["where"], registry=registry)
        self.protocol_errors = Counter("policyd_policy_protocol_errors",
                                       "Malformed policy requests (connection closed)",
                                       ["reason"], registry=registry)
        self.webhooks = Counter("policyd_ses_webhook_messages", "SNS messages by outcome",
                                ["outcome"], registry=registry)
        self.notifications = Counter("policyd_notifications", "Partner notifications by outcome",
                                     ["outcome"], registry=registry)
        self.job_last_success = Gauge(
            "policyd_job_last_success_timestamp_seconds",
            "When each scheduled job of this process last succeeded (0: not since start)",
            ["job"], registry=registry)
        self.job_failures = Counter("policyd_job_failures", "Failed runs of each scheduled job",
                                    ["job"], registry=registry)
        self._zero_series()
        ProcessCollector(registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def _zero_series(self) -> None:
        for action, reason in POLICY_REPLIES:
            self.requests.labels(action, reason)
        for counter, values in ((self.db_errors, DB_ERRORS),
                                (self.protocol_errors, tuple(PROTOCOL_ERRORS)),
                                (self.webhooks, WEBHOOK_OUTCOMES),
                                (self.notifications, NOTIFICATION_OUTCOMES)):
            for value in values:
                counter.labels(value)

    def protocol_error(self, message: str) -> None:
        """Count a malformed policy request (message: the server's reason)."""
        self.protocol_errors.labels(protocol_error_reason(message)).inc()

    def jobs_scheduled(self, names: Iterable[str]) -> None:
        """Make the series of jobs this process runs (their last success 0 until it comes)."""
        for name in names:
            self.job_last_success.labels(name)
            self.job_failures.labels(name)

    def job_succeeded(self, name: str) -> None:
        """A run of a scheduled job succeeded now."""
        self.job_last_success.labels(name).set_to_current_time()

    def job_failed(self, name: str) -> None:
        """A run of a scheduled job failed."""
        self.job_failures.labels(name).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class ProcessCollector(Collector):
    """The standard process_* metrics of this process, from /proc/self.

    prometheus_client's ProcessCollector reads the boot time from /proc/stat and exports
    nothing at all without it, which is the case under policyd.service (ProcSubset=pid hides
    /proc/stat); here the boot time comes from CLOCK_BOOTTIME instead. Nothing off Linux.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        boottime = getattr(time, "CLOCK_BOOTTIME", None)
        self._boot = None if boottime is None else time.time() - time.clock_gettime(boottime)
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        """Read /proc/self (at scrape time)."""
        if self._boot is None:
            return []
        try:
            with open("/proc/self/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            open_fds = len(os.listdir("/proc/self/fd"))
            max_fds = _max_open_files()
        except OSError:
            return []
        # fields[0] is the state, field 3 of proc(5): field n is fields[n - 3]
        cpu = (int(fields[11]) + int(fields[12])) / self._ticks
        return [
            CounterMetricFamily("process_cpu_seconds_total",
                                "Total user and system CPU time spent in seconds.", value=cpu),
            GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              value=float(fields[20])),
            GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                              value=float(fields[21]) * self._pagesize),
            GaugeMetricFamily("process_start_time_seconds",
                              "Start time of the process since unix epoch in seconds.",
                              value=self._boot + int(fields[19]) / self._ticks),
            GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                              value=open_fds),
            GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                              value=max_fds),
        ]


def _max_open_files() -> float:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return float(soft) if soft != resource.RLIM_INFINITY else float("inf")
