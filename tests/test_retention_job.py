"""The retention purge end to end: policy set through the API, run by `policyd purge-retention`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import start_daemon

DAY = 86400


def _maildir_file(root: Path, domain: str, local: str, sub: str, age_days: float) -> Path:
    stamp = int(time.time() - age_days * DAY)
    path = root / domain / local / "Maildir" / sub / f"{stamp}.M1P1.host,S=5:2,S"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("hello")
    return path


async def test_purge_removes_only_expired_mail_of_domains_with_retention(
        make_config: Any, tmp_path: Path) -> None:
    root = tmp_path / "vmail"
    config = make_config(mail={"maildir_root": f"{root}/%d/%n/Maildir"})
    daemon = await start_daemon(config)
    try:
        for name in ("kept.test", "purged.test"):
            await daemon.domain(name)
            status, _ = await daemon.api("POST", "/users/", {"email": f"bob@{name}",
                                                             "password": "s3cret-pass"})
            assert status == 201
        status, body = await daemon.api("PUT", "/domains/purged.test/retention",
                                        {"retention_days": 7})
        assert status == 200 and body["retention_days"] == 7
        old = _maildir_file(root, "purged.test", "bob", "cur", 30)
        old_new = _maildir_file(root, "purged.test", "bob", "new", 8)
        fresh = _maildir_file(root, "purged.test", "bob", "cur", 1)
        untouched = _maildir_file(root, "kept.test", "bob", "cur", 365)
        result = subprocess.run(
            [sys.executable, "-m", "policyd", "purge-retention", "--config", config.source],
            capture_output=True, text=True, timeout=60, env={**os.environ})
        assert result.returncode == 0, result.stderr
        reports = json.loads(result.stdout)
        assert [r["domain"] for r in reports] == ["purged.test"]
        assert reports[0]["files_removed"] == 2 and reports[0]["retention_days"] == 7
        assert not old.exists() and not old_new.exists()
        assert fresh.exists() and untouched.exists()
        assert "purge" in result.stderr  # progress is logged
    finally:
        await daemon.stop()


async def test_retention_is_master_only(daemon: Any) -> None:
    partner = await daemon.partner("acme")
    token = await daemon.key(partner["id"])
    await daemon.domain("client.test", token=token)
    status, body = await daemon.api("PUT", "/domains/client.test/retention",
                                    {"retention_days": 3}, token=token)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await daemon.api("GET", "/domains/client.test/retention", token=token)
    assert status == 200 and body["retention_days"] is None
