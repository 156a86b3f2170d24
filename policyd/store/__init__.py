"""The store: one SQLite file (WAL), one write connection, a few read connections.

All SQL of the project lives in this package: callers pass one of its functions to
`Store.write` / `Store.read` (or, on the policy hot path, `Store.submit_batched`), which
receives a sqlite3.Connection. The engine is split by concern: `connection` (opening),
`jobs` (the job model and time budgets), `commit` (group commit on the write connection),
`writer` (the writer thread and checkpoints), `reads` (the read pool) and `engine` (the Store
that ties them together). README.md here tells the design and why.
"""
from policyd.store.connection import StoreError, connect, open_and_migrate
from policyd.store.engine import Store

__all__ = ["Store", "StoreError", "connect", "open_and_migrate"]
