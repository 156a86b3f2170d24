"""The store engine (policyd/store): group commit, batch functions and their `continued`
contract, time budgets, another process's write lock, checkpoints and the WAL."""
from __future__ import annotations

import asyncio
import sqlite3
import struct
import time
from pathlib import Path

import pytest

from policyd.store import Store, connect
from policyd.store import counters
from tests.conftest import WriteLock, submit_batched

EOF_WAIT = 10.0  # bound on waiting for something that happens at once when all is well


class Recorder:
    """A batch function that records the `continued` flag of each run (and writes a row)."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[bool] = []
        self.fail = fail

    def __call__(self, conn: sqlite3.Connection, args: list[str],
                 continued: bool) -> list[str]:
        self.seen.append(continued)
        if self.fail:
            raise ValueError("refused")
        for value in args:
            counters.seen_message(conn, value, "now")
        return args


def _plain_write(conn: sqlite3.Connection, value: str) -> None:
    counters.seen_message(conn, value, "now")


async def test_continued_only_while_nothing_else_writes(store: Store) -> None:
    fn, other, failing = Recorder(), Recorder(), Recorder(fail=True)
    await submit_batched(store, fn, "a")
    await submit_batched(store, fn, "b")
    await store.write(_plain_write, "c")  # any other job on the write connection
    await submit_batched(store, fn, "d")
    await submit_batched(store, other, "e")  # another batch function
    await submit_batched(store, fn, "f")
    await submit_batched(store, fn, "g")
    with sqlite3.connect(store.path) as outside:  # another connection (another process)
        outside.execute("INSERT INTO sns_messages (message_id, received_at) VALUES ('x', 'now')")
    outside.close()
    await submit_batched(store, fn, "h")
    await submit_batched(store, fn, "i")
    with pytest.raises(ValueError):
        await submit_batched(store, failing, "j")
    await submit_batched(store, fn, "k")
    assert fn.seen == [False, True, False, False, True, False, True, False]
    assert other.seen == [False]


async def test_a_failed_run_is_not_continued(store: Store) -> None:
    failing = Recorder(fail=True)
    for _ in range(2):
        with pytest.raises(ValueError):
            await submit_batched(store, failing, "x")
    assert failing.seen == [False, False]


def _lose_the_batch(conn: sqlite3.Connection, args: list[str], continued: bool) -> list[str]:
    """A batch function whose failure takes the whole transaction with it (as SQLITE_FULL or
    an I/O error would)."""
    conn.execute("ROLLBACK")
    raise sqlite3.OperationalError("disk I/O error")


async def test_not_continued_after_its_transaction_was_lost(store: Store) -> None:
    fn = Recorder()
    await submit_batched(store, fn, "a")
    await submit_batched(store, fn, "b")
    # one turn, one transaction: fn's run succeeds, then the transaction is lost
    both = [submit_batched(store, fn, "c"),
            submit_batched(store, _lose_the_batch, "x")]
    results = await asyncio.gather(*both, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    await submit_batched(store, fn, "d")  # c was never committed: what fn kept from it is void
    assert fn.seen == [False, True, True, False]


# --- the store's batch path, as the policy service uses it -------------------------------

def _record(conn: sqlite3.Connection, values: list[str], continued: bool) -> list[str]:
    """A batch function: one insert of all its values (its one write, last). A bare table
    write, not a store factory: this tests the store's batching, not its data."""
    rows = ", ".join(["(?, 'now')"] * len(values))
    conn.execute(f"INSERT INTO sns_messages (message_id, received_at) VALUES {rows}", values)
    return [f"ok {v}" for v in values]


def _refuse(conn: sqlite3.Connection, values: list[str], continued: bool) -> list[str]:
    raise ValueError("refused")


def _insert(conn: sqlite3.Connection, value: str) -> str:
    counters.seen_message(conn, value, "now")
    return value


def _messages(path: Path) -> set[str]:
    conn = connect(path, readonly=True)
    try:
        return {r[0] for r in conn.execute("SELECT message_id FROM sns_messages")}
    finally:
        conn.close()


async def test_a_failing_batch_function_fails_its_own_run_only(store: Store) -> None:
    ok = [submit_batched(store, _record, "a"), submit_batched(store, _record, "b")]
    refused = [submit_batched(store, _refuse, "c"), submit_batched(store, _refuse, "d")]
    plain = store.write(_insert, "e")  # a guarded job in the same turn, same transaction
    assert await asyncio.gather(*ok) == ["ok a", "ok b"]
    for future in refused:
        with pytest.raises(ValueError, match="refused"):
            await future
    assert await plain == "e"
    assert _messages(store.path) == {"a", "b", "e"}
    # on the loop: the batched run commits alone, the guarded job in the writer thread
    assert store.batches == (2 if store.write_on_loop else 1)


async def test_batch_waits_for_another_process_within_its_budget(store: Store) -> None:
    with WriteLock(str(store.path)):
        late = submit_batched(store, _record, "late", budget=0.2)
        with pytest.raises(TimeoutError):
            await late
        waiting = submit_batched(store, _record, "waits", budget=30)
    assert await waiting == "ok waits"  # queued to the writer thread, which waited
    assert _messages(store.path) == {"waits"}  # the expired one never ran


def _slow_record(conn: sqlite3.Connection, values: list[str], continued: bool) -> list[str]:
    time.sleep(0.4)  # a stalled disk, say: the transaction began, its budget runs out
    return _record(conn, values, continued)


async def test_a_started_batch_is_answered_when_it_commits_not_timed_out(store: Store) -> None:
    """Past its budget, a job whose transaction has begun gets its real answer once that
    commits: a timeout answer ("try again later") for an increment being committed would
    count the message again when Postfix retries it."""
    assert await submit_batched(store, _slow_record, "slow", budget=0.1) == "ok slow"
    assert _messages(store.path) == {"slow"}


async def test_checkpoints_follow_commits_made_on_the_loop(store: Store) -> None:
    store.checkpoint_every = 3

    async def checkpointed(count: int) -> None:
        while store.checkpoints < count:
            await asyncio.sleep(0.01)

    for round_no in (1, 2):
        assert store.checkpoints == round_no - 1
        for i in range(3):
            name = f"m{round_no}.{i}"
            assert await submit_batched(store, _record, name) == f"ok {name}"
        await asyncio.wait_for(checkpointed(round_no), EOF_WAIT)
    assert len(_messages(store.path)) == 6


async def test_wal_starts_over_under_steady_writes(store: Store) -> None:
    """Checkpoints run beside a steady stream of hot-path commits, and the WAL still starts
    over after them (its header's checkpoint sequence moves on), so it does not grow with
    every commit, as it did when checkpoints only ran beside the writes."""
    store.checkpoint_every = 5
    wal = Path(str(store.path) + "-wal")
    fn, restarts, stop = Recorder(), set(), False

    def sequence() -> int | None:
        try:
            with open(wal, "rb") as f:  # WAL header: magic, version, page size, sequence
                header = f.read(16)
        except FileNotFoundError:
            return None
        return struct.unpack(">I", header[12:16])[0] if len(header) == 16 else None

    async def writer(n: int) -> None:
        # until enough checkpoints ran (a busy machine makes bigger batches, fewer commits)
        i = 0
        while store.checkpoints < 8 and i < 5000:
            await submit_batched(store, fn, f"{n}.{i}.{'x' * 200}")
            i += 1

    async def watch() -> None:
        while not stop:
            restarts.add(sequence())
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(writer(n) for n in range(20)))
    stop = True
    await watcher
    assert store.checkpoints >= 6, store.checkpoints
    # one sequence number per start of the WAL: the first, and one after most checkpoints
    # (beside the writes alone: one or two in all)
    assert len(restarts - {None}) > store.checkpoints // 2 + 1, (restarts, store.checkpoints)


def test_sender_counts_add_up_across_statement_chunks(tmp_path: Path) -> None:
    """add_counts writes many logins in chunks of MAX_VALUES_LOGINS: every login's hour and
    day counter gets its own n, again on a second batch, and a huge n is held at the maximum."""
    from policyd.store import domains, mailboxes, open_and_migrate, senders
    from policyd.store.scope import MASTER
    from policyd.policy import COUNTER_MAX

    path = tmp_path / "senders.sqlite3"
    open_and_migrate(path)
    conn = connect(path)
    count = 2 * senders.MAX_VALUES_LOGINS + 5
    conn.execute("BEGIN IMMEDIATE")
    domains.create_domain(conn, MASTER, "a.test", None, "unlimited", (None, None))
    ids = {mailboxes.create_mailbox(conn, MASTER, f"u{i}", "a.test",
                                    {"password_hash": "{BLF-CRYPT}$2b$04$test"}).id: i
           for i in range(1, count + 1)}
    conn.execute("COMMIT")
    assert sorted(ids) == sorted(ids.values())  # mailbox ids 1..count, as counted below
    batch = [(i, "2026-12-04T10", "2026-12-04", i) for i in range(1, count + 1)]
    senders.add_counts(conn, batch)
    senders.add_counts(conn, batch)
    senders.add_counts(conn, [(1, "2026-12-04T10", "2026-12-04", COUNTER_MAX + 7)])
    rows = conn.execute("SELECT mailbox_id, kind, sent FROM sender_counters").fetchall()
    assert len(rows) == 2 * count
    for mailbox_id, _kind, sent in rows:
        assert sent == (COUNTER_MAX if mailbox_id == 1 else 2 * mailbox_id)
    last = f"u{count}@a.test"
    found = senders.logins(conn, ["u2@a.test", last, "nobody@a.test"],
                           "2026-12-04T10", "2026-12-04")
    assert set(found) == {"u2@a.test", last}
    assert found[last].sent_hour == 2 * count
    assert found["u2@a.test"].sent_hour == found["u2@a.test"].sent_today == 4
    assert found["u2@a.test"].domain == "a.test" and not found["u2@a.test"].locked
    conn.close()
