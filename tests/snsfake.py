"""Test double for Amazon SNS: a signing identity, signed envelopes, SES bodies, a cert server.

Envelopes are signed with the real string-to-sign, so they pass `policyd.sns.SnsVerifier`
when it fetches `CERT_PEM` from a `CertServer` (pattern "127.0.0.1:*", insecure_http_certs).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from policyd.sns import string_to_sign

TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}


@dataclass(frozen=True)
class SigningIdentity:
    """An RSA key and its self-signed certificate (PEM)."""

    key: rsa.RSAPrivateKey
    cert_pem: bytes


def new_identity(common_name: str = "sns.amazonaws.com") -> SigningIdentity:
    """Generate an RSA key and a self-signed X.509 certificate for it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return SigningIdentity(key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM))


IDENTITY = new_identity()
CERT_PEM = IDENTITY.cert_pem


def sign(msg: dict[str, Any], identity: SigningIdentity | None = None) -> dict[str, Any]:
    """Set msg["Signature"] from its current fields and SignatureVersion; return msg."""
    identity = identity or IDENTITY
    algorithm = _HASHES[msg["SignatureVersion"]]()
    signature = identity.key.sign(string_to_sign(msg), padding.PKCS1v15(), algorithm)
    msg["Signature"] = base64.b64encode(signature).decode("ascii")
    return msg


def make_message(
    type_: str = "Notification",
    *,
    topic_arn: str = TOPIC_ARN,
    message: str | dict[str, Any],
    cert_url: str,
    version: str = "1",
    message_id: str | None = None,
    subject: str | None = None,
    subscribe_url: str | None = None,
    identity: SigningIdentity | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Build a correctly signed SNS envelope of the given Type."""
    msg: dict[str, Any] = {
        "Type": type_,
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": topic_arn,
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": _timestamp() if timestamp is None else timestamp,
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    if subject is not None:
        msg["Subject"] = subject
    if type_ == "Notification":
        msg["UnsubscribeURL"] = (
            "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"
            f"&SubscriptionArn={topic_arn}:{uuid.uuid4()}"
        )
    else:
        token = uuid.uuid4().hex * 2
        msg["Token"] = token
        msg["SubscribeURL"] = subscribe_url or (
            "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
            f"&TopicArn={topic_arn}&Token={token}"
        )
    return sign(msg, identity)


def encode(msg: dict[str, Any]) -> bytes:
    """Serialize an envelope as SNS posts it."""
    return json.dumps(msg).encode("utf-8")


def _timestamp() -> str:
    """Current time in SNS's ISO 8601 format with milliseconds."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _mail(source: str, recipients: list[str]) -> dict[str, Any]:
    """The "mail" object SES attaches to every notification."""
    return {
        "timestamp": _timestamp(),
        "source": source,
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/" + source.rpartition("@")[2],
        "sourceIp": "192.0.2.10",
        "sendingAccountId": "123456789012",
        "messageId": str(uuid.uuid4()),
        "destination": list(recipients),
    }


def bounce_message(
    source: str, recipients: list[str], bounce_type: str = "Permanent"
) -> dict[str, Any]:
    """An SES Bounce notification body (the inner Message, as a dict)."""
    status = "5.1.1" if bounce_type == "Permanent" else "4.4.7"
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": address,
                    "action": "failed",
                    "status": status,
                    "diagnosticCode": f"smtp; 550 {status} <{address}>: Recipient address rejected",
                }
                for address in recipients
            ],
            "timestamp": _timestamp(),
            "feedbackId": str(uuid.uuid4()),
            "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com",
        },
        "mail": _mail(source, recipients),
    }


def complaint_message(source: str, recipients: list[str]) -> dict[str, Any]:
    """An SES Complaint notification body (the inner Message, as a dict)."""
    return {
        "notificationType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": address} for address in recipients],
            "timestamp": _timestamp(),
            "feedbackId": str(uuid.uuid4()),
            "userAgent": "ExampleCorp Feedback Loop (V0.01)",
            "complaintFeedbackType": "abuse",
        },
        "mail": _mail(source, recipients),
    }


class CertServer:
    """A loopback HTTP server standing in for the SNS certificate and confirmation endpoints.

    GET /cert.pem serves `cert_pem` (counted in `cert_hits`); GET /big.pem streams 100 KiB;
    GET /redirect.pem redirects to /cert.pem; GET /confirm records its query in
    `confirm_hits` and answers `confirm_status`.
    """

    def __init__(self, cert_pem: bytes = CERT_PEM) -> None:
        self.cert_pem = cert_pem
        self.cert_hits = 0
        self.confirm_hits: list[dict[str, str]] = []
        self.confirm_status = 200
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1, port 0; sets base_url."""
        app = web.Application()
        app.router.add_get("/cert.pem", self._cert)
        app.router.add_get("/big.pem", self._big)
        app.router.add_get("/redirect.pem", self._redirect)
        app.router.add_get("/confirm", self._confirm)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop listening and release the port."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _cert(self, request: web.Request) -> web.Response:
        self.cert_hits += 1
        return web.Response(body=self.cert_pem, content_type="application/x-pem-file")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        # Chunked, without Content-Length, so the client must cap while reading.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"A" * 1024)
        await response.write_eof()
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/cert.pem")

    async def _confirm(self, request: web.Request) -> web.Response:
        self.confirm_hits.append(dict(request.query))
        return web.Response(status=self.confirm_status, text="<ConfirmSubscriptionResponse/>")
