"""The policy batch: the store batch function that decides a run of policy requests in one
write transaction (see policyd.store: group commit).

For a run of requests it reads the facts it lacks (domains, their wildcard parents and
counters; the hosted logins and their counters), decides each request in order as if one after
the other (each sees what the ones before it counted), and writes every count at the end: the
domains' in one upsert, the logins' in another, both inside one savepoint, so a domain and its
sender move together or not at all (SPEC §9). A reply is only sent once the transaction holding
its count has committed.

Facts are kept between runs for as long as the store says nothing else has written since this
function's last committed run (`continued`: any API write, reset, webhook or other process
clears it), and counts are added to what is kept: a busy hot path reads nothing and writes one
or two statements per batch.

Logins also feed the stolen-password lock: the client addresses each login is seen from are
tracked in memory (policyd.senders.AddressTracker), and a login seen from too many is locked in
the same transaction (audited, the partner notified through the outbox).
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Callable, Iterable, Sequence

from policyd import policy
from policyd.config import SendersConfig
from policyd.policy import Decision, Facts, SenderFacts, sender_limit
from policyd.protocol import PolicyRequest
from policyd.senders import AddressTracker, address_group
from policyd.store import StoreError, counters
from policyd.store import senders as sender_store
from policyd.store.senders import LoginFound
from policyd.timeutil import Periods, iso, utcnow

log = logging.getLogger(__name__)
# Facts kept between batches (hosted or not); past either bound, that cache starts over.
MAX_CACHED_DOMAINS = 50_000
MAX_CACHED_LOGINS = 250_000  # a small entry each; a platform's logins outnumber its domains
NO_SENDERS = SendersConfig(None, None, 0, 3600.0, "reject")


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What every policy job of one service shares: config, and the clock its periods use."""

    count_at: str
    suspended_inbound: str
    periods: Periods
    now: Callable[[], datetime] = utcnow
    senders: SendersConfig = NO_SENDERS


@dataclass(frozen=True, slots=True)
class PolicyJob:
    """One request as the writer needs it."""

    req: PolicyRequest
    outbound: bool
    options: JobOptions
    recipients: tuple[str, ...] = ()  # inbound: recipient domains accepted at RCPT
    login: str = ""  # the SASL login as a mailbox address is stored (login_of), or ''

    def domains(self) -> tuple[str, ...]:
        """Every domain whose facts the decision may need."""
        req = self.req
        if self.outbound:
            return (req.sender_domain, req.sasl_domain) if req.sender else ()
        if self.recipients and not req.recipient_domain:
            return self.recipients
        return (req.recipient_domain,)



def login_of(req: PolicyRequest) -> str:
    """The SASL login as a mailbox address is stored (matched as addresses are), or ''."""
    login = req.sasl_username  # lowercased: a plain ASCII address is already in stored form
    if not req.sasl_domain or (login.isascii() and not login.endswith(".")):
        return login if req.sasl_domain else ""
    local, _, _ = login.rpartition("@")
    return f"{local}@{req.sasl_domain}" if local else ""


class PolicyBatch:
    """The store batch function of one PolicyService (see the module docstring)."""

    __slots__ = ("_domains", "_logins", "_period", "_tracker", "_on_lock", "reads")

    def __init__(self, on_lock: Callable[[str], None] | None = None) -> None:
        # domain name -> (id, facts, usage) as committed, or None when not hosted
        self._domains: dict[str, counters.Found | None] = {}
        # login -> the hosted mailbox it names as committed, or None when it names none
        self._logins: dict[str, LoginFound | None] = {}
        self._period = ("", "", "")
        self._tracker: AddressTracker | None = None
        self._on_lock = on_lock or (lambda reason: None)
        self.reads = 0  # batches that had to read facts (for tests and benchmarks)

    def __call__(self, conn: sqlite3.Connection, jobs: list[PolicyJob],
                 continued: bool = False) -> list[Decision | Exception]:
        options = jobs[0].options
        now = options.now()
        (day, month), hour = options.periods.keys(now), options.periods.hour(now)
        if not continued or (day, month, hour) != self._period:
            self._domains.clear()  # something else wrote, or a new hour: read all again
            self._logins.clear()
            self._period = (day, month, hour)
        if len(self._domains) > MAX_CACHED_DOMAINS:
            self._domains.clear()
        if len(self._logins) > MAX_CACHED_LOGINS:
            self._logins.clear()
        self._read_missing(conn, jobs, day, month, hour)
        ledger = _Ledger(self._domains, self._logins, day, month, hour,
                         self._lock_watch(options.senders), now)
        results = ledger.decide_all(jobs)
        for reason in ledger.write(conn, results):
            self._on_lock(reason)
        ledger.settle()  # the counts are in: what is kept includes them (dropped if no commit)
        return results

    def _read_missing(self, conn: sqlite3.Connection, jobs: list[PolicyJob], day: str,
                      month: str, hour: str) -> None:
        domains, logins = self._domains, self._logins
        missing = [name for job in jobs for name in job.domains() if name and name not in domains]
        names = [job.login for job in jobs if job.login and job.login not in logins]
        if missing or names:
            self.reads += 1
        if missing:
            found = counters.domains_facts(conn, set(missing), day, month)
            for name in missing:
                domains[name] = found.get(name)
        if names:
            hosted = sender_store.logins(conn, set(names), hour, day)
            for name in names:
                logins[name] = hosted.get(name)

    def _lock_watch(self, config: SendersConfig) -> _LockWatch | None:
        if not config.lock_distinct_ips:
            return None
        tracker = self._tracker
        if tracker is None:
            tracker = self._tracker = AddressTracker(config.lock_distinct_ips, config.lock_window)
        return _LockWatch(tracker, config)


@dataclass(slots=True)
class _LockWatch:
    tracker: AddressTracker
    config: SendersConfig


_Count = tuple[int, str, int, int, str, int]  # job, domain, messages, bytes, login, login msgs


class _Ledger:
    """The facts of one batch's domains and logins, plus what it counted to them so far."""

    __slots__ = ("_domains", "_logins", "_day", "_month", "_hour", "_watch", "_now",
                 "_added", "_login_added", "_counted", "_locks")

    def __init__(self, domains: dict[str, counters.Found | None],
                 logins: dict[str, LoginFound | None], day: str, month: str, hour: str,
                 watch: _LockWatch | None, now: datetime) -> None:
        self._domains, self._logins = domains, logins
        self._day, self._month, self._hour = day, month, hour
        self._watch, self._now = watch, now
        self._added: dict[str, list[int]] = {}  # domain name -> [messages, bytes]
        self._login_added: dict[str, int] = {}  # login -> messages
        self._counted: list[_Count] = []  # every count, to undo one job's alone
        self._locks: dict[str, int] = {}  # login -> distinct addresses, locked in this batch

    def decide_all(self, jobs: list[PolicyJob]) -> list[Decision | Exception]:
        """Decide the jobs in order, counting to the ledger; a failure fails its job alone."""
        try:  # one try for the run: the hot path pays nothing per job for it
            return [_decide_job(job, i, self) for i, job in enumerate(jobs)]
        except Exception:  # a bug: start over job by job, so that only its job fails
            self._undo(lambda count: True)
            return [self._decide_one(i, job) for i, job in enumerate(jobs)]

    def _decide_one(self, index: int, job: PolicyJob) -> Decision | Exception:
        try:
            return _decide_job(job, index, self)
        except Exception as exc:  # logged, and the job gets the on_error reply
            log.exception("policy decision failed")
            self._undo(lambda count: count[0] == index)
            return exc

    # --- facts, with this batch's counts ---------------------------------------------------
    def domain(self, name: str) -> counters.Found | None:
        """(id, facts, usage including this batch's counts) of a hosted domain, or None."""
        found = self._domains.get(name)
        if found is None:
            return None
        added = self._added.get(name)
        if added is None:
            return found
        return found[0], found[1], found[2].plus(added[0], added[1])

    def login(self, job: PolicyJob) -> SenderFacts | None:
        """The job's login as the decision sees it (None: no hosted mailbox), after noting
        the address it came from (which may lock it)."""
        name = job.login
        found = self._logins.get(name) if name else None
        if found is None:
            return None
        config = job.options.senders
        locked = found.locked or name in self._locks or self._seen_from(found, job)
        added = self._login_added.get(name, 0)
        return SenderFacts(name, sender_limit(found.hourly_limit, config.hourly_limit),
                           sender_limit(found.daily_limit, config.daily_limit),
                           found.sent_hour, found.sent_today, locked).plus(added)

    def _seen_from(self, found: LoginFound, job: PolicyJob) -> bool:
        """Note the client address; True when that makes the login one to lock."""
        watch = self._watch
        if watch is None:
            return False
        group = address_group(job.req.client_address)
        if group is None:
            return False
        seen = watch.tracker.observe(found.mailbox_id, found.epoch, group,
                                     self._now.timestamp())
        if seen is None:
            return False
        self._locks[found.email] = seen
        return True

    # --- counting ------------------------------------------------------------------------
    def add(self, index: int, name: str, sent: int, nbytes: int, login: str = "") -> None:
        """Count job index's message to a hosted domain and, with the same n, to its hosted
        login (written when the batch ends)."""
        added = self._added.setdefault(name, [0, 0])
        added[0] += sent
        added[1] += nbytes
        login_sent = sent if login and sent else 0
        if login_sent:
            self._login_added[login] = self._login_added.get(login, 0) + login_sent
        self._counted.append((index, name, sent, nbytes, login, login_sent))

    def write(self, conn: sqlite3.Connection, results: list[Decision | Exception]) -> list[str]:
        """Write the locks and the counts of this batch; a request whose count cannot be
        written gets an error (SPEC §8: it fails alone). The reasons of the locks made."""
        locked = [reason for reason in map(lambda name: self._lock(conn, name), self._locks)
                  if reason]
        domain_rows = self._rows(self._added.items())
        login_rows = self._login_rows(self._login_added.items())
        try:
            if login_rows:
                _in_savepoint(conn, lambda: _add(conn, domain_rows, login_rows))
            else:  # one statement: SQLite undoes it alone if it fails
                counters.add_many(conn, domain_rows)
        except sqlite3.Error as exc:
            if not conn.in_transaction:  # the whole transaction is gone: the store says so
                raise
            log.error("policy counter upsert failed (%s); writing request by request", exc)
            for i in self._write_each(conn):
                results[i] = StoreError(f"counting failed: {exc}")
        return locked

    def _lock(self, conn: sqlite3.Connection, name: str) -> str | None:
        found = self._logins.get(name)
        assert found is not None and self._watch is not None
        try:
            made = _in_savepoint(conn, lambda: sender_store.lock(
                conn, sender_store.SYSTEM, found.mailbox_id, "distinct_ips", iso(self._now)))
        except sqlite3.Error as exc:
            if not conn.in_transaction:
                raise
            log.error("lock of sender %s failed: %s", name, exc)  # its next request tries again
            return None
        log.warning("sender %s locked: seen from %d client addresses within %.0f s",
                    name, self._locks[name], self._watch.config.lock_window)
        return "distinct_ips" if made else None

    def _rows(self, added: Iterable[tuple[str, Sequence[int]]]
              ) -> list[tuple[int, str, str, int, int]]:
        """Counter rows of (domain, [messages, bytes]) pairs."""
        domains = self._domains
        return [(domains[name][0], self._day, self._month, sent, nbytes)  # type: ignore[index]
                for name, (sent, nbytes) in added if sent or nbytes]

    def _login_rows(self, added: Iterable[tuple[str, int]]) -> list[tuple[int, str, str, int]]:
        """Counter rows of (login, messages) pairs."""
        logins = self._logins
        return [(logins[name].mailbox_id, self._hour, self._day, n)  # type: ignore[union-attr]
                for name, n in added if n]

    def _write_each(self, conn: sqlite3.Connection) -> set[int]:
        """Write each request's counts on its own; the requests whose write failed (their
        counts are taken back)."""
        failed: set[int] = set()
        for index in sorted({count[0] for count in self._counted}):
            mine = [c for c in self._counted if c[0] == index]
            domain_rows = self._rows((name, (sent, nbytes)) for _, name, sent, nbytes, _, _
                                     in mine)
            login_rows = self._login_rows((login, n) for _, _, _, _, login, n in mine)
            try:
                _in_savepoint(conn, lambda: _add(conn, domain_rows, login_rows))
            except sqlite3.Error:
                if not conn.in_transaction:
                    raise
                failed.add(index)
        self._undo(lambda count: count[0] in failed)
        return failed

    def settle(self) -> None:
        """Fold this batch's counts and locks into the facts it was given."""
        for name in self._added:
            self._domains[name] = self.domain(name)
        logins = self._logins
        for name, n in self._login_added.items():
            f = logins[name]
            assert f is not None
            logins[name] = f.counted(n)
        for name in self._locks:
            f = logins[name]
            assert f is not None
            logins[name] = replace(f, locked=True)  # (rare)
        self._added, self._login_added, self._counted, self._locks = {}, {}, [], {}

    def _undo(self, match: Callable[[_Count], bool]) -> None:
        """Take back the counts that match."""
        kept = []
        for count in self._counted:
            if not match(count):
                kept.append(count)
                continue
            _, name, sent, nbytes, login, login_sent = count
            added = self._added[name]
            added[0] -= sent
            added[1] -= nbytes
            if login_sent:
                self._login_added[login] -= login_sent
        self._counted = kept


def _add(conn: sqlite3.Connection, domain_rows: list[tuple[int, str, str, int, int]],
         login_rows: list[tuple[int, str, str, int]]) -> None:
    counters.add_many(conn, domain_rows)
    sender_store.add_counts(conn, login_rows)


def _in_savepoint(conn: sqlite3.Connection, write: Callable[[], object]) -> object:
    """Run write() so that it takes effect whole or not at all."""
    conn.execute("SAVEPOINT counts")
    try:
        result = write()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK TO counts")
            conn.execute("RELEASE counts")
        raise
    conn.execute("RELEASE counts")
    return result


# --- deciding one job ----------------------------------------------------------------------

def _decide_job(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    if job.outbound:
        return _outbound(job, index, ledger)
    if job.recipients and not job.req.recipient_domain:
        return _inbound_many(job, index, ledger)
    return _inbound(job, index, ledger)


def _decide(req: PolicyRequest, facts: Facts, options: JobOptions, outbound: bool) -> Decision:
    return policy.decide(req, facts, count_at=options.count_at,
                         suspended_inbound=options.suspended_inbound,
                         locked_reply=options.senders.locked_reply, outbound=outbound)


_NOT_HOSTED = Facts()


def _outbound(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    req = job.req
    login = ledger.login(job) if job.login else None  # first: every login seen may lock it
    found = ledger.domain(req.sender_domain) if req.sender else None
    if found is None:
        return _decide(req, _NOT_HOSTED, job.options, True)
    _, sender, usage = found
    known, login_partner = _login_partner(req, sender, ledger)
    facts = Facts(sender=sender, login_partner_known=known, login_partner_id=login_partner,
                  counters=usage, login=login)
    decision = _decide(req, facts, job.options, True)
    if decision.count_domain is not None:
        ledger.add(index, req.sender_domain, decision.count, decision.bytes,
                   login.email if login is not None else "")
    return decision


def _login_partner(req: PolicyRequest, sender: policy.DomainFacts,
                   ledger: _Ledger) -> tuple[bool, int | None]:
    """(the SASL login's domain is hosted, its partner)."""
    if not req.sasl_domain:
        return False, None
    if req.sasl_domain == sender.name:
        return True, sender.partner_id
    login = ledger.domain(req.sasl_domain)
    return (False, None) if login is None else (True, login[1].partner_id)


def _inbound(job: PolicyJob, index: int, ledger: _Ledger) -> Decision:
    name = job.req.recipient_domain
    found = ledger.domain(name) if name else None
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
        found = ledger.domain(domain)
        decision = _decide(req, Facts(recipient=found[1] if found else None), job.options,
                           False)
        if found is not None and decision.count_domain is not None and req.size:
            ledger.add(index, domain, 0, req.size * n)
        if first is None or decision.reason == "inbound_suspended":
            first = decision
    return first or policy.NO_RULE
