"""How far behind the replica is: Litestream's last successful sync, from its control socket.

Litestream (systemd/policyd-litestream.service, conf/litestream.yml) ships the database's WAL
to object storage. Its control socket answers `GET /list` with each database it replicates and
`last_sync_at`, the moment of its last successful upload round to the replica (one every
`sync-interval`, new data or not). A restore after losing this host misses what was committed
after that moment, so its age is the replication lag an operator alerts on.

ReplicationMonitor asks every `[replication] poll_interval` seconds: one request on a Unix
socket, in a task of its own, never on the policy path. GET /health and /metrics read what it
keeps. The lag is measured at the last answer (sync age when Litestream answered); while
Litestream does not answer, it is the age of the last sync known, growing.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import aiohttp
from prometheus_client import CollectorRegistry, Gauge

from policyd.config import ReplicationConfig
from policyd.timeutil import iso, parse_iso, utcnow

log = logging.getLogger(__name__)
ASK_TIMEOUT = 2.0  # seconds for one answer of the control socket


@dataclass(frozen=True)
class Seen:
    """One look at Litestream: its word on our database, and when we asked."""

    status: str  # replicating | stopped | not_listed | unreachable | not_checked
    last_sync_at: datetime | None
    checked_at: datetime | None


class ReplicationMonitor:
    """Polls Litestream's control socket; serves the result to /health and /metrics."""

    def __init__(self, config: ReplicationConfig, db_path: Path, registry: CollectorRegistry,
                 now: Callable[[], datetime] = utcnow) -> None:
        self._config = config
        self._db = os.path.realpath(db_path)
        self._now = now
        self.seen = Seen("not_checked", None, None)
        self._ok: bool | None = None  # for logging each change once
        self._up = Gauge("policyd_replication_up",
                         "1 when Litestream answered and replicates the database",
                         registry=registry)
        last = Gauge("policyd_replication_last_sync_timestamp_seconds",
                     "Unix time of Litestream's last successful sync to the replica (0: none)",
                     registry=registry)
        last.set_function(lambda: self.seen.last_sync_at.timestamp()
                          if self.seen.last_sync_at else 0.0)
        lag = Gauge("policyd_replication_lag_seconds",
                    "Age of the last successful replica sync (NaN: none known)",
                    registry=registry)
        lag.set_function(self._lag_or_nan)

    async def run(self) -> None:
        """Poll until cancelled."""
        connector = aiohttp.UnixConnector(path=self._config.control_socket)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:  # first look after one interval: Litestream starts beside us
                await asyncio.sleep(self._config.poll_interval)
                try:
                    self.record(await self.ask(session))
                except Exception:  # a bug: logged, and the next look tries again
                    log.exception("replication check failed")

    async def ask(self, session: aiohttp.ClientSession) -> Seen:
        """One `GET /list` on the control socket, turned into what we keep."""
        checked = self._now()
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                async with session.get("http://litestream/list") as resp:
                    resp.raise_for_status()
                    body = await resp.json(content_type=None)
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.debug("Litestream control socket: %r", exc)
            return Seen("unreachable", self.seen.last_sync_at, checked)
        return self._parse(body, checked)

    def _parse(self, body: Any, checked: datetime) -> Seen:
        databases = body.get("databases") if isinstance(body, dict) else None
        for entry in databases if isinstance(databases, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                continue
            if os.path.realpath(entry["path"]) != self._db:
                continue
            try:
                last = parse_iso(entry["last_sync_at"]) if entry.get("last_sync_at") else None
            except ValueError:
                last = None
            status = "replicating" if entry.get("status") == "replicating" else "stopped"
            return Seen(status, last or self.seen.last_sync_at, checked)
        return Seen("not_listed", None, checked)

    def record(self, seen: Seen) -> None:
        """Keep a look's result; log when replication turns unhealthy or recovers."""
        self.seen = seen
        self._up.set(1 if seen.status == "replicating" else 0)
        ok = self.ok()
        if ok != self._ok:
            lag = self.lag()
            if ok:
                log.info("replication ok: last sync to the replica %.1f s ago", lag or 0.0)
            else:
                log.warning("replication %s: last sync to the replica %s (over [replication] "
                            "max_lag = %g s); a restore now would miss what came after",
                            seen.status, "never" if lag is None else f"{lag:.0f} s ago",
                            self._config.max_lag)
            self._ok = ok

    def lag(self) -> float | None:
        """Seconds between the last successful sync and the last answer (or now, once
        Litestream stops answering, or the last answer is overdue); None when no sync is
        known."""
        seen, now = self.seen, self._now()
        if seen.last_sync_at is None:
            return None
        until = now
        if seen.status == "replicating" and seen.checked_at is not None:
            overdue = 2 * self._config.poll_interval + ASK_TIMEOUT
            if (now - seen.checked_at).total_seconds() <= overdue:
                until = seen.checked_at
        return max(0.0, (until - seen.last_sync_at).total_seconds())

    def _lag_or_nan(self) -> float:
        lag = self.lag()
        return math.nan if lag is None else lag

    def ok(self) -> bool:
        """Replicating, with a lag within [replication] max_lag."""
        lag = self.lag()
        return (self.seen.status == "replicating" and lag is not None
                and lag <= self._config.max_lag)

    def health(self) -> dict[str, Any]:
        """The `replication` field of GET /health."""
        lag, seen = self.lag(), self.seen
        return {"status": seen.status, "ok": self.ok(),
                "last_sync_at": iso(seen.last_sync_at) if seen.last_sync_at else None,
                "lag_seconds": None if lag is None else round(lag, 3),
                "checked_at": iso(seen.checked_at) if seen.checked_at else None}
