"""The OpenAPI 3.1 document (SPEC §10): built from the route table and one declaration per route.

`build_document(pairs)` walks (method, path) pairs, as `api.app.routes()` or the app's router
gives them, and looks each up in OPERATIONS. A route without a declaration is left out of the
document and a declaration without a route is reported by `undeclared`/`unrouted`, so
tests/test_openapi.py fails the day a route and the document disagree. Schemas are JSON Schema
2020-12 (OpenAPI 3.1's dialect): requests refuse unknown fields as the handlers do, responses
list exactly the fields the handlers return.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable

from aiohttp import hdrs, web

from policyd import __version__
from policyd.outbound import ENFORCEMENTS, STATUSES

Schema = dict[str, Any]
Pair = tuple[str, str]  # (method, path template)

MAX_INT = 2**62       # api.common.opt_int's default ceiling (fits SQLite's INTEGER)
MAX_DIGITS = 10**18 - 1  # query and path integers: at most 18 ASCII digits
ERROR_CODES = {400: "invalid", 401: "unauthorized", 404: "not_found", 409: "exists",
               503: "unavailable"}
ERROR_RESPONSES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   409: "Conflict", 503: "Unavailable"}


# --- schema helpers --------------------------------------------------------------------------

def ref(name: str) -> Schema:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Schema], required: Iterable[str] | None = None, **extra: Any) -> Schema:
    """A closed object schema; every property is required unless `required` names fewer."""
    return {"type": "object", "properties": props,
            "required": list(props if required is None else required),
            "additionalProperties": False, **extra}


def null(schema: Schema) -> Schema:
    """The schema, or JSON null (`null` clears a nullable field)."""
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def integer(minimum: int = 0, maximum: int = MAX_INT, **extra: Any) -> Schema:
    """An integer in [minimum, maximum] (never a boolean: the handlers refuse true/false)."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **extra}


def text(max_length: int = 255, **extra: Any) -> Schema:
    """Free text without control characters (C0, DEL, C1): SPEC §8, api.common.opt_str."""
    return {"type": "string", "maxLength": max_length,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$", **extra}


def page(item: str) -> Schema:
    """A list page: `next` is the offset of the next page, null on the last one."""
    return obj({"items": {"type": "array", "items": ref(item)},
                "next": null(integer(1, description="offset of the next page"))})


COUNT = integer(0, description="a count")
TIME = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC"}
DOMAIN = {"type": "string", "minLength": 1, "maxLength": 253, "format": "hostname",
          "description": "normalised: lowercase, A-labels (punycode), no trailing dot"}
ADDRESS = {"type": "string", "minLength": 3, "maxLength": 254, "format": "email"}
DOMAIN_IN = {"type": "string", "minLength": 1, "maxLength": 1024, "format": "idn-hostname",
             "description": "any case, U-labels or A-labels, a trailing dot allowed",
             "examples": ["example.com"]}
ADDRESS_IN = {"type": "string", "minLength": 3, "maxLength": 1024, "format": "idn-email",
              "examples": ["bob@example.com"]}
LIMIT = null(integer(0, description="messages; null = unlimited"))

# --- component schemas -----------------------------------------------------------------------

ERROR_DETAIL = obj({"code": {"type": "string", "enum": [
    "invalid", "unauthorized", "forbidden", "quota_exceeded", "not_found", "exists",
    "method_not_allowed", "unavailable"]}, "message": {"type": "string", "minLength": 1}})
OUTBOUND = {
    "tier": {"type": "string", "description": "a tier name from the config ([tiers])"},
    "daily_limit": LIMIT, "monthly_limit": LIMIT,
    "enforcement": {"type": "string", "enum": list(ENFORCEMENTS)},
    "status": {"type": "string", "enum": list(STATUSES)},
    "sent_today": COUNT, "sent_month": COUNT, "bytes_month": COUNT, "bounces": COUNT,
    "complaints": COUNT,
    "bounce_rate": {"type": "number", "minimum": 0}, "complaint_rate": {"type": "number",
                                                                        "minimum": 0},
    "inherited_from": null(DOMAIN | {"description": "the wildcard parent it inherits from"}),
}
SES_STATUS = {"type": "string", "enum": ["not_started", "pending", "success", "failed",
                                         "temporary_failure", "inherited"]}
SES = {
    "status": SES_STATUS, "dkim_status": null({"type": "string"}),
    "verification_token": null({"type": "string"}),
    "dkim_tokens": {"type": "array", "items": {"type": "string"}},
    "verified": {"type": "boolean", "description": "verified itself or through its parent"},
    "checked_at": null(TIME),
}
TRANSFER = {"monthly_limit_bytes": null(integer(0)), "used_bytes": COUNT}
MAILBOX_FIELDS = {
    "password": {"type": "string", "minLength": 8, "maxLength": 72, "pattern": "^[^\\u0000]*$",
                 "description": "plain text, 8..72 bytes in UTF-8 (bcrypt); never returned"},
    "name": null(text()), "quota_bytes": null(integer(0)), "active": {"type": "boolean"},
}
PARTNER_FIELDS = {
    "name": text(200, minLength=1), "max_domains": null(integer(0, 10**9)),
    "max_mailboxes_per_domain": null(integer(0, 10**9)),
    "max_aliases_per_mailbox": null(integer(0, 10**9)),
    "notify_url": null(text(2000, format="uri",
                            description="http(s) URL notified of events (SPEC §5)")),
}
PARTNER = obj({"id": integer(1), "name": {"type": "string"},
               **{f: null(integer(0)) for f in ("max_domains", "max_mailboxes_per_domain",
                                                "max_aliases_per_mailbox")},
               "notify_url": null({"type": "string"}), "created_at": TIME, "updated_at": TIME})
API_KEY = obj({"id": {"type": "string", "pattern": "^key_"}, "partner_id": integer(1),
               "name": null({"type": "string"}), "expires_at": null(TIME),
               "revoked_at": null(TIME), "created_at": TIME, "last_used_at": null(TIME),
               "request_count": COUNT})
SNS_FIELD = {"type": "string", "minLength": 1}

SCHEMAS: dict[str, Schema] = {
    "ErrorDetail": ERROR_DETAIL,
    "Error": obj({"error": ref("ErrorDetail")}, description="The one error shape of the API."),
    "Health": obj({"status": {"const": "ok"}, "db": {"const": "ok"},
                   "schema_version": COUNT, "expected_schema_version": COUNT,
                   "version": {"type": "string"}, "replication": ref("Replication")},
                  ["status", "db", "schema_version", "expected_schema_version", "version"]),
    "Replication": obj({
        "status": {"enum": ["not_checked", "replicating", "stopped", "unreachable",
                            "not_listed"], "description": "Litestream's state of the database"},
        "ok": {"type": "boolean", "description": "replicating within [replication] max_lag"},
        "last_sync_at": null(TIME), "lag_seconds": null({"type": "number", "minimum": 0}),
        "checked_at": null(TIME)}, description="present when [replication] is set"),
    "HealthUnavailable": obj({"status": {"const": "error"}, "db": {"const": "error"},
                              "error": ref("ErrorDetail")}),
    "Ses": obj(SES),
    "DnsRecord": obj({"type": {"enum": ["TXT", "CNAME"]}, "name": {"type": "string"},
                      "value": {"type": "string"}}),
    "RequiredRecord": obj({
        "type": {"enum": ["TXT", "CNAME", "MX"]}, "name": {"type": "string"},
        "value": {"type": "string"},
        "purpose": {"enum": ["ses", "dkim", "mx", "spf", "dmarc"]},
        "required": {"type": "boolean", "description": "false: suggested (DMARC)"},
        "inherited_from": null(DOMAIN | {"description": "the parent whose records these are"})},
        description="A record the domain needs: SES TXT and DKIM (once SES issued tokens; a "
                    "linked subdomain's are its parent's), MX, SPF, and a suggested DMARC."),
    "Outbound": obj(OUTBOUND),
    "Transfer": obj(TRANSFER),
    "Domain": obj({
        "name": DOMAIN, "partner_id": null(integer(1)),
        "status": {"enum": ["active", "suspended"]},
        "suspended_by": {"enum": ["master", "client", None]},
        "parent": null(DOMAIN), "wildcard": {"type": "boolean"}, "ses": ref("Ses"),
        "dns_records": {"type": "array", "items": ref("DnsRecord")},
        "records": {"type": "array", "items": ref("RequiredRecord")},
        "outbound": ref("Outbound"), "retention_days": null(integer(1)),
        "transfer": ref("Transfer"), "created_at": TIME, "updated_at": TIME}),
    "DomainCreate": obj({"name": DOMAIN_IN | {"examples": ["example.net"]},
                         "partner_id": null(integer(1))}, ["name"],
                        description="The master names the partner; a client's own is implied."),
    "DomainPage": page("Domain"),
    "DomainParent": obj({"parent": null(DOMAIN_IN), "wildcard": {"type": "boolean"}}, [],
                        minProperties=1),
    "DnsCheckEntry": obj({
        "type": {"enum": ["MX", "SPF", "TXT", "CNAME", "DMARC"]},
        "name": null({"type": "string"}),
        "expected": {"anyOf": [{"type": ["string", "null"]},
                               {"type": "array", "items": {"type": "string"}}]},
        "found": {"anyOf": [{"type": "string", "description": "why nothing was found"},
                            {"type": "array", "items": {"type": "string"}}]},
        "ok": {"type": "boolean"}}),
    "DnsCheck": obj({"domain": DOMAIN, "ok": {"type": "boolean"},
                     "inherited_from": null(DOMAIN | {
                         "description": "the parent whose SES records are checked"}),
                     "checks": {"type": "array", "items": ref("DnsCheckEntry")},
                     "advisory": {"type": "array", "items": ref("DnsCheckEntry"),
                                  "description": "checks that never change ok (DMARC)"}}),
    "SesStatus": obj({"domain": DOMAIN, **SES,
                      "dns_records": {"type": "array", "items": ref("DnsRecord")}}),
    "Retention": obj({"domain": DOMAIN, "retention_days": null(integer(1))}),
    "RetentionUpdate": obj({"retention_days": null(integer(1, 36500))}),
    "TransferView": obj({"domain": DOMAIN, **TRANSFER}),
    "TransferUpdate": obj({"monthly_limit_bytes": null(integer(0))}),
    "OutboundView": obj({"domain": DOMAIN, **OUTBOUND}),
    "OutboundUpdate": obj({
        "tier": {"type": "string"}, "daily_limit": LIMIT, "monthly_limit": LIMIT,
        "enforcement": OUTBOUND["enforcement"], "status": OUTBOUND["status"],
        **{f: {"description": "read-only: accepted so a GET can be PUT back, ignored"}
           for f in ("domain", "sent_today", "sent_month", "bytes_month", "bounces",
                     "complaints", "bounce_rate", "complaint_rate", "inherited_from")}}, [],
        description="Partial update. Clients may not change tier, enforcement or status, nor "
                    "raise a limit above their tier's (403); sending the current value is no "
                    "change."),
    "Increment": obj({"count": integer(1, 10**9), "bytes": integer(0, 10**9)}, ["count"]),
    "IncrementResult": obj({"allowed": {"type": "boolean"}, "sent_today": COUNT,
                            "sent_month": COUNT, "reason": {"type": "string"}},
                           ["allowed", "sent_today", "sent_month"]),
    "MonthlyTotals": obj({"period": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"},
                          "sent": COUNT, "bytes": COUNT, "bounces": COUNT,
                          "complaints": COUNT, "frozen_at": TIME}),
    "History": obj({"domain": DOMAIN, "items": {"type": "array", "items": ref("MonthlyTotals")},
                    "next": {"type": "null"}}),
    "Reset": {"anyOf": [
        obj({"current": {"enum": [False, None]}}, [], description="close the ended periods"),
        obj({"domain": DOMAIN_IN, "current": {"const": True}},
            description="zero this domain's running period")]},
    "ResetDaily": obj({"kind": {"const": "daily"}, "day": {"type": "string"},
                       "month": {"type": "string"}, "closed_days": COUNT}),
    "ResetMonthly": obj({"kind": {"const": "monthly"}, "day": {"type": "string"},
                         "month": {"type": "string"}, "frozen_months": COUNT,
                         "pruned_history": COUNT}),
    "ResetCurrent": obj({"domain": DOMAIN, "current": {"const": True},
                         "period": {"type": "string"}, "sent_today": COUNT,
                         "sent_month": COUNT}),
    "Mailbox": obj({"email": ADDRESS, "domain": DOMAIN, "name": null({"type": "string"}),
                    "quota_bytes": null(integer(0)), "used_bytes": null(integer(0)),
                    "active": {"type": "boolean"}, "created_at": TIME, "updated_at": TIME}),
    "MailboxCreate": obj({"email": ADDRESS_IN | {"examples": ["alice@example.com"]},
                          **MAILBOX_FIELDS}, ["email", "password"]),
    "MailboxUpdate": obj({"email": ADDRESS_IN | {"description": "only its own address"},
                          **MAILBOX_FIELDS}, []),
    "MailboxPage": page("Mailbox"),
    "Quota": obj({"email": ADDRESS, "quota_bytes": null(integer(0)),
                  "used_bytes": null(integer(0))}),
    "QuotaUpdate": obj({"quota_bytes": null(integer(0))}),
    "Sender": obj({
        "email": ADDRESS, "hourly_limit": LIMIT, "daily_limit": LIMIT,
        "sent_hour": COUNT, "sent_today": COUNT, "status": {"enum": ["active", "locked"]},
        "locked_reason": {"enum": ["distinct_ips", "manual", None]},
        "locked_at": null(TIME)}, description="Limits are effective: the sender's own, "
                                               "or the [senders] default."),
    "SenderUpdate": obj({
        "hourly_limit": null(integer(0, 10**9)), "daily_limit": null(integer(0, 10**9)),
        "status": {"enum": ["active", "locked"]},
        **{f: {"description": "read-only: accepted so a GET can be PUT back, ignored"}
           for f in ("email", "sent_hour", "sent_today", "locked_reason", "locked_at")}}, [],
        description="Partial update. A limit of null goes back to the [senders] default; a "
                    "client may not set one above a limited default (403). status locked "
                    "locks by hand; active unlocks and forgets the addresses seen (a lock the "
                    "master made only the master lifts)."),
    "SenderUse": obj({"email": ADDRESS, "sent_hour": COUNT, "sent_today": COUNT,
                      "status": {"enum": ["active", "locked"]}}),
    "SenderPage": page("SenderUse"),
    "Alias": obj({"source": {"type": "string", "description": "an address, or @domain"},
                  "domain": DOMAIN, "destinations": {"type": "array", "items": ADDRESS},
                  "catch_all": {"type": "boolean"}, "created_at": TIME}),
    "AliasCreate": obj({
        "source": {"type": "string", "minLength": 2, "maxLength": 1024,
                   "description": "an address, or @domain for a catch-all",
                   "examples": ["sales@example.com"]},
        "destinations": {"type": "array", "minItems": 1, "maxItems": 100,
                         "items": ADDRESS_IN}}),
    "AliasPage": page("Alias"),
    "Partner": PARTNER,
    "PartnerCreate": obj(PARTNER_FIELDS, ["name"]),
    "PartnerUpdate": obj(PARTNER_FIELDS, []),
    "PartnerCreated": PARTNER | {
        "properties": {**PARTNER["properties"], "notify_secret": {
            "type": "string", "description": "HMAC key of notifications, shown this once"}},
        "required": [*PARTNER["required"], "notify_secret"]},
    "PartnerPage": page("Partner"),
    "ApiKey": API_KEY,
    "ApiKeyCreate": obj({"name": null(text(200)), "expires_at": null(TIME),
                         "partner_id": null(integer(1))}, [],
                        description="The master names the partner; a client's own is implied "
                                    "(and its new key cannot outlive the key creating it)."),
    "ApiKeyCreated": API_KEY | {
        "properties": {**API_KEY["properties"], "token": {
            "type": "string", "description": "the secret, shown this once"}},
        "required": [*API_KEY["required"], "token"]},
    "ApiKeyPage": page("ApiKey"),
    "Change": obj({"op": {"enum": ["created", "updated", "deleted"]},
                   "kind": {"enum": ["domain", "mailbox", "alias"]},
                   "key": {"type": "string"}, "at": TIME}),
    "Usage": obj({
        "key": ref("ApiKey"),
        "usage": obj({"domains": obj({"used": COUNT, "max": null(COUNT)}),
                      "mailboxes": obj({"used": COUNT, "max_per_domain": null(COUNT)}),
                      "aliases": obj({"used": COUNT, "max_per_mailbox": null(COUNT)})}),
        "changes": {"type": "array", "items": ref("Change")},
        "cursor": {"type": "string", "description": "pass as ?since= for the next page"},
        "more": {"type": "boolean"}}),
    "AuditEntry": obj({"id": integer(1), "at": TIME, "actor": {"type": "string"},
                       "action": {"type": "string"}, "target": null({"type": "string"}),
                       "before": {"description": "any JSON value"},
                       "after": {"description": "any JSON value"}}),
    "AuditPage": page("AuditEntry"),
    "SnsMessage": {
        "type": "object", "description": "An SNS HTTP(S) message (SignatureVersion 1 or 2).",
        "properties": {
            "Type": {"enum": ["Notification", "SubscriptionConfirmation",
                              "UnsubscribeConfirmation"]},
            "MessageId": SNS_FIELD, "TopicArn": SNS_FIELD, "Message": SNS_FIELD,
            "Timestamp": SNS_FIELD, "SignatureVersion": {"enum": ["1", "2"]},
            "Signature": SNS_FIELD, "SigningCertURL": SNS_FIELD,
            "Subject": {"type": "string"}, "SubscribeURL": SNS_FIELD, "Token": SNS_FIELD},
        "required": ["Type", "MessageId", "TopicArn", "Message", "Timestamp",
                     "SignatureVersion", "Signature", "SigningCertURL"]},
    "WebhookResult": {"oneOf": [
        obj({"status": {"enum": ["ok", "duplicate"]}, "counted": COUNT,
             "blocked": {"type": "array", "items": DOMAIN}}),
        obj({"status": {"enum": ["confirmed", "logged"]}})]},
    "Document": {"type": "object", "description": "this OpenAPI document"},
}

# --- parameters ------------------------------------------------------------------------------

NOT_DOT = {"not": {"enum": [".", ".."]}}  # dot segments never reach a server (RFC 3986 §5.2.4)
PATH_PARAMS: dict[str, tuple[Schema, str]] = {
    "name": ({"type": "string", "minLength": 1, **NOT_DOT, "examples": ["example.com"]},
             "a domain name (normalised as in bodies)"),
    "email": ({"type": "string", "minLength": 1, **NOT_DOT, "examples": ["bob@example.com"]},
              "a mailbox address"),
    "source": ({"type": "string", "minLength": 1, **NOT_DOT,
                "examples": ["info@example.com", "@example.com"]},
               "an alias source: an address, or @domain for a catch-all"),
    "id": (integer(1, MAX_DIGITS, examples=[1]), "a partner id"),
    "token": ({"type": "string", "minLength": 1, **NOT_DOT},
              "an API key's id (key_...), or its token (accepted, never logged)"),
    "file": ({"type": "string", "minLength": 1, **NOT_DOT,
              "examples": ["index.html", "portal.js", "portal.css"]}, "a file of the portal"),
}
QUERY: dict[str, tuple[Schema, str]] = {
    "limit": (integer(1, 1000, default=100), "page size"),
    "offset": (integer(0, MAX_DIGITS, default=0), "rows to skip"),
    "force": ({"type": "boolean", "default": False},
              "also delete what it still holds (mailboxes, domains)"),
    "domain": ({"type": "string", "minLength": 1}, "only this domain's"),
    "partner_id": (integer(1, MAX_DIGITS), "only this partner's"),
    "since": ({"type": "string"}, "an ISO-8601 time, or the cursor of the last page"),
    "cursor": ({"type": "string"}, "the cursor of the last page (as since)"),
    "until": ({"type": "string", "format": "date-time"}, "an ISO-8601 time"),
    "target": ({"type": "string"}, "only entries about this target (empty: all)"),
}
AUDIT_DOMAIN = ("domain", {"type": "string"}, "the same as target")
AUDIT_SINCE = ("since", {"type": "string", "format": "date-time"}, "an ISO-8601 time")
PAGED = ("limit", "offset")

# --- operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """What one route takes and answers; 401 and 503 are added for routes that need a token."""

    summary: str
    tag: str
    ok: Schema | None = None      # the JSON success body (None: no body)
    status: int = 200
    body: str | None = None       # component name of the JSON request body
    body_required: bool = True
    query: tuple[str | tuple[str, Schema, str], ...] = ()  # QUERY names, or (name, schema, text)
    errors: tuple[int, ...] = ()
    access: str = "both"          # both | master | public | metrics
    content: dict[str, Schema] | None = None  # a non-JSON success body, by media type
    headers: dict[str, Any] | None = None
    more: dict[int, Schema] | None = None     # other responses that are not the Error shape


def op(summary: str, tag: str, ok: str | None, **kw: Any) -> Op:
    """An Op whose success body is the component `ok`."""
    return Op(summary, tag, ref(ok) if ok else None, **kw)


def master(summary: str, tag: str, ok: str | None, **kw: Any) -> Op:
    """A master-only Op: a client token gets 403 forbidden."""
    errors = tuple(sorted({403, *kw.pop("errors", ())}))
    return op(summary + " (master)", tag, ok, access="master", errors=errors, **kw)


NAMED = (400, 404)  # a {name}/{email}/{source} that is not a valid name, or not visible
HTML = {"type": "string"}

OPERATIONS: dict[Pair, Op] = {
    # system
    ("GET", "/health"): op("Liveness and database health", "system", "Health",
                           access="public", more={503: {
                               "description": "the database is unusable", "content": {
                                   "application/json": {"schema": ref("HealthUnavailable")}}}}),
    ("GET", "/metrics"): Op(
        "Prometheus metrics (master, or no token from loopback)", "system",
        content={"text/plain": {"type": "string"}}, access="metrics", errors=(403,)),
    ("POST", "/webhooks/ses"): op(
        "SES bounce/complaint notifications through SNS (verified by signature)", "system",
        "WebhookResult", body="SnsMessage", access="public", errors=(400, 403, 503)),
    ("GET", "/portal"): Op("The partner portal (redirects to /portal/)", "portal",
                           status=301, access="public", headers={"Location": {
                               "schema": {"const": "/portal/"}}}),
    ("GET", "/portal/"): Op("The partner portal page", "portal", access="public",
                            content={"text/html": HTML}),
    ("GET", "/portal/{file}"): Op(
        "A file of the portal", "portal", access="public", errors=(404,),
        content={"text/html": HTML, "text/javascript": HTML, "text/css": HTML}),
    ("GET", "/openapi.json"): op("This document", "system", "Document", access="public"),
    # domains
    ("POST", "/domains/"): op("Create a domain", "domains", "Domain", status=201,
                              body="DomainCreate", errors=(400, 403, 409)),
    ("GET", "/domains/"): op("List domains", "domains", "DomainPage", query=PAGED,
                             errors=(400,)),
    ("GET", "/domains/{name}"): op("Show a domain", "domains", "Domain", errors=NAMED),
    ("DELETE", "/domains/{name}"): op(
        "Delete a domain (409 while it has mailboxes, unless ?force=true)", "domains", None,
        status=204, query=("force",), errors=(*NAMED, 409)),
    ("PUT", "/domains/{name}/suspend"): op("Suspend a domain (mail frozen)", "domains",
                                           "Domain", errors=NAMED),
    ("PUT", "/domains/{name}/activate"): op(
        "Lift a suspension (one by the master only by the master)", "domains", "Domain",
        errors=(*NAMED, 403)),
    ("PUT", "/domains/{name}/parent"): master("Link to a wildcard parent", "domains",
                                              "Domain", body="DomainParent", errors=NAMED),
    ("GET", "/domains/{name}/dns-check"): op("Check the published DNS records", "domains",
                                             "DnsCheck", errors=NAMED),
    ("POST", "/domains/{name}/ses-verify"): master(
        "Start SES verification (503 when SES cannot be reached)", "domains", "Domain",
        errors=(*NAMED, 503)),
    ("GET", "/domains/{name}/ses-status"): op("Read (and store) the SES status", "domains",
                                              "SesStatus", errors=NAMED),
    ("GET", "/domains/{name}/retention"): op("Mail retention", "domains", "Retention",
                                             errors=NAMED),
    ("PUT", "/domains/{name}/retention"): master("Set mail retention", "domains",
                                                 "Retention", body="RetentionUpdate",
                                                 errors=NAMED),
    ("GET", "/domains/{name}/transfer"): op("Monthly transfer limit and use", "domains",
                                            "TransferView", errors=NAMED),
    ("PUT", "/domains/{name}/transfer"): master("Set the monthly transfer limit", "domains",
                                                "TransferView", body="TransferUpdate",
                                                errors=NAMED),
    # outbound
    ("GET", "/domains/{name}/outbound"): op("Outbound settings and use", "outbound",
                                            "OutboundView", errors=NAMED),
    ("PUT", "/domains/{name}/outbound"): op("Change outbound settings", "outbound",
                                            "OutboundView", body="OutboundUpdate",
                                            body_required=False, errors=(*NAMED, 403)),
    ("POST", "/domains/{name}/outbound/increment"): master(
        "Count messages if the domain may send them (atomic)", "outbound", "IncrementResult",
        body="Increment", errors=NAMED),
    ("GET", "/domains/{name}/outbound/history"): op("Frozen monthly totals, newest first",
                                                    "outbound", "History", errors=NAMED),
    ("POST", "/outbound/reset-daily"): master(
        "Close ended days, or zero one domain's running day", "outbound", None,
        body="Reset", body_required=False, errors=(400, 404)),
    ("POST", "/outbound/reset-monthly"): master(
        "Freeze ended months into history, or zero one domain's running month", "outbound",
        None, body="Reset", body_required=False, errors=(400, 404)),
    # mailboxes and aliases
    ("POST", "/users/"): op("Create a mailbox", "mailboxes", "Mailbox", status=201,
                            body="MailboxCreate", errors=(400, 403, 404, 409)),
    ("GET", "/users/"): op("List mailboxes", "mailboxes", "MailboxPage",
                           query=(*PAGED, "domain"), errors=(400,)),
    ("GET", "/users/{email}"): op("Show a mailbox", "mailboxes", "Mailbox", errors=NAMED),
    ("PUT", "/users/{email}"): op("Change a mailbox", "mailboxes", "Mailbox",
                                  body="MailboxUpdate", body_required=False, errors=NAMED),
    ("DELETE", "/users/{email}"): op("Delete a mailbox", "mailboxes", None, status=204,
                                     errors=NAMED),
    ("GET", "/users/{email}/quota"): op("Mailbox quota", "mailboxes", "Quota", errors=NAMED),
    ("PUT", "/users/{email}/quota"): op("Set the mailbox quota", "mailboxes", "Quota",
                                        body="QuotaUpdate", errors=NAMED),
    ("GET", "/users/{email}/outbound"): op("A sender's limits, use and lock (SPEC §9)",
                                           "senders", "Sender", errors=NAMED),
    ("PUT", "/users/{email}/outbound"): op(
        "Set a sender's limits, lock or unlock it", "senders", "Sender", body="SenderUpdate",
        body_required=False, errors=(*NAMED, 403)),
    ("GET", "/domains/{name}/senders"): op(
        "The domain's senders that sent today or are locked, most sent first", "senders",
        "SenderPage", query=PAGED, errors=NAMED),
    ("POST", "/aliases/"): op("Create an alias or catch-all", "aliases", "Alias", status=201,
                              body="AliasCreate", errors=(400, 403, 404, 409)),
    ("GET", "/aliases/"): op("List aliases", "aliases", "AliasPage",
                             query=(*PAGED, "domain"), errors=(400,)),
    ("GET", "/aliases/{source}"): op("Show an alias", "aliases", "Alias", errors=NAMED),
    ("DELETE", "/aliases/{source}"): op("Delete an alias", "aliases", None, status=204,
                                        errors=NAMED),
    # partners, keys, audit
    ("POST", "/partners/"): master("Create a partner", "partners", "PartnerCreated",
                                   status=201, body="PartnerCreate", errors=(400,)),
    ("GET", "/partners/"): master("List partners", "partners", "PartnerPage", query=PAGED,
                                  errors=(400,)),
    ("GET", "/partners/{id}"): master("Show a partner", "partners", "Partner", errors=NAMED),
    ("PUT", "/partners/{id}"): master("Change a partner", "partners", "Partner",
                                      body="PartnerUpdate", body_required=False,
                                      errors=NAMED),
    ("DELETE", "/partners/{id}"): master(
        "Delete a partner (409 while it owns domains, unless ?force=true)", "partners", None,
        status=204, query=("force",), errors=(*NAMED, 409)),
    ("POST", "/api-keys/"): op("Create an API key (its token is shown once)", "keys",
                               "ApiKeyCreated", status=201, body="ApiKeyCreate",
                               body_required=False, errors=(400, 403, 404)),
    ("GET", "/api-keys/"): op("List API keys", "keys", "ApiKeyPage",
                              query=(*PAGED, "partner_id"), errors=(400,)),
    ("GET", "/api-keys/{token}"): op("Show an API key", "keys", "ApiKey", errors=(404,)),
    ("DELETE", "/api-keys/{token}"): op("Revoke an API key (idempotent)", "keys", "ApiKey",
                                        errors=(404,)),
    ("GET", "/api-keys/{token}/usage"): op(
        "Use against quotas, and the change feed since a time or cursor", "keys", "Usage",
        query=("since", "cursor", "limit"), errors=(400, 404)),
    ("GET", "/audit/"): master("The audit log, oldest first", "audit", "AuditPage",
                              query=(*PAGED, "target", AUDIT_DOMAIN, AUDIT_SINCE, "until"),
                              errors=(400,)),
}
RESETS = {"daily": "ResetDaily", "monthly": "ResetMonthly"}
for _kind, _name in RESETS.items():
    OPERATIONS["POST", f"/outbound/reset-{_kind}"] = replace(
        OPERATIONS["POST", f"/outbound/reset-{_kind}"],
        ok={"oneOf": [ref(_name), ref("ResetCurrent")]})
# Collections answer with and without the trailing slash: the same operation twice. (Not the
# portal: /portal redirects to /portal/, whose relative links need the slash.)
NO_SLASH = frozenset(path.rstrip("/") for _, path in OPERATIONS
                     if path.endswith("/") and path != "/portal/")
for _method, _path in list(OPERATIONS):
    if _path.rstrip("/") in NO_SLASH:
        OPERATIONS[_method, _path.rstrip("/")] = OPERATIONS[_method, _path]


# --- the document ----------------------------------------------------------------------------

def _error(status: int) -> Schema:
    """A component response: the shared Error schema, with the code(s) this status carries."""
    codes = ["forbidden", "quota_exceeded"] if status == 403 else [ERROR_CODES[status]]
    narrowed = {"properties": {"error": {"properties": {"code": {"enum": codes}}}}}
    return {"description": f"{status}: {' or '.join(codes)}", "content": {
        "application/json": {"schema": {"allOf": [ref("Error"), narrowed]}}}}


def _security(access: str) -> list[dict[str, list[str]]] | None:
    """The operation's security requirement; None inherits the document's (a token)."""
    if access == "public":
        return []
    if access == "metrics":  # no token from loopback only; elsewhere the master token
        return [{}, {"bearer": []}, {"apiKey": []}]
    return None


def _parameters(path: str, o: Op) -> list[Schema]:
    """Path parameters read from the path template, then the declared query parameters."""
    params = []
    for name in re.findall(r"\{(\w+)\}", path):
        schema, description = PATH_PARAMS[name]
        params.append({"name": name, "in": "path", "required": True, "schema": schema,
                       "description": description})
    for entry in o.query:
        name, schema, description = entry if isinstance(entry, tuple) else (entry, *QUERY[entry])
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       "description": description})
    return params


def _success(o: Op) -> Schema:
    """The success response of an operation."""
    response: Schema = {"description": o.summary}
    if o.ok is not None:
        response["content"] = {"application/json": {"schema": o.ok}}
    elif o.content is not None:
        response["content"] = {media: {"schema": s} for media, s in o.content.items()}
    if o.headers:
        response["headers"] = o.headers
    return response


def _responses(o: Op) -> dict[str, Schema]:
    """Success, then every error status the operation can answer."""
    statuses = set(o.errors)
    if o.access != "public":
        statuses |= {401, 503}  # no/bad token; looking a token up needs the database
    responses = {str(o.status): _success(o)}
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERROR_RESPONSES[status]}"}
    for status, response in (o.more or {}).items():
        responses[str(status)] = response
    return dict(sorted(responses.items()))


def _operation_id(method: str, path: str) -> str:
    """get_domains_name_outbound; a collection without its trailing slash gets _noslash."""
    words = re.sub(r"[^a-z0-9]+", "_", path.lower()).strip("_")
    if path in NO_SLASH:
        words += "_noslash"
    elif path.endswith("/") and path.rstrip("/") not in NO_SLASH:
        words += "_index"  # /portal/ (the page) beside /portal (its redirect)
    return f"{method.lower()}_{words}"


def _operation(method: str, path: str, o: Op) -> Schema:
    """One OpenAPI operation object."""
    who = {"master": "Master token only.", "both": "Master token or a client API key.",
           "public": "No token.", "metrics": "Master token, or no token from loopback."}
    operation: Schema = {"operationId": _operation_id(method, path), "summary": o.summary,
                         "description": who[o.access], "tags": [o.tag],
                         "parameters": _parameters(path, o), "responses": _responses(o)}
    if o.body is not None:
        operation["requestBody"] = {"required": o.body_required, "content": {
            "application/json": {"schema": ref(o.body)}}}
    security = _security(o.access)
    if security is not None:
        operation["security"] = security
    return operation


def build_document(pairs: Iterable[Pair]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes given (HEAD, which aiohttp adds, is skipped)."""
    paths: dict[str, dict[str, Schema]] = {}
    for method, path in pairs:
        if method == hdrs.METH_HEAD or (method, path) not in OPERATIONS:
            continue
        paths.setdefault(path, {})[method.lower()] = _operation(method, path,
                                                                OPERATIONS[method, path])
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "policyd management API", "version": __version__,
                 "description": "Errors: {\"error\": {\"code\", \"message\"}}. Lists take "
                                "?limit=&offset= and answer {\"items\", \"next\"}."},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "responses": {name: _error(status) for status, name in ERROR_RESPONSES.items()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "Authorization: Bearer TOKEN (master or client key)"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "the same token in X-API-Key"}},
        },
    }


def route_pairs(defs: Iterable[web.AbstractRouteDef]) -> list[Pair]:
    """(method, path) of each route definition of a route table."""
    return [(d.method, d.path) for d in defs if isinstance(d, web.RouteDef)]


def undeclared(pairs: Iterable[Pair]) -> list[Pair]:
    """Routes the document would lack: no declaration in OPERATIONS."""
    return sorted(p for p in pairs if p[0] != hdrs.METH_HEAD and p not in OPERATIONS)


def unrouted(pairs: Iterable[Pair]) -> list[Pair]:
    """Declarations for routes the table does not have."""
    return sorted(set(OPERATIONS) - set(pairs))


@lru_cache(maxsize=4)
def _rendered(pairs: tuple[Pair, ...]) -> bytes:
    return json.dumps(build_document(pairs), separators=(",", ":")).encode()


async def serve(request: web.Request) -> web.Response:
    """GET /openapi.json (no token): the document of the routes this app serves."""
    pairs = tuple((r.method, r.resource.canonical) for r in request.app.router.routes()
                  if r.resource is not None)
    return web.Response(body=_rendered(pairs), content_type="application/json")


ROUTES = [web.get("/openapi.json", serve)]
