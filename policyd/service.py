"""The policy service: one parsed request in, one reply out, within the time budget.

Every request becomes a PolicyJob that the store runs in a batch with the others of its turn
of the event loop (policyd.batch: facts, decisions and counts in one transaction); the reply is
written when that batch commits, or is the on_error reply when the database fails or is too
slow. Here too: the metrics and the one log line of each decision, and the recipients of
inbound messages remembered per Postfix `instance`.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from policyd import policy
from policyd.batch import NO_SENDERS, JobOptions, PolicyBatch, PolicyJob, login_of
from policyd.config import PolicyConfig, SendersConfig
from policyd.metrics import Metrics
from policyd.policy import Decision
from policyd.protocol import PolicyRequest, format_reply, to_request
from policyd.store import Store
from policyd.timeutil import Periods

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
# One line per decision (SPEC §10), to be matched with Postfix's own line by queue_id and
# client: every value from the request is escaped when it is not plain printable text.
_DECISION = ("policy client=%s queue_id=%s sasl_username=%s sender=%s recipient=%s "
             "recipient_count=%d state=%s action=%r reason=%s latency_us=%d")
MAX_TRACKED_MESSAGES = 10_000
MAX_TRACKED_RECIPIENTS = 1_000


class PolicyService:
    """Turns one parsed request into one reply, within the time budget."""

    def __init__(self, store: Store, config: PolicyConfig, periods: Periods,
                 metrics: Metrics, senders: SendersConfig = NO_SENDERS,
                 on_locked_reply: Callable[[], None] | None = None) -> None:
        self._store = store
        # after a locked sender's reply went out (its lock committed): e.g. wake the notifier
        self._on_locked_reply = on_locked_reply or (lambda: None)
        self._config = config
        self._metrics = metrics
        self._options = JobOptions(config.count_at, config.suspended_inbound, periods,
                                   senders=senders)
        self.batch = PolicyBatch(on_lock=lambda reason: metrics.sender_locks.labels(reason).inc())
        self._recipients: OrderedDict[str, list[str]] = OrderedDict()
        self._error_action = ("DEFER_IF_PERMIT 4.3.0 Policy service temporarily unavailable"
                              if config.on_error == "defer" else "DUNNO")
        self._error_reply = format_reply(self._error_action)
        # prometheus' labels() takes a lock and builds a key on every call: keep the children
        self._counted: dict[tuple[str, str], Any] = {}

    def handle(self, attrs: dict[str, str], peer: str, respond: Respond) -> None:
        """Answer one request by calling respond(reply) once: when its batch has committed,
        or with the on_error reply when the database fails or the time budget runs out."""
        started = time.perf_counter()
        req = to_request(attrs)
        outbound = policy.is_outbound(req, self._config.trusted_networks)
        recipients = () if outbound else self._track(req)

        def done(decision: Decision | None, error: BaseException | None) -> None:
            respond(self._reply(req, peer, outbound, decision, error, started))

        try:
            self._store.submit_batched(self.batch,
                                       PolicyJob(req, outbound, self._options, recipients,
                                                 login_of(req) if outbound else ""),
                                       done, budget=self._config.time_budget)
        except Exception as exc:  # the store is closed
            done(None, exc)

    def _reply(self, req: PolicyRequest, peer: str, outbound: bool, decision: Decision | None,
               error: BaseException | None, started: float) -> bytes:
        if decision is None:  # the database failing or too slow: a temporary answer
            return self._failed(req, peer, error, started)
        try:
            if not outbound and decision.reason != "inbound_suspended":
                self._accepted(req)
            elif decision.reason == "sender_locked":
                self._on_locked_reply()
            self._observe(req, peer, decision.action, decision.reason, started)
            return format_reply(decision.action)
        except Exception as exc:  # a bug must still get Postfix an answer
            log.exception("policy reply to %s failed", peer)
            return self._failed(req, peer, exc, started)

    def _failed(self, req: PolicyRequest, peer: str, exc: BaseException | None,
                started: float) -> bytes:
        where = "timeout" if isinstance(exc, TimeoutError) else "error"
        self._metrics.db_errors.labels(where).inc()
        log.error("policy request from %s failed (%s: %s); answering %s", peer, where,
                  exc or type(exc).__name__, self._config.on_error)
        self._observe(req, peer, self._error_action, f"db_{where}", started)
        return self._error_reply

    def _observe(self, req: PolicyRequest, peer: str, action: str, reason: str,
                 started: float) -> None:
        elapsed = time.perf_counter() - started
        verb = action.partition(" ")[0]
        counter = self._counted.get((verb, reason))
        if counter is None:  # a bounded set: verbs and reasons are fixed strings
            counter = self._counted[verb, reason] = self._metrics.requests.labels(verb, reason)
        counter.inc()
        self._metrics.latency.observe(elapsed)
        if self._config.log_decisions:
            _log_decision(_shown(req.client_address), _shown(req.queue_id),
                          _shown(req.sasl_username), _shown(req.sender) if req.sender else "<>",
                          _shown(req.recipient), req.recipient_count, req.protocol_state,
                          action, reason, elapsed * 1e6)

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


def _shown(value: str) -> str:
    """A request value for the log line: as is when plain printable text, else escaped (a
    control character must never start a forged line), '-' when empty."""
    if value.isprintable():
        return value or "-"
    return value.encode("unicode_escape").decode("ascii")


def _log_decision(*args: Any) -> None:
    """The one INFO line of a decision, as log.info() would write it, minus its search of the
    stack for the caller's file and line (fixed here): the line costs a third less."""
    if log.isEnabledFor(logging.INFO):
        log.handle(logging.LogRecord(log.name, logging.INFO, __file__, _LOG_LINE, _DECISION,
                                     args, None, "_observe"))


_LOG_LINE = _log_decision.__code__.co_firstlineno
