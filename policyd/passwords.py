"""Mailbox passwords: bcrypt, hashed off the event loop, stored in a form Dovecot verifies."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from policyd.errors import Invalid

SCHEME = "{BLF-CRYPT}"  # Dovecot's name for bcrypt (doveadm pw -s BLF-CRYPT)
ROUNDS = 12
# One thread: hashing is deliberately slow, and a burst of it must leave the other core to the
# event loop so policy replies keep flowing.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcrypt")


def check_password(value: object) -> bytes:
    """The password as bytes, or Invalid: a string of 8..72 bytes (bcrypt's limit) in UTF-8."""
    if not isinstance(value, str):
        raise Invalid("password must be a string")
    raw = value.encode("utf-8")
    if not 8 <= len(raw) <= 72:
        raise Invalid("password must be 8 to 72 bytes long (UTF-8)")
    if "\x00" in value:
        raise Invalid("password must not contain NUL")
    return raw


def _hash(raw: bytes, rounds: int) -> str:
    return SCHEME + bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode("ascii")


async def hash_password(value: object, rounds: int = ROUNDS) -> str:
    """Validate and hash a password in the bcrypt thread; returns '{BLF-CRYPT}$2b$...'."""
    raw = check_password(value)
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, _hash, raw, rounds)


def verify_password(value: str, stored: str) -> bool:
    """Check a password against a stored hash (blocking: call in a thread)."""
    if not stored.startswith(SCHEME):
        return False
    return bcrypt.checkpw(value.encode("utf-8"), stored[len(SCHEME):].encode("ascii"))
