"""Log output: one line per event on stderr, with sd-daemon priority prefixes under journald.

journald reads a service's stderr line by line and gives every line the unit's default
priority, unless the line starts with `<N>` (sd-daemon(3)): `<3>` error, `<4>` warning, `<6>`
info, `<7>` debug. systemd tells a process that its stderr is such a stream by setting
`JOURNAL_STREAM=DEV:INODE` (systemd.exec(5)); the variable is inherited, so it only counts
when it names the stream stderr really is on (a shell started from a service, with stderr
redirected to a file, must not get prefixes).
"""
from __future__ import annotations

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


def configure(level: str, stream: TextIO | None = None) -> None:
    """Log to stream (stderr) at level, with priority prefixes when it is the journal."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    formatter = JournalFormatter(FORMAT) if on_journal(stream) else logging.Formatter(FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


def error_line(text: str, stream: TextIO | None = None) -> None:
    """Print a one-line error outside logging (the CLI's last word), prefixed on the journal."""
    stream = sys.stderr if stream is None else stream
    prefix = f"<{priority(logging.ERROR)}>" if on_journal(stream) else ""
    print(prefix + text, file=stream)
