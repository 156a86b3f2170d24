"""Schemathesis against the running API (SPEC §10, issue 11): every operation of /openapi.json,
fuzzed with the master token and with a client token; no 5xx, and every answer has a status,
a content type and a body its operation documents.

The app runs for real on a loopback port, in its own thread and event loop (requests from the
test thread must not block the loop serving them), on a SQLite file in tmp_path, with SES on a
moto server, DNS pointed at a closed loopback port and SNS certificates only from a closed one:
nothing leaves the machine. Bounded to about a minute: a fixed seed, derandomized, a few
examples per operation, no example database.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import schemathesis
from aiohttp import web
from moto.server import ThreadedMotoServer
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from api.app import create_app, routes
from api.openapi import OPERATIONS, build_document, route_pairs
from policyd import passwords
from policyd.config import load_config
from policyd.main import build_runtime, services
from tests.conftest import MASTER, write_config

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MIN_SUCCESS = 0.8  # share of the operations a token may use that answered it a 2xx or 3xx
# Per operation and token (the examples and coverage phases add their own cases): about 35 s
# for both tokens here. By hand, POLICYD_FUZZ_EXAMPLES=200 and other POLICYD_FUZZ_SEEDs dig deeper.
MAX_EXAMPLES = int(os.environ.get("POLICYD_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("POLICYD_FUZZ_SEED", "20261204"))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveApi:
    """The real app on 127.0.0.1, served by its own event loop in a thread."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-api")
        self.runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> None:
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        self.url = f"http://127.0.0.1:{port}"

    async def _start(self) -> int:
        rt = build_runtime(self.config)
        app = create_app(rt, MASTER, services(rt, scheduler=False, notifier=False))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(60)
        self.loop.close()


class World:
    """The running API, and a client token of the partner that owns the examples' resources."""

    def __init__(self, url: str) -> None:
        self.url, self.client_token = url, ""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             token: str = MASTER) -> requests.Response:
        return requests.request(method, self.url + path, json=body, timeout=30,
                                headers={"Authorization": f"Bearer {token}"})

    def restore(self) -> None:
        """Make the resources the document's examples name exist again (fuzzing deletes them:
        partner 1 with its keys, example.com with its mailboxes), and the ones its create
        examples name not exist."""
        for path in ("/domains/example.net?force=true", "/users/alice@example.com",
                     "/aliases/sales@example.com"):
            assert self.call("DELETE", path).status_code in (204, 404), path
        if not self.client_token or self.call("GET", "/api-keys/",
                                              token=self.client_token).status_code == 401:
            partner = self._create("/partners/", {"name": "acme"})
            self.client_token = self._create("/api-keys/", {"partner_id": partner["id"],
                                                            "name": "fuzz"})["token"]
        for path, body, token in (
                ("/domains/", {"name": "example.com"}, self.client_token),
                ("/users/", {"email": "bob@example.com", "password": "correct horse"},
                 self.client_token),
                ("/aliases/", {"source": "info@example.com",
                               "destinations": ["bob@example.com"]}, self.client_token),
                ("/aliases/", {"source": "@example.com", "destinations": ["bob@example.com"]},
                 self.client_token),
                ("/domains/", {"name": "master.example"}, MASTER)):  # not the client's
            self._create(path, body, token, exists_ok=True)

    def _create(self, path: str, body: dict[str, Any], token: str = MASTER, *,
                exists_ok: bool = False) -> dict[str, Any]:
        resp = self.call("POST", path, body, token)
        assert resp.status_code == 201 or (exists_ok and resp.status_code == 409), (
            path, resp.status_code, resp.text)
        return resp.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The live API on moto SES; bcrypt at its minimum cost (this is about input)."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    config = write_config(tmp / "policyd.ini", {
        "database": {"path": str(tmp / "policyd.sqlite3")},
        "policy": {"listen": "127.0.0.1:0"}, "api": {"listen": "127.0.0.1:0"},
        "auth": {"master_token": MASTER},
        "ses": {"auto_verify": "false", "endpoint_url": f"http://{host}:{port}"},
        "sns": {"allowed_topic_arns": "arn:aws:sns:us-east-1:123456789012:policyd",
                "cert_host_pattern": f"127.0.0.1:{closed_port()}"},
        "dns": {"nameservers": "127.0.0.1", "port": str(closed_port()), "timeout": "0.2"},
        "scheduler": {"enabled": "false"},
    })
    api = LiveApi(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "ROUNDS", 4)
        api.start()
        try:
            yield World(api.url)
        finally:
            api.stop()
            moto.stop()


@pytest.fixture(autouse=True)
def restored(world: World) -> None:
    """Each operation starts with the resources its examples name."""
    world.restore()


# The document as the route table gives it (the first test proves /openapi.json serves exactly
# this); schemathesis needs it at collection time, before the app runs.
SCHEMA = schemathesis.openapi.from_dict(
    build_document(route_pairs(routes())), config=SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none",
                       "with-security-parameters": False},
        "phases": {"stateful": {"enabled": False}},
    }))
ANSWERS: dict[str, Counter[tuple[str, int]]] = {"master": Counter(), "client": Counter()}


def recorded(who: str) -> list[Any]:
    """CHECKS, and one that records each answer's operation and status (for the last test)."""
    def record(ctx: Any, response: Any, case: Any) -> None:
        ANSWERS[who][case.operation.label, response.status_code] += 1
    return [*CHECKS, record]


def test_the_fuzzed_document_is_the_served_one(world: World) -> None:
    served = requests.get(f"{world.url}/openapi.json", timeout=30)  # no token
    assert served.status_code == 200
    assert served.json() == SCHEMA.raw_schema


@SCHEMA.parametrize()
def test_api_as_master(case: Any, world: World) -> None:
    case.call_and_validate(base_url=world.url, checks=recorded("master"),
                           headers={"Authorization": f"Bearer {MASTER}"})


@SCHEMA.parametrize()
def test_api_as_client(case: Any, world: World) -> None:
    case.call_and_validate(base_url=world.url, checks=recorded("client"),
                           headers={"X-API-Key": world.client_token})


def test_the_fuzzing_reached_the_handlers() -> None:
    """Both tokens stayed valid, and most operations a token may use answered it a success at
    least once: the checks above judged real answers, not a wall of 401s, 403s or 404s."""
    if not all(ANSWERS.values()):
        pytest.skip("runs after the two fuzzing tests")
    for who, counts in ANSWERS.items():
        assert not [key for key in counts if key[1] == 401], who
        usable = {f"{method} {path}" for (method, path), o in OPERATIONS.items()
                  if path != "/webhooks/ses"  # needs an SNS signature: 403 to anything else
                  and not (who == "client" and o.access in ("master", "metrics"))}
        succeeded = {label for label, status in counts if 200 <= status < 400}
        assert len(succeeded & usable) >= MIN_SUCCESS * len(usable), (
            who, sorted(usable - succeeded))
