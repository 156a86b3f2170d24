"""The policy service: gather facts, decide, persist the effect, in one atomic writer job.

The job runs in the store's writer thread inside its `BEGIN IMMEDIATE` transaction, so the
facts read and the increment written are one atomic step and the reply is only sent after the
batch holding the increment has committed (group commit, see policyd.store).
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from policyd import policy
from policyd.config import PolicyConfig
from policyd.metrics import Metrics
from policyd.policy import Decision, Facts
from policyd.protocol import PolicyRequest, format_reply, to_request
from policyd.store import Store
from policyd.store import counters
from policyd.timeutil import Periods, utcnow

log = logging.getLogger(__name__)
MAX_TRACKED_MESSAGES = 10_000
MAX_TRACKED_RECIPIENTS = 1_000


@dataclass(frozen=True, slots=True)
class JobOptions:
    count_at: str
    suspended_inbound: str


def policy_job(conn: sqlite3.Connection, req: PolicyRequest, outbound: bool, day: str,
               month: str, options: JobOptions, recipients: tuple[str, ...]) -> Decision:
    """Read the facts, decide, and count, all inside the caller's write transaction."""
    if outbound:
        return _outbound_job(conn, req, day, month, options)
    if recipients and not req.recipient_domain:
        return _inbound_many(conn, req, day, month, options, recipients)
    return _inbound_job(conn, req, day, month, options)


def _outbound_job(conn: sqlite3.Connection, req: PolicyRequest, day: str, month: str,
                  options: JobOptions) -> Decision:
    found = counters.domain_facts(conn, req.sender_domain, day, month) if req.sender else None
    if found is None:
        facts = Facts()
    else:
        domain_id, sender, usage = found
        known, login_partner = _login_partner(conn, req, sender)
        facts = Facts(sender=sender, login_partner_known=known, login_partner_id=login_partner,
                      counters=usage)
    decision = policy.decide(req, facts, count_at=options.count_at,
                             suspended_inbound=options.suspended_inbound, outbound=True)
    if found is not None and decision.count_domain is not None:
        counters.add(conn, found[0], day, month, decision.count, decision.bytes)
    return decision


def _login_partner(conn: sqlite3.Connection, req: PolicyRequest,
                   sender: policy.DomainFacts) -> tuple[bool, int | None]:
    if not req.sasl_domain:
        return False, None
    if req.sasl_domain == sender.name:
        return True, sender.partner_id
    return counters.domain_partner(conn, req.sasl_domain)


def _recipient_facts(conn: sqlite3.Connection, domain: str, day: str,
                     month: str) -> policy.DomainFacts | None:
    found = counters.domain_facts(conn, domain, day, month) if domain else None
    return found[1] if found else None


def _inbound_job(conn: sqlite3.Connection, req: PolicyRequest, day: str, month: str,
                 options: JobOptions) -> Decision:
    facts = Facts(recipient=_recipient_facts(conn, req.recipient_domain, day, month))
    decision = policy.decide(req, facts, count_at=options.count_at,
                             suspended_inbound=options.suspended_inbound, outbound=False)
    if decision.count_domain is not None and decision.bytes:
        counters.add_bytes(conn, decision.count_domain, day, month, decision.bytes)
    return decision


def _inbound_many(conn: sqlite3.Connection, req: PolicyRequest, day: str, month: str,
                  options: JobOptions, recipients: tuple[str, ...]) -> Decision:
    """DATA/END-OF-MESSAGE with several recipients: Postfix leaves `recipient` empty, so the
    recipients accepted at RCPT for this instance are used, each domain getting size x its
    recipients."""
    first: Decision | None = None
    per_domain: dict[str, int] = {}
    for domain in recipients:
        per_domain[domain] = per_domain.get(domain, 0) + 1
    for domain, n in per_domain.items():
        facts = Facts(recipient=_recipient_facts(conn, domain, day, month))
        decision = policy.decide(req, facts, count_at=options.count_at,
                                 suspended_inbound=options.suspended_inbound, outbound=False)
        if decision.count_domain is not None and req.size:
            counters.add_bytes(conn, domain, day, month, req.size * n)
        if first is None or decision.reason == "inbound_suspended":
            first = decision
    return first or policy.NO_RULE


class PolicyService:
    """Turns one parsed request into one reply, within the time budget."""

    def __init__(self, store: Store, config: PolicyConfig, periods: Periods,
                 metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._periods = periods
        self._metrics = metrics
        self._options = JobOptions(config.count_at, config.suspended_inbound)
        self._recipients: OrderedDict[str, list[str]] = OrderedDict()
        self._period_cache: tuple[int, str, str] = (-1, "", "")
        self._error_reply = format_reply("DEFER_IF_PERMIT 4.3.0 Policy service temporarily "
                                         "unavailable" if config.on_error == "defer" else
                                         "DUNNO")

    def _period_keys(self) -> tuple[str, str]:
        second = int(time.time())
        if second != self._period_cache[0]:
            day, month = self._periods.keys(utcnow())
            self._period_cache = (second, day, month)
        return self._period_cache[1], self._period_cache[2]

    async def handle(self, attrs: dict[str, str], peer: str) -> bytes:
        """Answer one request (never raises: errors become the on_error reply)."""
        started = time.perf_counter()
        req = to_request(attrs)
        outbound = policy.is_outbound(req, self._config.trusted_networks)
        recipients = () if outbound else self._track(req)
        day, month = self._period_keys()
        try:
            future = self._store.submit(policy_job, req, outbound, day, month, self._options,
                                        recipients)
            decision = await _within(future, self._config.time_budget)
        except Exception as exc:  # the database failing or too slow: a temporary answer
            return self._failed(req, peer, exc, started)
        if not outbound and decision.reason != "inbound_suspended":
            self._accepted(req)
        reply = format_reply(decision.action)
        self._observe(req, peer, decision.action, decision.reason, started)
        return reply

    def _failed(self, req: PolicyRequest, peer: str, exc: Exception, started: float) -> bytes:
        where = "timeout" if isinstance(exc, TimeoutError) else "error"
        self._metrics.db_errors.labels(where).inc()
        log.error("policy request from %s failed (%s: %s); answering %s", peer, where,
                  exc or type(exc).__name__, self._config.on_error)
        action = self._error_reply[7:-2].decode()
        self._observe(req, peer, action, f"db_{where}", started)
        return self._error_reply

    def _observe(self, req: PolicyRequest, peer: str, action: str, reason: str,
                 started: float) -> None:
        elapsed = time.perf_counter() - started
        self._metrics.requests.labels(action.split(" ", 1)[0], reason).inc()
        self._metrics.latency.observe(elapsed)
        if self._config.log_decisions:
            log.info("policy peer=%s state=%s sender=%s sasl=%s rcpt_count=%d action=%r "
                     "reason=%s latency_us=%d", peer, req.protocol_state, req.sender or "<>",
                     req.sasl_username or "-", req.recipient_count, action, reason,
                     elapsed * 1e6)

    # --- recipients of inbound messages, per Postfix `instance` -----------------------
    def _track(self, req: PolicyRequest) -> tuple[str, ...]:
        if req.protocol_state in ("DATA", "END-OF-MESSAGE") and not req.recipient_domain:
            tracked = self._recipients.get(req.instance, ())
            if req.protocol_state == "END-OF-MESSAGE" or self._options.count_at == "DATA":
                self._recipients.pop(req.instance, None)
            return tuple(tracked)
        if req.protocol_state == "END-OF-MESSAGE":
            self._recipients.pop(req.instance, None)
        return ()

    def _accepted(self, req: PolicyRequest) -> None:
        if req.protocol_state != "RCPT" or not req.instance or not req.recipient_domain:
            return
        tracked = self._recipients.get(req.instance)
        if tracked is None:
            tracked = self._recipients[req.instance] = []
            while len(self._recipients) > MAX_TRACKED_MESSAGES:
                self._recipients.popitem(last=False)
        if len(tracked) < MAX_TRACKED_RECIPIENTS:
            tracked.append(req.recipient_domain)


T = TypeVar("T")


async def _within(future: asyncio.Future[T], budget: float) -> T:
    """Await a store future for at most budget seconds (one timer, no extra task)."""
    loop = asyncio.get_running_loop()
    handle = loop.call_later(budget, _expire, future)
    try:
        return await future
    finally:
        handle.cancel()


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("over the policy time budget"))
