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
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        raise Invalid("password must be valid Unicode text") from None
    if not 8 <= len(raw) <= 72:
        raise Invalid("password must be 8 to 72 bytes long (UTF-8)")
    if b"\x00" in raw:  # bcrypt stops at NUL (C strings): the rest would be ignored
        raise Invalid("password must not contain NUL")
    return raw


def _hash(raw: bytes, rounds: int) -> str:
    return SCHEME + bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode("ascii")


async def hash_password(value: object, rounds: int | None = None) -> str:
    """Validate and hash a password in the bcrypt thread; returns '{BLF-CRYPT}$2b$...'."""
    raw = check_password(value)
    cost = ROUNDS if rounds is None else rounds  # read at call time: tests may lower it
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, _hash, raw, cost)
