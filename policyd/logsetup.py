"""Log output: one line per event on stderr, with sd-daemon priority prefixes under journald.

journald reads a service's stderr line by line and gives every line the unit's default
priority, unless the line starts with `<N>` (sd-daemon(3)): `<3>` error, `<4>` warning, `<6>`
info, `<7>` debug. systemd tells a process that its stderr is such a stream by setting
`JOURNAL_STREAM=DEV:INODE` (systemd.exec(5)); the variable is inherited, so it only counts
when it names the stream stderr really is on (a shell started from a service, with stderr
redirected to a file, must not get prefixes).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TextIO

FORMAT = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3))."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def on_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when stream is the journal stream that JOURNAL_STREAM names."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (pytest capture)
        return False
    return (stat.st_dev, stat.st_ino) == (int(dev), int(inode))


class JournalFormatter(logging.Formatter):
    """The usual line, each of its lines (a traceback too) prefixed with the priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class TurnWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines logged during one turn of the running event
    loop together, with one write(2), when the turn is over.

    The policy server logs a line per decision on the loop: written one by one, each line is a
    system call of its own (stderr is line-buffered), a sixth of the decision's cost at 10
    connections. Lines logged off the loop (another thread, a command) are written at once,
    after any still pending, so the order is kept. Nothing is dropped: at exit
    (logging.shutdown) and in error_line() what is pending is written.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # whose next turn writes

    def emit(self, record: logging.LogRecord) -> None:  # (called holding self.lock)
        try:
            line = self.format(record)
        except Exception:  # as StreamHandler: a bad record is reported, not raised
            self.handleError(record)
            return
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: now
            self.flush()
            return
        if self._scheduled is not loop:  # (a loop that stopped never wrote: this one will)
            self._scheduled = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is pending, in one write."""
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = None
            pending, self._pending = self._pending, []
            if pending:
                try:
                    self.stream.write("\n".join(pending) + "\n")
                except (OSError, ValueError):  # the stream is gone (closed at exit)
                    return
            super().flush()


def configure(level: str, stream: TextIO | None = None) -> None:
    """Log to stream (stderr) at level, with priority prefixes when it is the journal; the
    lines of one event-loop turn written together (TurnWriter)."""
    stream = sys.stderr if stream is None else stream
    handler = TurnWriter(stream)
    formatter = JournalFormatter(FORMAT) if on_journal(stream) else logging.Formatter(FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


def error_line(text: str, stream: TextIO | None = None) -> None:
    """Print a one-line error outside logging (the CLI's last word), prefixed on the journal;
    lines still pending are written first."""
    stream = sys.stderr if stream is None else stream
    for handler in logging.getLogger().handlers:
        handler.flush()
    prefix = f"<{priority(logging.ERROR)}>" if on_journal(stream) else ""
    print(prefix + text, file=stream)
