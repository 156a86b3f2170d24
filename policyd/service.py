"""The policy service: gather facts, decide, persist the effect, in one atomic store batch.

Every request becomes a PolicyJob; the store runs the jobs of one turn of the event loop
together inside one `BEGIN IMMEDIATE` transaction (PolicyBatch: the facts of their domains,
decide each in order, one counter upsert), so the facts read and the increments written are one
atomic step, and a reply is only sent after the batch holding its increment has committed (group
commit, see policyd.store).

The facts of a domain (its row, its wildcard parent's, its running counters) are read once and
then kept by the PolicyBatch, which adds its own increments to them, for as long as the store
says that nothing else has written to the database since its last committed run (the
`continued` flag of a batch function: any API write, reset, webhook or other process clears
it). A busy hot path therefore reads nothing and writes one statement per batch.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from policyd import policy
from policyd.config import PolicyConfig
from policyd.metrics import Metrics
from policyd.policy import Decision, Facts
from policyd.protocol import PolicyRequest, format_reply, to_request
from policyd.store import Store, StoreError
from policyd.store import counters
from policyd.timeutil import Periods, utcnow

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
_DECISION = ("policy peer=%s state=%s sender=%s sasl=%s rcpt_count=%d action=%r reason=%s "
             "latency_us=%d")
MAX_TRACKED_MESSAGES = 10_000
MAX_TRACKED_RECIPIENTS = 1_000
MAX_CACHED_DOMAINS = 50_000  # facts kept between batches (hosted or not); past it, start over


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What every policy job of one service shares: config, and the clock its periods use."""

    count_at: str
    suspended_inbound: str
    periods: Periods
    now: Callable[[], datetime] = utcnow


@dataclass(frozen=True, slots=True)
class PolicyJob:
    """One request as the writer needs it."""

    req: PolicyRequest
    outbound: bool
    options: JobOptions
    recipients: tuple[str, ...] = ()  # inbound: recipient domains accepted at RCPT

    def domains(self) -> tuple[str, ...]:
        """Every domain whose facts the decision may need."""
        req = self.req
        if self.outbound:
            return (req.sender_domain, req.sasl_domain) if req.sender else ()
        if self.recipients and not req.recipient_domain:
            return self.recipients
        return (req.recipient_domain,)


class PolicyBatch:
    """The store batch function of one PolicyService (see the module docstring).

    Called with a run of jobs inside the writer's transaction, it decides them in order, as if
    one after the other: each request sees what the ones before it counted, and all the counts
    go to the database in one upsert at the end (the store's batch contract). The whole run
    counts in the day and month of the moment it runs, so a limit holds across midnight too.
    """

    __slots__ = ("_known", "_period", "reads")

    def __init__(self) -> None:
        # domain name -> (id, facts, usage) as committed, or None when not hosted
        self._known: dict[str, counters.Found | None] = {}
        self._period = ("", "")
        self.reads = 0  # fact queries run (for tests and benchmarks)

    def __call__(self, conn: sqlite3.Connection, jobs: list[PolicyJob],
                 continued: bool = False) -> list[Decision | Exception]:
        options = jobs[0].options
        period = options.periods.keys(options.now())
        known = self._known
        if not continued or period != self._period or len(known) > MAX_CACHED_DOMAINS:
            known.clear()  # something else wrote, or a new day: read everything again
            self._period = period
        missing = [name for job in jobs for name in job.domains()
                   if name not in known and name]
        if missing:
            self.reads += 1
            found = counters.domains_facts(conn, set(missing), *period)
            for name in missing:
                known[name] = found.get(name)
        ledger = _Ledger(known, *period)
        results: list[Decision | Exception] = [ledger.decide(i, job)
                                               for i, job in enumerate(jobs)]
        try:
            counters.add_many(conn, ledger.rows())
        except sqlite3.Error as exc:
            if not conn.in_transaction:  # the whole transaction is gone: the store says so
                raise
            # SQLite undid the one statement: write domain by domain, so that one domain's
            # failure fails only the requests that counted to it (SPEC §8)
            log.error("policy counter upsert failed (%s); writing domain by domain", exc)
            for i in ledger.write_each(conn):
                results[i] = StoreError(f"counting failed: {exc}")
        ledger.settle()  # the upsert is in: the kept usage includes it (dropped if no commit)
        return results


class _Ledger:
    """The facts of a batch's domains, plus what the batch has counted to them so far."""

    __slots__ = ("_found", "_added", "_day", "_month", "_counted")

    def __init__(self, found: dict[str, counters.Found | None], day: str, month: str) -> None:
        self._found, self._day, self._month = found, day, month
        self._added: dict[str, list[int]] = {}  # domain name -> [messages, bytes]
        # (job index, domain, messages, bytes) of every count, to undo one job's alone
        self._counted: list[tuple[int, str, int, int]] = []

    def decide(self, index: int, job: PolicyJob) -> Decision | Exception:
        """Decide one job, counting to the ledger; a failure fails this job alone."""
        try:
            return _decide_job(job, index, self)
        except Exception as exc:  # a bug: logged, and the job gets the on_error reply
            log.exception("policy decision failed")
            self._undo(lambda i, name: i == index)
            return exc

    def get(self, name: str) -> counters.Found | None:
        """(id, facts, usage including this batch's counts) of a hosted domain, or None."""
        found = self._found.get(name)
        if found is None:
            return None
        added = self._added.get(name)
        if added is None:
            return found
        return found[0], found[1], found[2].plus(added[0], added[1])

    def add(self, index: int, name: str, sent: int, nbytes: int) -> None:
        """Count job index's message to a hosted domain (written when the batch ends)."""
        added = self._added.setdefault(name, [0, 0])
        added[0] += sent
        added[1] += nbytes
        self._counted.append((index, name, sent, nbytes))

    def rows(self) -> list[tuple[int, str, str, int, int]]:
        """(domain id, day, month, messages, bytes) to add."""
        found = self._found
        return [(found[name][0], self._day, self._month, sent, nbytes)  # type: ignore[index]
                for name, (sent, nbytes) in self._added.items() if sent or nbytes]

    def write_each(self, conn: sqlite3.Connection) -> set[int]:
        """Add each domain's row on its own; return the jobs that counted to a failed one."""
        failed: set[str] = set()
        for row in self.rows():
            try:
                counters.add_many(conn, [row])
            except sqlite3.Error:
                if not conn.in_transaction:
                    raise
                failed.add(self._name_of(row[0]))
        jobs = {i for i, name, _, _ in self._counted if name in failed}
        self._undo(lambda i, name: name in failed)
        return jobs

    def settle(self) -> None:
        """Fold this batch's counts into the facts it was given (once they are written)."""
        found = self._found
        for name in self._added:
            found[name] = self.get(name)
        self._added = {}
        self._counted = []

    def _undo(self, match: Callable[[int, str], bool]) -> None:
        """Take back the counts that match(job index, domain)."""
        kept = []
        for entry in self._counted:
            index, name, sent, nbytes = entry
            if match(index, name):
                added = self._added[name]
                added[0] -= sent
                added[1] -= nbytes
            else:
                kept.append(entry)
        self._counted = kept

    def _name_of(self, domain_id: int) -> str:
        return next(name for name, found in self._found.items()
                    if found is not None and found[0] == domain_id)


def _decide_job(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    if job.outbound:
        return _outbound(job, index, ledger)
    if job.recipients and not job.req.recipient_domain:
        return _inbound_many(job, index, ledger)
    return _inbound(job, index, ledger)


def _decide(req: PolicyRequest, facts: Facts, options: JobOptions, outbound: bool) -> Decision:
    return policy.decide(req, facts, count_at=options.count_at,
                         suspended_inbound=options.suspended_inbound, outbound=outbound)


_NOT_HOSTED = Facts()


def _outbound(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    req = job.req
    found = ledger.get(req.sender_domain) if req.sender else None
    if found is None:
        return _decide(req, _NOT_HOSTED, job.options, True)
    _, sender, usage = found
    known, login_partner = _login_partner(req, sender, ledger)
    facts = Facts(sender=sender, login_partner_known=known, login_partner_id=login_partner,
                  counters=usage)
    decision = _decide(req, facts, job.options, True)
    if decision.count_domain is not None:
        ledger.add(index, req.sender_domain, decision.count, decision.bytes)
    return decision


def _login_partner(req: PolicyRequest, sender: policy.DomainFacts,
                   ledger: _Ledger) -> tuple[bool, int | None]:
    """(the SASL login's domain is hosted, its partner)."""
    if not req.sasl_domain:
        return False, None
    if req.sasl_domain == sender.name:
        return True, sender.partner_id
    login = ledger.get(req.sasl_domain)
    return (False, None) if login is None else (True, login[1].partner_id)


def _inbound(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    name = job.req.recipient_domain
    found = ledger.get(name) if name else None
    decision = _decide(job.req, Facts(recipient=found[1] if found else None), job.options,
                       False)
    if found is not None and decision.count_domain is not None and decision.bytes > 0:
        ledger.add(index, name, 0, decision.bytes)
    return decision


def _inbound_many(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    """DATA/END-OF-MESSAGE with several recipients: Postfix leaves `recipient` empty, so the
    recipients accepted at RCPT for this instance are used, each domain getting size x its
    recipients."""
    req = job.req
    first: Decision | None = None
    per_domain: dict[str, int] = {}
    for domain in job.recipients:
        per_domain[domain] = per_domain.get(domain, 0) + 1
    for domain, n in per_domain.items():
        found = ledger.get(domain)
        decision = _decide(req, Facts(recipient=found[1] if found else None), job.options,
                           False)
        if found is not None and decision.count_domain is not None and req.size:
            ledger.add(index, domain, 0, req.size * n)
        if first is None or decision.reason == "inbound_suspended":
            first = decision
    return first or policy.NO_RULE


class PolicyService:
    """Turns one parsed request into one reply, within the time budget."""

    def __init__(self, store: Store, config: PolicyConfig, periods: Periods,
                 metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._options = JobOptions(config.count_at, config.suspended_inbound, periods)
        self.batch = PolicyBatch()
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
                                       PolicyJob(req, outbound, self._options, recipients),
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
            _log_decision(peer, req.protocol_state, req.sender or "<>", req.sasl_username or "-",
                          req.recipient_count, action, reason, elapsed * 1e6)

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


def _log_decision(*args: Any) -> None:
    """The one INFO line of a decision, as log.info() would write it, minus its search of the
    stack for the caller's file and line (fixed here): the line costs a third less."""
    if log.isEnabledFor(logging.INFO):
        log.handle(logging.LogRecord(log.name, logging.INFO, __file__, _LOG_LINE, _DECISION,
                                     args, None, "_observe"))


_LOG_LINE = _log_decision.__code__.co_firstlineno
