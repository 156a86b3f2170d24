"""Time helpers: ISO-8601 UTC text everywhere, periods in the configured zone."""
from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """Format as ISO-8601 UTC with a Z suffix and second precision."""
    utc = moment.astimezone(timezone.utc)
    # %Y does not zero-pad years below 1000, which would break comparing ISO text
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S}Z"


def iso_precise(moment: datetime) -> str:
    """Format as ISO-8601 UTC with microseconds (for ordering within a second)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    """Parse ISO-8601; naive times are taken as UTC. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("expected an ISO-8601 string")
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def add_months(month: str, delta: int) -> str:
    """The month key ('YYYY-MM') delta months after month (delta may be negative)."""
    index = int(month[:4]) * 12 + int(month[5:7]) - 1 + delta
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


class Periods:
    """Hour, day and month period keys in one time zone (ZoneInfo caches the zone data)."""

    __slots__ = ("zone", "_last")

    def __init__(self, zone_name: str) -> None:
        self.zone = ZoneInfo(zone_name)
        # (whole second, its keys) last asked, one tuple: threads share it (the hot path asks)
        self._last: tuple[float, tuple[str, str, str]] = (-1.0, ("", "", ""))

    def keys(self, moment: datetime) -> tuple[str, str]:
        """Return ('YYYY-MM-DD', 'YYYY-MM') of moment in this zone (naive moments are UTC)."""
        day, month, _ = self._keys(moment)
        return day, month

    def hour(self, moment: datetime) -> str:
        """Return the clock hour 'YYYY-MM-DDTHH' of moment in this zone (the hour repeated
        when summer time ends is one period: counted together, never freed early)."""
        return self._keys(moment)[2]

    def _keys(self, moment: datetime) -> tuple[str, str, str]:
        if moment.tzinfo is None:  # astimezone() would read a naive time as host-local
            moment = moment.replace(tzinfo=timezone.utc)
        second = moment.timestamp() // 1  # zone offsets are whole seconds: a day starts on one
        last = self._last
        if second == last[0]:
            return last[1]
        hour = moment.astimezone(self.zone).strftime("%Y-%m-%dT%H")
        keys = (hour[:10], hour[:7], hour)
        self._last = (second, keys)
        return keys
