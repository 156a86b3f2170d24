"""Prometheus metrics of one process (own registry, so tests can run several side by side)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters, gauges and histograms the daemon exposes at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("policyd_policy_requests", "Policy requests by action and reason",
                                ["action", "reason"], registry=self.registry)
        self.latency = Histogram(
            "policyd_policy_decision_seconds", "Time from a complete request to its reply",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
            registry=self.registry)
        self.connections = Gauge("policyd_policy_connections", "Open policy connections",
                                 registry=self.registry)
        self.db_errors = Counter("policyd_db_errors", "Database errors and time-budget overruns",
                                 ["where"], registry=self.registry)
        self.protocol_errors = Counter("policyd_policy_protocol_errors",
                                       "Malformed policy requests (connection closed)",
                                       ["reason"], registry=self.registry)
        self.webhooks = Counter("policyd_ses_webhook_messages", "SNS messages by outcome",
                                ["outcome"], registry=self.registry)
        self.notifications = Counter("policyd_notifications", "Partner notifications by outcome",
                                     ["outcome"], registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
