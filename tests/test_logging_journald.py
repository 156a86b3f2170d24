"""Log lines under journald carry their sd-daemon priority (SPEC §10).

systemd connects a service's stderr to a journald stream socket and names it in
JOURNAL_STREAM=DEV:INODE. Here stderr is one end of a UNIX stream socket pair, as under
systemd, and the test reads the other end.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

from policyd import logsetup
from policyd.config import load_config
from tests.daemon_process import START_WAIT, cli_env, daemon_config, run_cli

PRIORITY = re.compile(r"^<[0-7]>")


class JournalStream:
    """A stream socket standing in for journald: the child's stderr is one end."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        info = os.fstat(self.theirs.fileno())
        self.name = f"{info.st_dev}:{info.st_ino}"  # as systemd sets JOURNAL_STREAM

    async def spawn(self, *args: str, journal_stream: str | None = None
                    ) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
        """Start `python -m policyd ARGS` with stderr on the stream; its reader."""
        env = cli_env(JOURNAL_STREAM=self.name if journal_stream is None else journal_stream)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "policyd", *args, env=env, stdout=asyncio.subprocess.DEVNULL,
            stderr=self.theirs.fileno())
        self.theirs.close()  # the child holds it: EOF when the child is gone
        # kept: a StreamWriter closes its socket when it is collected
        reader, self.writer = await asyncio.open_unix_connection(sock=self.ours)
        return proc, reader

    def close(self) -> None:
        self.writer.close()


async def lines_until_exit(proc: asyncio.subprocess.Process,
                           reader: asyncio.StreamReader) -> list[str]:
    out = await asyncio.wait_for(reader.read(), START_WAIT)
    await asyncio.wait_for(proc.wait(), START_WAIT)
    return out.decode().splitlines()


async def one_shot(*args: str, journal_stream: str | None = None
                   ) -> tuple[int | None, list[str]]:
    stream = JournalStream()
    proc, reader = await stream.spawn(*args, journal_stream=journal_stream)
    try:
        lines = await lines_until_exit(proc, reader)
    finally:
        stream.close()
    return proc.returncode, lines


async def test_one_shot_job_lines_carry_their_priority(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3")
    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err

    code, lines = await one_shot("reset-daily", "--config", str(config))

    assert code == 0
    assert lines and all(line.startswith("<6>INFO ") for line in lines), lines
    assert any("<6>INFO policyd.jobs: reset-daily" in line for line in lines)


async def test_the_closing_error_line_is_an_error(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "missing.sqlite3")

    code, lines = await one_shot("reset-daily", "--config", str(config))

    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("<3>policyd: reset-daily: database ")


async def test_no_prefix_when_journal_stream_names_another_stream(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3")
    code, _, err = await run_cli("init-db", "--config", str(config))
    assert code == 0, err
    other = os.stat(config)  # a file, not the stream stderr is on

    for journal_stream in (f"{other.st_dev}:{other.st_ino}", "", "garbage", "1:"):
        code, lines = await one_shot("reset-daily", "--config", str(config),
                                     journal_stream=journal_stream)
        assert code == 0
        assert lines and not any(PRIORITY.match(line) for line in lines), lines
        assert any(line.startswith("INFO policyd.jobs: reset-daily") for line in lines)


async def read_until(reader: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    """Read lines into seen until one contains needle."""
    while True:
        line = await asyncio.wait_for(reader.readline(), START_WAIT)
        assert line, f"stream ended before {needle!r}: {seen}"
        seen.append(line.decode().rstrip("\n"))
        if needle in seen[-1]:
            return


async def test_serve_lines_carry_their_priority(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, tmp_path / "policyd.sqlite3")
    policy_port = load_config(config).policy.listen[1]
    stream = JournalStream()
    proc, reader = await stream.spawn("serve", "--config", str(config))
    seen: list[str] = []
    try:
        await read_until(reader, "policy server listening", seen)
        await read_until(reader, "API listening", seen)
        reply_reader, writer = await asyncio.open_connection("127.0.0.1", policy_port)
        for n in range(3):  # decisions: their lines come while the daemon runs, in order
            writer.write(f"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                         f"client_address=192.0.2.{n}\nrecipient=r@elsewhere.test\n\n"
                         .encode())
        for _ in range(3):
            assert (await reply_reader.readuntil(b"\n\n")).startswith(b"action=")
        for n in range(3):
            await read_until(reader, f"client=192.0.2.{n} ", seen)
        writer.write(b"no equals sign here\n\n")  # malformed: a warning, the connection closed
        await read_until(reader, "malformed request", seen)
        writer.close()
        proc.send_signal(signal.SIGTERM)
        seen += await lines_until_exit(proc, reader)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stream.close()

    assert proc.returncode == 0
    assert all(PRIORITY.match(line) for line in seen), seen
    assert any(line.startswith("<4>WARNING policyd.policyserver: policy connection from ")
               for line in seen), seen
    assert any(line.startswith("<6>INFO ") and "stopped cleanly" in line for line in seen)
    decisions = [line for line in seen if line.startswith("<6>INFO policyd.service: policy ")]
    assert len(decisions) == 3, seen


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("policyd.test", level, __file__, 1, message, (), exc_info)


def test_levels_map_to_sd_daemon_priorities() -> None:
    formatter = logsetup.JournalFormatter(logsetup.FORMAT)
    shown = [formatter.format(record(level, "x")) for level in
             (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)]
    assert shown == ["<7>DEBUG policyd.test: x", "<6>INFO policyd.test: x",
                     "<4>WARNING policyd.test: x", "<3>ERROR policyd.test: x",
                     "<2>CRITICAL policyd.test: x"]


def test_every_line_of_a_traceback_carries_the_priority() -> None:
    text = logsetup.JournalFormatter(logsetup.FORMAT).format(
        record(logging.ERROR, "failed", exc=True))
    lines = text.split("\n")
    assert len(lines) > 3 and lines[0] == "<3>ERROR policyd.test: failed"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_journal_stream_must_name_the_stream_itself(tmp_path: Path) -> None:
    with tempfile.TemporaryFile("w", dir=tmp_path) as stream, \
            tempfile.TemporaryFile("w", dir=tmp_path) as other:
        own, theirs = os.fstat(stream.fileno()), os.fstat(other.fileno())
        assert logsetup.on_journal(stream, {"JOURNAL_STREAM": f"{own.st_dev}:{own.st_ino}"})
        assert not logsetup.on_journal(stream,
                                       {"JOURNAL_STREAM": f"{theirs.st_dev}:{theirs.st_ino}"})
        assert not logsetup.on_journal(stream, {})
        assert not logsetup.on_journal(stream, {"JOURNAL_STREAM": f"{own.st_ino}"})
