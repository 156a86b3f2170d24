"""Time helpers: ISO-8601 UTC text everywhere, periods in the configured zone."""
from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """Format as ISO-8601 UTC with a Z suffix and second precision."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class Periods:
    """Day and month period keys in one time zone (cached per zone)."""

    __slots__ = ("zone",)

    def __init__(self, zone_name: str) -> None:
        self.zone = ZoneInfo(zone_name)

    def keys(self, moment: datetime) -> tuple[str, str]:
        """Return ('YYYY-MM-DD', 'YYYY-MM') of moment in this zone."""
        local = moment.astimezone(self.zone)
        day = local.strftime("%Y-%m-%d")
        return day, day[:7]
