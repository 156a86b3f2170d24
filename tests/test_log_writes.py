"""The log handler of the daemon (logsetup.TurnWriter): the lines of one event-loop turn go
out in one write, in order; lines logged off the loop go out at once; nothing is lost."""
from __future__ import annotations

import asyncio
import io
import logging
import threading

import pytest

from policyd.logsetup import TurnWriter


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def logged() -> tuple[logging.Logger, Writes]:
    stream = Writes()
    handler = TurnWriter(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.turnwriter")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers = []


def test_one_write_per_loop_turn_in_order(logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged

    async def main() -> list[str]:
        for i in range(5):
            logger.info("line %d", i)
        during = list(stream.writes)  # nothing written while the turn runs
        await asyncio.sleep(0)  # the turn is over: the handler's write runs
        await asyncio.sleep(0)
        logger.info("next turn")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return during

    during = asyncio.run(main())
    assert during == []
    assert stream.writes == ["line 0\nline 1\nline 2\nline 3\nline 4\n", "next turn\n"]


def test_lines_off_the_loop_are_written_at_once_after_those_pending(
        logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged
    logger.info("no loop")
    assert stream.getvalue() == "no loop\n"

    async def main() -> None:
        logger.info("on the loop")
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()

    asyncio.run(main())
    assert stream.getvalue() == "no loop\non the loop\nfrom a thread\n"


def test_a_loop_that_stopped_loses_nothing(logged: tuple[logging.Logger, Writes]) -> None:
    logger, stream = logged
    first = asyncio.new_event_loop()

    def log_then_stop() -> None:
        logger.info("before the loop stopped")
        first.stop()  # the callbacks this one scheduled never run

    first.call_soon(log_then_stop)
    first.run_forever()
    first.close()
    assert stream.getvalue() == ""  # pending: its loop never wrote it

    async def log(text: str) -> None:
        logger.info(text)
        await asyncio.sleep(0)

    asyncio.run(log("on a new loop"))  # that loop writes what was pending too
    assert stream.getvalue() == "before the loop stopped\non a new loop\n"
    first = asyncio.new_event_loop()
    first.call_soon(log_then_stop)
    first.run_forever()
    first.close()
    logger.handlers[0].flush()  # as logging.shutdown does at exit
    assert stream.getvalue().endswith("on a new loop\nbefore the loop stopped\n")
