"""The stolen-password lock (SPEC §9): which client addresses each login was seen from, and
when a login has been seen from more of them than `[senders] lock_distinct_ips` allows.

A stolen password shows up as one login used from many places at once (a botnet), where a
real user sends from one office, one phone, one home. Addresses are grouped as a network
assigns them: an IPv4 address each, IPv6 by /64 (one customer's whole prefix is one place).
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from functools import lru_cache

# Logins whose addresses are remembered at once; the least recently seen is forgotten first.
# With lock_distinct_ips = N, each keeps at most N + 1 addresses, so the memory is bounded by
# MAX_TRACKED_LOGINS x (N + 1) entries whatever the traffic.
MAX_TRACKED_LOGINS = 50_000


@lru_cache(maxsize=4096)  # a mail host sees the same clients again and again; parsing is 5 us
def address_group(address: str) -> str | None:
    """The unit counted as one address: the IPv4 address, or the IPv6 /64 it is in (an
    IPv4-mapped IPv6 address is its IPv4 address); None when it is no IP address (Postfix
    sends 'unknown' when it could not tell)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressTracker:
    """Distinct address groups per login within a sliding window, bounded in memory.

    A login is known by its mailbox id and an epoch (when it was last unlocked): unlocking
    starts a new epoch, which forgets every address seen before it.
    """

    def __init__(self, threshold: int, window: float,
                 max_logins: int = MAX_TRACKED_LOGINS) -> None:
        self._threshold, self._window, self._max_logins = threshold, window, max_logins
        # mailbox id -> (epoch, {address group: last seen}), least recently seen first
        self._seen: OrderedDict[int, tuple[str, dict[str, float]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def addresses(self) -> int:
        """Address entries held in all (what the memory bound is about)."""
        return sum(len(groups) for _, groups in self._seen.values())

    def observe(self, login: int, epoch: str, group: str, now: float) -> int | None:
        """Record that login was seen from group at now (seconds); the number of distinct
        groups within the window when that exceeds the threshold (the login is to be
        locked, and forgotten here), else None."""
        entry = self._seen.get(login)
        if entry is None or entry[0] != epoch:
            entry = self._seen[login] = (epoch, {})
        self._seen.move_to_end(login)
        groups = entry[1]
        groups[group] = now
        if len(groups) > self._threshold:
            cutoff = now - self._window
            for seen_group, seen_at in list(groups.items()):
                if seen_at < cutoff:
                    del groups[seen_group]
            if len(groups) > self._threshold:
                del self._seen[login]
                return len(groups)
        while len(self._seen) > self._max_logins:
            self._seen.popitem(last=False)
        return None

    def forget(self, login: int) -> None:
        """Drop what is known of a login (it was locked)."""
        self._seen.pop(login, None)
