"""Every list pages with ?limit=&offset= until next is null."""
from __future__ import annotations

import pytest

from tests.api_helpers import assert_error, fast_bcrypt, user
from tests.conftest import Daemon

__all__ = ["fast_bcrypt"]  # an autouse fixture: imported to apply here


# --- pagination -----------------------------------------------------------------------------
async def test_lists_paginate_until_next_is_null(daemon: Daemon) -> None:
    names = [f"d{i}.example" for i in range(5)]
    for name in names:
        await daemon.domain(name, verified=False)
    seen: list[str] = []
    offset: int | None = 0
    nexts = []
    while offset is not None:
        status, page = await daemon.api("GET", f"/domains/?limit=2&offset={offset}")
        assert status == 200 and set(page) == {"items", "next"}, page
        seen += [d["name"] for d in page["items"]]
        offset = page["next"]
        nexts.append(offset)
    assert seen == names and nexts == [2, 4, None]
    status, page = await daemon.api("GET", "/domains/?limit=5")
    assert len(page["items"]) == 5 and page["next"] is None
    status, page = await daemon.api("GET", "/domains/?offset=99")
    assert page == {"items": [], "next": None}


async def test_users_and_aliases_paginate_too(daemon: Daemon) -> None:
    await daemon.domain("example.com")
    for i in range(3):
        await user(daemon, f"u{i}@example.com")
        await daemon.api("POST", "/aliases/", {"source": f"a{i}@example.com",
                                               "destinations": [f"u{i}@example.com"]})
    for path, key, last in (("/users/", "email", "u2@example.com"),
                            ("/aliases/", "source", "a2@example.com")):
        status, page = await daemon.api("GET", f"{path}?limit=2")
        assert status == 200 and len(page["items"]) == 2 and page["next"] == 2, page
        status, page = await daemon.api("GET", f"{path}?limit=2&offset=2")
        assert [item[key] for item in page["items"]] == [last] and page["next"] is None


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", "limit=abc", "limit=1001", "limit=1.5", "limit=", "offset=-1",
    "offset=1e3", "offset=" + "9" * 30, "limit=%D9%A1",
])
async def test_bad_pagination_is_400(daemon: Daemon, query: str) -> None:
    for path in ("/domains/", "/users/", "/aliases/"):
        assert_error(*await daemon.api("GET", f"{path}?{query}"), 400, "invalid")
