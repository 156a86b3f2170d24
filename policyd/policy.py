"""The policy decision (SPEC §6) and the domain rules it rests on: pure functions of a request
and the facts read for it, no I/O.

The caller (policyd.service) reads Facts inside the write transaction, calls decide(), and
writes Decision.count/bytes to Decision.count_domain in that same transaction, so the facts a
decision saw cannot change before its count is in. The rules here are the only definitions of
what they decide, shared by the policy server, the REST increment and the API's views:
inherited() (wildcard inheritance), ses_verified(), domain_refusal() (may a hosted domain send
at all), over_limit() and quota_verdict() (the quota check and what enforcement makes of it).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from policyd.protocol import POLICY_REQUEST, PolicyRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Postfix protocol_state values the policy acts on, in SMTP order. Others (CONNECT, EHLO,
# HELO, VRFY, ETRN) carry no sender or recipient: nothing to decide there.
_STATE_RANK = {"MAIL": 0, "RCPT": 1, "DATA": 2, "END-OF-MESSAGE": 3}
COUNT_AT_CHOICES = ("RCPT", "DATA", "END-OF-MESSAGE")
_ONE_RECIPIENT_STATES = ("MAIL", "RCPT")

_LIMIT_TEXT = {
    "quota_daily": "Daily sending limit",
    "quota_monthly": "Monthly sending limit",
    "transfer": "Monthly transfer limit",
}


COUNTER_MAX = 2**63 - 1  # SQLite's largest integer: counters stop there, never wrap or fail


@dataclass(frozen=True, slots=True)
class Usage:
    """The sender domain's counters for the running day and month."""

    sent_today: int = 0
    sent_month: int = 0
    bytes_month: int = 0

    def plus(self, count: int, nbytes: int) -> Usage:
        """This usage with (count, nbytes) counted, as the store counts: held at COUNTER_MAX."""
        today, month, nbytes = (self.sent_today + count, self.sent_month + count,
                                self.bytes_month + nbytes)
        if month > COUNTER_MAX or nbytes > COUNTER_MAX:  # (the hot path: almost never)
            today, month = min(today, COUNTER_MAX), min(month, COUNTER_MAX)
            nbytes = min(nbytes, COUNTER_MAX)
        return Usage(today, month, nbytes)


NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class Sending:
    """A domain's outbound tier, daily and monthly limits (None = unlimited) and enforcement."""

    tier: str
    daily_limit: int | None
    monthly_limit: int | None
    enforcement: str  # hard | soft | off


def inherited(own: Sending, parent: Sending | None) -> Sending:
    """What a domain sends under: a subdomain linked to a wildcard parent uses the parent's
    tier, limits and enforcement (SPEC §5); its counters and transfer limit stay its own."""
    return own if parent is None else parent


def ses_verified(status: str, parent_status: str | None) -> bool:
    """Verified itself, or through its linked wildcard parent (its own status then reads
    'inherited')."""
    return status == "success" or parent_status == "success"


@dataclass(frozen=True, slots=True)
class DomainFacts:
    """One hosted domain, with effective (wildcard-inherited) limits and enforcement."""

    name: str
    partner_id: int | None = None
    status: str = "active"  # active | suspended
    out_status: str = "active"  # active | blocked | suspended
    ses_status: str = "not_started"  # the domain's own SES status
    parent_ses_status: str | None = None  # the linked wildcard parent's, if any
    daily_limit: int | None = None  # None = unlimited
    monthly_limit: int | None = None
    transfer_limit_bytes: int | None = None
    enforcement: str = "hard"  # hard | soft | off

    @property
    def ses_verified(self) -> bool:
        """Verified itself or through its parent."""
        return ses_verified(self.ses_status, self.parent_ses_status)


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """The hosted mailbox a SASL login names (SPEC §9): its effective limits (None =
    unlimited), its use in the running clock hour and day, and whether it is locked."""

    email: str
    hourly_limit: int | None = None
    daily_limit: int | None = None
    sent_hour: int = 0
    sent_today: int = 0
    locked: bool = False

    def plus(self, count: int) -> SenderFacts:
        """These facts with count more messages sent (held at COUNTER_MAX, as stored)."""
        return SenderFacts(self.email, self.hourly_limit, self.daily_limit,
                           min(self.sent_hour + count, COUNTER_MAX),
                           min(self.sent_today + count, COUNTER_MAX), self.locked)


def sender_limit(own: int | None, default: int | None) -> int | None:
    """A login's effective limit: its own when set, else the [senders] default."""
    return default if own is None else own


@dataclass(frozen=True, slots=True)
class Facts:
    """What the store knows about one request's domains and its SASL login."""

    sender: DomainFacts | None = None  # None = sender domain not hosted
    login_partner_known: bool = False  # the SASL login's domain is hosted
    login_partner_id: int | None = None  # its partner (None = master-owned)
    recipient: DomainFacts | None = None  # None = recipient domain not hosted
    counters: Usage = NO_USAGE  # the sender domain's usage
    login: SenderFacts | None = None  # None = no SASL login, or no hosted mailbox


@dataclass(frozen=True, slots=True)
class Decision:
    """The reply to send, why, and what to count (to count_domain) if it is sent."""

    action: str  # the reply text after "action="
    reason: str  # short label for logs and metrics
    count: int = 0  # messages to count now
    bytes: int = 0  # bytes to count now
    count_domain: str | None = None  # set exactly when this state is the counting state


NO_RULE = Decision("DUNNO", "no_rule")
NULL_SENDER = Decision("DUNNO", "null_sender")
_ALLOWED_UNCOUNTED = Decision("DUNNO", "allowed")
_INBOUND_UNCOUNTED = Decision("DUNNO", "inbound")


def decide(
    req: PolicyRequest,
    facts: Facts,
    *,
    count_at: str = "END-OF-MESSAGE",
    suspended_inbound: str = "hold",
    locked_reply: str = "reject",
    outbound: bool,
) -> Decision:
    """Decide one request per SPEC §6 and §9 (outbound: a locked login first, then the
    domain's checks in table order, the login's limits, and the domain's quota)."""
    if count_at not in COUNT_AT_CHOICES:
        raise ValueError(f"count_at must be one of {', '.join(COUNT_AT_CHOICES)}")
    count_rank = _STATE_RANK[count_at]
    rank = _STATE_RANK.get(req.protocol_state)
    if rank is None or req.request != POLICY_REQUEST:
        return NO_RULE
    if outbound:
        return _outbound(req, facts, rank, count_rank, locked_reply)
    return _inbound(req, facts.recipient, rank, count_rank, suspended_inbound)


def _outbound(req: PolicyRequest, facts: Facts, rank: int, count_rank: int,
              locked_reply: str) -> Decision:
    if not req.sender:
        return NULL_SENDER
    domain = facts.sender
    if domain is None:
        return _not_hosted(req.sender_domain)
    login = facts.login
    if login is not None and login.locked:  # the account first: whatever its domain's state
        return _locked(login, locked_reply)
    refusal = _refusal(domain, facts)
    if refusal is not None:
        return refusal
    if rank > count_rank:
        # Already counted at count_at for this message: checking again would count it twice.
        return _ALLOWED_UNCOUNTED
    counting = rank == count_rank
    if login is not None:
        over = sender_over_limit(login, message_units(req)[0])
        if over is not None:
            return _sender_limit_decision(login, over)
    return _quota(req, facts.counters, domain, counting=counting)


def _locked(login: SenderFacts, locked_reply: str) -> Decision:
    """A locked login's mail (SPEC §9): refused, or held for the postmaster; never counted."""
    shown = _printable(login.email)
    if locked_reply == "hold":
        return Decision(f"HOLD Sender {shown} is locked", "sender_locked")
    return Decision(f"REJECT 5.7.1 Sender {shown} is locked, contact your provider",
                    "sender_locked")


def sender_over_limit(login: SenderFacts, count: int) -> str | None:
    """The login's limit that counting count more messages would exceed, or None."""
    if login.hourly_limit is not None and login.sent_hour + count > login.hourly_limit:
        return "sender_hourly"
    if login.daily_limit is not None and login.sent_today + count > login.daily_limit:
        return "sender_daily"
    return None


def _sender_limit_decision(login: SenderFacts, reason: str) -> Decision:
    """Over a login's own limit: deferred whatever the domain's enforcement, nothing counted."""
    limit = login.hourly_limit if reason == "sender_hourly" else login.daily_limit
    period = "Hourly" if reason == "sender_hourly" else "Daily"
    return Decision(f"DEFER 4.7.1 {period} sending limit of {limit} messages reached for "
                    f"sender {_printable(login.email)}, try again later", reason)


def _not_hosted(sender_domain: str) -> Decision:
    if not sender_domain:
        return Decision("REJECT 5.7.1 Sender address has no domain", "not_hosted")
    shown = _printable(sender_domain)
    return Decision(f"REJECT 5.7.1 Sender domain {shown} is not hosted here", "not_hosted")


def domain_refusal(d: DomainFacts) -> str | None:
    """Why a hosted domain may not send at all, in SPEC §6 order (a reason), or None."""
    if d.status != "active":
        return "suspended"
    if not ses_verified(d.ses_status, d.parent_ses_status):
        return "ses_unverified"
    if d.out_status != "active":
        return "blocked" if d.out_status == "blocked" else "out_suspended"
    return None


def _refusal(d: DomainFacts, facts: Facts) -> Decision | None:
    """The non-quota outbound refusals, in SPEC §6 order; None when none applies."""
    if facts.login_partner_known and facts.login_partner_id != d.partner_id:
        text = f"REJECT 5.7.1 Sender domain {d.name} does not belong to the authenticated user"
        return Decision(text, "login_mismatch")
    reason = domain_refusal(d)
    if reason is None:
        return None
    if reason == "suspended":
        return Decision(f"DEFER 4.7.1 Domain {d.name} is suspended, try again later", reason)
    if reason == "ses_unverified":
        return Decision(f"REJECT 5.7.1 Sender domain {d.name} is not verified for sending",
                        reason)
    return Decision(f"REJECT 5.7.1 Outbound mail from {d.name} is {d.out_status}", reason)


def _quota(req: PolicyRequest, usage: Usage, d: DomainFacts, *, counting: bool) -> Decision:
    count, nbytes = message_units(req)
    reason = over_limit(usage, count, nbytes, d)  # (quota_verdict's rule, without its tuple)
    if not counting:  # the same check, "would it fit if counted now", counting nothing
        if reason is None:
            return _ALLOWED_UNCOUNTED
        count = nbytes = 0
    if reason is not None:
        return limit_decision(reason, d, count, nbytes)
    return Decision("DUNNO", "allowed", count, nbytes, d.name)


def _inbound(req: PolicyRequest, d: DomainFacts | None, rank: int, count_rank: int,
             suspended_inbound: str) -> Decision:
    if d is None:
        return NO_RULE
    if d.status != "active":
        # Suspended: mail is frozen, never bounced (HOLD keeps it in the queue).
        if suspended_inbound == "defer":
            return Decision(f"DEFER 4.7.1 Domain {d.name} is suspended, try again later",
                            "inbound_suspended")
        return Decision(f"HOLD Domain {d.name} is suspended", "inbound_suspended")
    if rank != count_rank:
        return _INBOUND_UNCOUNTED
    return Decision("DUNNO", "inbound", 0, message_units(req)[1], d.name)


def message_units(req: PolicyRequest) -> tuple[int, int]:
    """(messages, bytes) one request stands for: MAIL/RCPT one recipient, else all of them.

    At MAIL and RCPT the bytes are the SIZE= the client declared in MAIL FROM (Postfix's
    `size`, 0 if none), so the RCPTs of one message add up to size x recipients, as at DATA.
    """
    if req.protocol_state in _ONE_RECIPIENT_STATES:
        return 1, req.size
    count = req.recipient_count if req.recipient_count > 0 else 1
    return count, req.size * count


def over_limit(usage: Usage, count: int, nbytes: int, d: DomainFacts) -> str | None:
    """The first limit that counting (count, nbytes) would exceed, or None if it fits."""
    if d.daily_limit is not None and usage.sent_today + count > d.daily_limit:
        return "quota_daily"
    if d.monthly_limit is not None and usage.sent_month + count > d.monthly_limit:
        return "quota_monthly"
    if d.transfer_limit_bytes is not None and usage.bytes_month + nbytes > d.transfer_limit_bytes:
        return "transfer"
    return None


def quota_verdict(usage: Usage, count: int, nbytes: int,
                  d: DomainFacts) -> tuple[bool, str | None]:
    """(may it be counted, the limit it exceeds or None): over a limit, only a hard
    enforcement refuses; soft and off count it anyway (SPEC §6)."""
    reason = over_limit(usage, count, nbytes, d)
    return reason is None or d.enforcement != "hard", reason


def limit_decision(reason: str, d: DomainFacts, count: int, nbytes: int) -> Decision:
    """The reply for an exceeded limit under d.enforcement; count 0 means not counting now."""
    text = _LIMIT_TEXT.get(reason, "Sending limit")
    if d.enforcement == "hard":  # refused: counters unchanged, the client retries later
        return Decision(f"DEFER 4.7.1 {text} reached for {d.name}, try again later",
                        reason)
    counted_to = d.name if count or nbytes else None
    if d.enforcement == "soft":  # mail passes, counted, the breach is logged by Postfix
        return Decision(f"WARN {text} exceeded for {d.name}", reason, count, nbytes, counted_to)
    return Decision("DUNNO", reason, count, nbytes, counted_to)  # off: never limited


def is_outbound(req: PolicyRequest, trusted: tuple[Network, ...]) -> bool:
    """Outbound: a SASL login, or a client address inside one of the trusted networks."""
    if req.sasl_username:
        return True
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(req.client_address)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d from dual-stack sockets
    return any(address in net or (mapped is not None and mapped in net) for net in trusted)


def _printable(text: str, limit: int = 253) -> str:
    """Request-supplied text made safe for an SMTP reply: printable ASCII, bounded."""
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])
