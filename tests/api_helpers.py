"""Helpers shared by the API tests: a tenant with a key, the error shape, mailboxes and
their stored hashes, bcrypt at its cheapest."""
from __future__ import annotations

from typing import Any

import bcrypt
import pytest

from policyd import passwords
from tests.conftest import Daemon, password_hash_of

__all__ = ["password_hash_of"]

PASSWORD = "correct-horse-9"


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcrypt at its minimum cost (the real cost is checked in test_hashing_stress.py)."""
    monkeypatch.setattr(passwords, "ROUNDS", 4)


async def tenant(daemon: Daemon, name: str = "acme") -> tuple[int, str, str]:
    """A partner with one client key: (partner id, token, key id)."""
    partner = await daemon.partner(name)
    status, key = await daemon.api("POST", "/api-keys/", {"partner_id": partner["id"]})
    assert status == 201, key
    return partner["id"], key["token"], key["id"]


def assert_error(status: int, body: Any, expected: int, code: str) -> None:
    """A response in the one error shape with this status and code."""
    assert status == expected, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def user(daemon: Daemon, email: str, password: str = PASSWORD,
               **fields: Any) -> dict[str, Any]:
    """Create a mailbox through the API."""
    status, body = await daemon.api("POST", "/users/", {"email": email, "password": password,
                                                         **fields})
    assert status == 201, body
    return body


async def stored_hash(daemon: Daemon, email: str) -> str:
    """The password hash as stored (and as Dovecot reads it)."""
    stored = await daemon.rt.store.read(password_hash_of, email)
    assert stored is not None
    return stored


def verifies(password: str, stored: str) -> bool:
    """bcrypt's own check of a '{BLF-CRYPT}$2b$...' hash."""
    assert stored.startswith("{BLF-CRYPT}$2b$"), stored
    return bcrypt.checkpw(password.encode("utf-8"), stored.removeprefix("{BLF-CRYPT}").encode())
