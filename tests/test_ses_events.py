"""SES notifications read for what they count: permanent bounces and complaints per sending
domain (policyd.feedback.mail_events)."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.feedback import MailEvent, mail_events
from tests.snsfake import bounce_message, complaint_message, make_message

AWS_CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


def envelope(inner: dict[str, Any] | str) -> dict[str, Any]:
    return make_message(message=inner, cert_url=AWS_CERT_URL)


def test_mail_events_permanent_bounce() -> None:
    inner = bounce_message("Sender@Mail.Example.COM", ["a@x.org", "b@y.org", "a@x.org"])
    assert mail_events(envelope(inner)) == [
        MailEvent("bounce", source_domain="mail.example.com", recipients=("a@x.org", "b@y.org"))
    ]


@pytest.mark.parametrize(("source", "domain"), [
    ("s@Example.COM.", "example.com"),  # case and the root's dot
    ("s@bücher.example", "xn--bcher-kva.example"),  # IDNA: as hosted names are stored
    ('"Name" <s@Mail.Example.com>', "mail.example.com"),
    ("s@evil\n.example.com", ""),  # not a name: counted to nobody
    ("s@", ""),
])
def test_mail_events_normalise_the_source_domain(source: str, domain: str) -> None:
    events = mail_events(envelope(bounce_message(source, ["a@x.org"])))
    assert [event.source_domain for event in events] == ([domain] if domain else [])


@pytest.mark.parametrize("bounce_type", ["Transient", "Undetermined"])
def test_mail_events_ignores_soft_bounces(bounce_type: str) -> None:
    assert mail_events(envelope(bounce_message("s@example.com", ["a@x.org"], bounce_type))) == []


def test_mail_events_complaint() -> None:
    inner = complaint_message("news@example.com", ["c@x.org"])
    assert mail_events(envelope(inner)) == [
        MailEvent(kind="complaint", source_domain="example.com", recipients=("c@x.org",))
    ]


def test_mail_events_event_publishing_shape() -> None:
    inner = complaint_message("news@example.com", ["c@x.org"])
    inner["eventType"] = inner.pop("notificationType")
    assert [event.kind for event in mail_events(envelope(inner))] == ["complaint"]


def test_mail_events_ignores_delivery() -> None:
    inner = {
        "notificationType": "Delivery",
        "mail": {"source": "s@example.com", "destination": ["a@x.org"]},
        "delivery": {"recipients": ["a@x.org"], "smtpResponse": "250 ok"},
    }
    assert mail_events(envelope(inner)) == []


def _mangled_bounces() -> list[dict[str, Any]]:
    base = bounce_message("s@example.com", ["a@x.org"])
    cases = []
    for path, value in [
        (("mail",), None),
        (("mail", "source"), "no-at-sign"),
        (("mail", "source"), 42),
        (("bounce",), "x"),
        (("bounce", "bouncedRecipients"), {"emailAddress": "a@x.org"}),
        (("bounce", "bouncedRecipients"), [{"emailAddress": 5}, "a@x.org", {"emailAddress": " "}]),
        (("notificationType",), ["Bounce"]),
    ]:
        case = json.loads(json.dumps(base))
        target = case
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        cases.append(case)
    return cases


@pytest.mark.parametrize(
    "inner", ["not json", "[1]", '"Bounce"', "[" * 100_000, *_mangled_bounces()]
)
def test_mail_events_garbage_is_empty(inner: dict[str, Any] | str) -> None:
    assert mail_events(envelope(inner)) == []


@pytest.mark.parametrize("msg", [{}, {"Message": None}, {"Message": 7}, []])
def test_mail_events_bad_envelope_is_empty(msg: Any) -> None:
    assert mail_events(msg) == []


@given(st.text(max_size=300) | st.builds(json.dumps, _json_values))
def test_mail_events_never_raises(message: str) -> None:
    assert isinstance(mail_events({"Message": message}), list)

