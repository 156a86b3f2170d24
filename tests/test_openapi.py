"""GET /openapi.json (SPEC §10): an OpenAPI 3.1 document of exactly the route table, with request
and response schemas that real answers of the running app validate against."""
from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
import schemathesis

from api.app import routes
from api.openapi import OPERATIONS, build_document, route_pairs, undeclared, unrouted
from policyd import __version__
from tests.conftest import MASTER, Daemon

PAIRS = route_pairs(routes())
DOC = build_document(PAIRS)
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation of a document."""
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, item[method]) for path, item in doc["paths"].items()
            for method in item if method in METHODS]


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref ('#/components/...') to what it names."""
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def response_validator(method: str, path: str, status: int,
                       media: str = "application/json") -> jsonschema_rs.Validator:
    """A 2020-12 validator (formats asserted) for the body the document declares."""
    operation = DOC["paths"][path][method.lower()]
    assert str(status) in operation["responses"], (method, path, status)
    response = resolve(DOC, operation["responses"][str(status)])
    schema = response["content"][media]["schema"]
    return jsonschema_rs.validator_for({"components": DOC["components"], **schema},
                                       validate_formats=True)


async def answer(daemon: Daemon, method: str, path: str, body: Any = None, *,
                 token: str | None = MASTER) -> tuple[int, Any]:
    """Call the API and check the answer against its operation's declared schema."""
    status, payload = await daemon.api(method, path, body, token=token)
    template = next(t for m, t in PAIRS if m == method and _matches(t, path.split("?")[0]))
    response_validator(method, template, status).validate(payload)
    return status, payload


def _matches(template: str, path: str) -> bool:
    parts, wanted = template.split("/"), path.split("/")
    return len(parts) == len(wanted) and all(
        p == w or (p.startswith("{") and w) for p, w in zip(parts, wanted))


# --- the document and the route table ---------------------------------------------------------

def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    assert undeclared(PAIRS) == []
    assert unrouted(PAIRS) == []
    assert documented(DOC) == set(PAIRS)
    assert len(PAIRS) == len(set(PAIRS)) > 50


def test_a_route_without_a_declaration_is_caught() -> None:
    pairs = [*PAIRS, ("GET", "/domains/{name}/brand-new")]
    assert undeclared(pairs) == [("GET", "/domains/{name}/brand-new")]
    assert ("GET", "/domains/{name}/brand-new") not in documented(build_document(pairs))
    assert unrouted(PAIRS[1:]) == [PAIRS[0]]  # and a declaration whose route is gone


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(DOC).validate()  # the OpenAPI 3.1 meta-schema
    for schema in DOC["components"]["schemas"].values():
        jsonschema_rs.meta.validate(schema)  # each a valid JSON Schema (2020-12)
    ids = [operation["operationId"] for _, _, operation in operations(DOC)]
    assert len(ids) == len(set(ids))


def test_info_servers_and_security_schemes() -> None:
    assert DOC["info"]["version"] == __version__
    assert "servers" not in DOC  # relative to where the document was fetched
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer",
                                 "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert DOC["security"] == [{"bearer": []}, {"apiKey": []}]
    public = {path for method, path, operation in operations(DOC)
              if operation.get("security") == []}
    assert public == {"/health", "/webhooks/ses", "/openapi.json", "/portal", "/portal/",
                      "/portal/{file}"}


def test_every_response_has_a_schema_and_errors_share_one() -> None:
    for method, path, operation in operations(DOC):
        responses = operation["responses"]
        if OPERATIONS[method, path].access != "public":
            assert {"401", "503"} <= set(responses), (method, path)
        for status, response in responses.items():
            where = (method, path, status)
            if status in ("204", "301"):
                assert "content" not in resolve(DOC, response), where
                continue
            assert resolve(DOC, response)["content"], where
            if int(status) >= 400 and path != "/health":
                assert response["$ref"].startswith("#/components/responses/"), where
    for name, response in DOC["components"]["responses"].items():
        schema = response["content"]["application/json"]["schema"]
        assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, name


def test_request_bodies_refuse_unknown_fields() -> None:
    for method, path, operation in operations(DOC):
        if "requestBody" not in operation or path == "/webhooks/ses":
            continue  # SNS adds fields of its own; the handler ignores what it does not know
        schema = resolve(DOC, operation["requestBody"]["content"]["application/json"]["schema"])
        for variant in schema.get("anyOf", [schema]):
            assert variant["additionalProperties"] is False, (method, path)


# --- the served document, and real answers against it -----------------------------------------

async def test_the_document_is_served_without_a_token(daemon: Daemon) -> None:
    status, served = await daemon.api("GET", "/openapi.json", token=None)
    assert status == 200
    assert served == DOC  # the app's router gives the same table (HEAD routes left out)


async def test_answers_match_their_declared_schemas(daemon: Daemon) -> None:
    partner = (await answer(daemon, "POST", "/partners/", {"name": "acme"}))[1]
    status, key = await answer(daemon, "POST", "/api-keys/", {"partner_id": partner["id"]})
    assert status == 201
    client = key["token"]
    status, created = await answer(daemon, "POST", "/domains/", {"name": "Example.COM"},
                                   token=client)
    assert status == 201 and created["name"] == "example.com"
    status, _ = await answer(daemon, "POST", "/users/", {"email": "bob@example.com",
                                                         "password": "correct horse"})
    assert status == 201
    status, listed = await answer(daemon, "GET", "/domains/?limit=1", token=client)
    assert status == 200 and [d["name"] for d in listed["items"]] == ["example.com"]
    for method, path in (("GET", "/domains/example.com/outbound"),
                         ("GET", "/domains/example.com/ses-status"),
                         ("GET", "/api-keys/" + key["id"] + "/usage"), ("GET", "/audit"),
                         ("GET", "/health")):
        assert (await answer(daemon, method, path))[0] == 200, path


@pytest.mark.parametrize(("method", "path", "body", "token", "status"), [
    ("GET", "/domains/nosuch.example", None, MASTER, 404),
    ("POST", "/domains/", {"name": "not a domain"}, MASTER, 400),
    ("POST", "/domains/", {"name": "a.example", "colour": "red"}, MASTER, 400),
    ("GET", "/domains/", None, None, 401),
    ("GET", "/domains/", None, "not-a-token", 401),
    ("POST", "/domains/", {"name": "taken.example"}, MASTER, 409),
])
async def test_errors_match_their_declared_schemas(daemon: Daemon, method: str, path: str,
                                                   body: Any, token: str | None,
                                                   status: int) -> None:
    await daemon.api("POST", "/domains/", {"name": "taken.example"})
    got, payload = await answer(daemon, method, path, body, token=token)
    assert got == status, payload


async def test_every_master_only_operation_is_403_to_a_client(daemon: Daemon) -> None:
    partner = await daemon.partner()
    client = await daemon.key(partner["id"])
    await daemon.domain("example.com", token=client, verified=False)
    values = {"{name}": "example.com", "{id}": str(partner["id"])}
    masters = sorted(pair for pair, o in OPERATIONS.items() if o.access == "master")
    assert len(masters) >= 15
    for method, template in masters:
        path = template
        for placeholder, value in values.items():
            path = path.replace(placeholder, value)
        status, payload = await answer(daemon, method, path, {}, token=client)
        assert status == 403 and payload["error"]["code"] == "forbidden", (method, path)


async def test_a_key_filter_on_partner_zero_is_refused_not_ignored(daemon: Daemon) -> None:
    partner = await daemon.partner()
    await daemon.key(partner["id"])
    status, payload = await answer(daemon, "GET", "/api-keys/?partner_id=0")
    assert status == 400 and payload["error"]["code"] == "invalid", payload
    status, payload = await answer(daemon, "GET", f"/api-keys/?partner_id={partner['id']}")
    assert status == 200 and len(payload["items"]) == 1
