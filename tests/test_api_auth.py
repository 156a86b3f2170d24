"""Health and authentication of the management API (SPEC §3, §4)."""
from __future__ import annotations

import sqlite3
from typing import Callable

from policyd.config import Config
from tests.api_helpers import assert_error, fast_bcrypt, tenant
from tests.conftest import MASTER, Daemon, start_daemon

__all__ = ["fast_bcrypt"]  # an autouse fixture: imported to apply here


# --- health and auth ------------------------------------------------------------------------
async def test_health_answers_without_a_token(daemon: Daemon) -> None:
    status, body = await daemon.api("GET", "/health", token=None)
    assert status == 200, body
    assert body["status"] == "ok" and body["db"] == "ok"
    assert body["schema_version"] == body["expected_schema_version"] > 0


async def test_health_is_503_once_the_store_is_closed(daemon: Daemon) -> None:
    await daemon.rt.store.close()
    status, body = await daemon.api("GET", "/health", token=None)
    assert status == 503, body
    assert body["status"] == "error" and body["db"] == "error"
    assert body["error"]["code"] == "unavailable"
    status, body = await daemon.api("GET", "/domains/")
    assert_error(status, body, 503, "unavailable")


async def test_health_is_503_while_another_process_holds_the_write_lock(
        make_config: Callable[..., Config]) -> None:
    config = make_config(database={"busy_timeout": "0.2"})
    daemon = await start_daemon(config)
    holder = sqlite3.connect(str(config.db_path), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # e.g. a stuck sqlite3 shell or a backup tool
        status, body = await daemon.api("GET", "/health", token=None)
        assert status == 503 and body["db"] == "error", body
        holder.execute("ROLLBACK")
        status, body = await daemon.api("GET", "/health", token=None)
        assert status == 200 and body["db"] == "ok", body
    finally:
        holder.close()
        await daemon.stop()


async def test_every_call_but_health_needs_a_valid_token(daemon: Daemon) -> None:
    _, token, _ = await tenant(daemon)
    assert_error(*await daemon.api("GET", "/domains/", token=None), 401, "unauthorized")
    assert_error(*await daemon.api("GET", "/domains/", token="not-a-token"), 401, "unauthorized")
    assert_error(*await daemon.api("GET", "/domains/", token=None,
                                   headers={"Authorization": f"Basic {MASTER}"}),
                 401, "unauthorized")
    for secret in (MASTER, token):
        assert (await daemon.api("GET", "/domains/", token=secret))[0] == 200
        assert (await daemon.api("GET", "/domains/", token=None,
                                 headers={"X-API-Key": secret}))[0] == 200
        assert (await daemon.api("GET", "/domains/", token=None,
                                 headers={"Authorization": f"bearer {secret}"}))[0] == 200
