"""POST /webhooks/ses: SNS HTTP(S) notifications carrying SES bounces and complaints.

No token: an SNS message is genuine when its signature verifies against an SNS certificate
(policyd.sns) and its topic is allowed; policyd.feedback counts what it reports.
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from api.common import runtime_of
from policyd import feedback
from policyd.errors import Forbidden, Invalid, PolicydError, Unavailable
from policyd.runtime import Runtime
from policyd.sns import SnsError, parse_envelope
from policyd.timeutil import utcnow

log = logging.getLogger(__name__)
# SNS retries a delivery only on 5xx (AWS SNS "HTTP/S delivery policy"), so failures that are
# ours or the network's answer 503; messages that are not genuine answer 403 and are dropped.
_RETRYABLE = frozenset({"cert_fetch", "confirm_failed"})


async def ses_webhook(request: web.Request) -> web.Response:
    """POST /webhooks/ses: verify, then confirm a subscription or count the events."""
    body = await request.read()
    return web.json_response(await _handle(runtime_of(request), body))


def _refusal(exc: SnsError) -> PolicydError:
    """The API error for a failed check: 400 malformed, 503 retryable, 403 not genuine."""
    if exc.reason == "bad_envelope":
        return Invalid(f"not an SNS message: {exc.detail or exc.reason}")
    if exc.reason in _RETRYABLE:
        return Unavailable(f"SNS message not processed, retry later: {exc.reason}")
    return Forbidden(f"SNS message refused: {exc.reason}")


async def _verified(rt: Runtime, body: bytes) -> dict[str, Any]:
    """Parse and verify an SNS body; raises the API error (and counts the refusal)."""
    try:
        msg = parse_envelope(body)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        log.warning("SNS message refused: %s", exc)
        raise _refusal(exc) from None
    if rt.sns is None:  # built by policyd.main for every serving process
        raise Unavailable("SNS verification is not set up")
    try:
        await rt.sns.verify(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        log.warning("SNS message %s refused: %s", msg.get("MessageId"), exc)
        raise _refusal(exc) from None
    return msg


async def _handle(rt: Runtime, body: bytes) -> dict[str, object]:
    """Verify and process one SNS HTTP message; raises Invalid, Forbidden or Unavailable."""
    msg = await _verified(rt, body)
    kind = msg["Type"]
    if kind == "SubscriptionConfirmation":
        return await _confirm(rt, msg)
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS unsubscribe confirmation for topic %s", msg.get("TopicArn"))
        rt.metrics.webhooks.labels("unsubscribe").inc()
        return {"status": "logged"}
    day, month = rt.periods.keys(utcnow())
    result = await rt.store.write(feedback.count_events, msg["MessageId"],
                                  feedback.mail_events(msg), day, month,
                                  feedback.Thresholds.of(rt.config.outbound))
    rt.metrics.webhooks.labels("duplicate" if result.duplicate else "counted").inc()
    if result.blocked and rt.notifier is not None:
        rt.notifier.wake()  # delivery runs in the notifier's task, never in this request
    return {"status": "duplicate" if result.duplicate else "ok", "counted": result.counted,
            "blocked": result.blocked}


async def _confirm(rt: Runtime, msg: dict[str, Any]) -> dict[str, object]:
    """Confirm a verified SubscriptionConfirmation by GETting its SubscribeURL."""
    assert rt.sns is not None  # checked by _verified
    try:
        await rt.sns.confirm_subscription(msg)
    except SnsError as exc:
        rt.metrics.webhooks.labels(exc.reason).inc()
        raise _refusal(exc) from None
    log.info("SNS subscription to %s confirmed", msg.get("TopicArn"))
    rt.metrics.webhooks.labels("subscribed").inc()
    return {"status": "confirmed"}


ROUTES = [web.post("/webhooks/ses", ses_webhook)]
