"""The whole mail flow of a policyd mail host, with real parts only.

A private Postfix configured by conf/postfix/ (tests/postfix_harness.py, MailHostPostfix), a
private Dovecot configured by conf/dovecot/ (tests/dovecot_harness.py), both with only their
paths and ports changed, and the real `policyd serve` as a process of its own, on a database
in the work directory, whose SES is moto in server mode (so sending domains really get
verified). Outbound mail authenticates on submission (STARTTLS, SMTP AUTH through Dovecot's
auth socket); inbound mail comes to port 25 from 127.0.0.2, outside mynetworks; delivery is
Postfix's LMTP client on Dovecot's LMTP socket, into Maildirs under the work directory.

One host serves every test in this file; each test uses its own domains or measures deltas.
Failed SMTP logins come from addresses of their own (127.0.0.x): Dovecot delays the next
login from an address that just failed.
"""
from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.dovecot_harness import PrivateDovecot, dovecot_skip_reason
from tests.postfix_harness import (
    MailHostPostfix,
    SwaksResult,
    free_port,
    postfix_workdir,
    require_postfix,
)

pytestmark = [pytest.mark.postfix, pytest.mark.dovecot]
MASTER = "mail-flow-master-token-0123456789"
PASSWORD = "correct horse battery"
OUTSIDE = "127.0.0.2"  # an inbound client: not in mynetworks
START_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 20.0


def _swaks_has_tls() -> bool:
    done = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30)
    return "TLS supported" in done.stdout + done.stderr


def _require_mail_host() -> None:
    require_postfix()
    reason = dovecot_skip_reason(lmtp=True)
    if reason:
        pytest.skip(reason)
    if not _swaks_has_tls():
        pytest.skip("swaks cannot STARTTLS (libnet-ssleay-perl is missing)")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for the submission port's STARTTLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.policyd-test.invalid")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    directory.mkdir(mode=0o700)
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class Policyd:
    """`policyd serve --config FILE` in a process of its own; the API through urllib.

    As under systemd/policyd.service, it runs with group postfix and umask 0027 in a state
    directory that is 0750 and group postfix: Postfix's proxymap reads the database through
    the postfix group alone, as it must on a mail host.
    """

    def __init__(self, workdir: Path, ses_url: str, group: str = "postfix") -> None:
        self.dir = workdir / "state"
        self.dir.mkdir(mode=0o750)
        self.group = group
        os.chown(self.dir, 0, grp.getgrnam(group).gr_gid)
        self.database = self.dir / "policyd.sqlite3"
        self.policy_port, self.api_port = free_port(), free_port()
        self.config = self.dir / "policyd.ini"
        self.config.write_text(
            f"[database]\npath = {self.database}\n"
            f"[policy]\nlisten = 127.0.0.1:{self.policy_port}\n"
            f"[api]\nlisten = 127.0.0.1:{self.api_port}\n"
            f"[auth]\nmaster_token = {MASTER}\n"
            f"[ses]\nendpoint_url = {ses_url}\nauto_verify = true\n"
            "[scheduler]\nenabled = false\n"
            f"[mail]\nmaildir_root = {workdir}/vmail/%d/%n/Maildir\n")
        self.log_path = workdir / "policyd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        env.pop("POLICYD_MASTER_TOKEN", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "policyd", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                group=self.group, extra_groups=[], umask=0o027)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.api("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"policyd serve did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.api(method, path, body)
        assert 200 <= status < 300, (method, path, status, answer)
        return answer

    def sent_today(self, domain: str) -> int:
        return int(self.ok("GET", f"/domains/{domain}/outbound")["sent_today"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class MailHost:
    policyd: Policyd
    postfix: MailHostPostfix
    dovecot: PrivateDovecot
    mail_root: Path

    def submit(self, sender: str, rcpt: str, *, password: str = PASSWORD,
               login: str | None = None, **kw: Any) -> SwaksResult:
        """Send on submission (STARTTLS + AUTH PLAIN), as a mail client does."""
        port = self.postfix.service_ports["submission"]
        return self.postfix.swaks(from_=sender, to=rcpt, port=port, auth_user=login or sender,
                                  auth_password=password, extra=["--tls"], **kw)

    def maildir(self, email: str) -> list[Path]:
        """The messages in a mailbox's Maildir (new/ and cur/), oldest name first."""
        local, _, domain = email.partition("@")
        box = self.mail_root / domain / local / "Maildir"
        return sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                      for p in (box / sub).iterdir())

    def wait_for_delivery(self, queue_id: str, rcpt: str) -> re.Match[str]:
        """Wait for Postfix's log line of the LMTP delivery of queue_id to rcpt."""
        return self.postfix.wait_for_maillog(
            rf"{queue_id}: to=<{re.escape(rcpt)}>, relay=\S*dovecot-lmtp.*status=(\w+).*",
            timeout=DELIVERY_TIMEOUT)

    def diagnostics(self) -> str:
        return (f"--- maillog ---\n{self.postfix.maillog()}\n--- dovecot ---\n"
                f"{self.dovecot.log()}\n--- policyd ---\n{self.policyd.log()}")


@pytest.fixture(scope="module")
def ses_url() -> Iterator[str]:
    _require_mail_host()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def host(ses_url: str) -> Iterator[MailHost]:
    with postfix_workdir("policyd-mailhost-") as workdir:
        vmail = pwd.getpwnam("vmail")
        mail_root = workdir / "vmail"
        mail_root.mkdir(mode=0o750)
        os.chown(mail_root, vmail.pw_uid, vmail.pw_gid)
        policyd = Policyd(workdir, ses_url)
        policyd.start()
        key, cert = _self_signed(workdir / "tls")
        postfix = MailHostPostfix(workdir / "postfix", policy_port=policyd.policy_port,
                                  db_path=policyd.database, tls_key=key, tls_cert=cert)
        (workdir / "dovecot").mkdir()
        dovecot = PrivateDovecot(workdir / "dovecot", policyd.database, spool=postfix.queue_dir,
                                 mail_root=mail_root, protocols="lmtp")
        try:
            postfix.start()  # `postfix check` creates queue/private for Dovecot's sockets
            dovecot.start()
            yield MailHost(policyd, postfix, dovecot, mail_root)
        finally:
            dovecot.stop()
            postfix.stop()
            policyd.stop()


def domain(host: MailHost, name: str, *, sending: bool = False) -> None:
    """Create a domain; a sending one is verified by SES (moto) through the API."""
    created = host.policyd.ok("POST", "/domains/", {"name": name})
    assert created["ses"]["status"] == "pending"
    if sending:
        status = host.policyd.ok("GET", f"/domains/{name}/ses-status")
        assert status["status"] == "success"


def mailbox(host: MailHost, email: str, **fields: Any) -> None:
    host.policyd.ok("POST", "/users/", {"email": email, "password": PASSWORD, **fields})


def message(subject: str, body: str) -> str:
    return (f"Subject: {subject}\nMessage-Id: <{subject}@policyd-test.invalid>\n"
            f"From: someone <someone@example.org>\n\n{body}")


def test_submission_is_authenticated_delivered_over_lmtp_and_counted(host: MailHost) -> None:
    domain(host, "send.test", sending=True)
    domain(host, "receive.test")
    mailbox(host, "bob@send.test")
    mailbox(host, "ann@receive.test")
    before = host.policyd.sent_today("send.test")

    sent = host.submit("bob@send.test", "ann@receive.test",
                       body="hello over LMTP\n")

    assert sent.stage_codes.get("AUTH") == 235 and sent.accepted, sent.transcript
    assert "STARTTLS" in sent.transcript
    delivery = host.wait_for_delivery(str(sent.queue_id), "ann@receive.test")
    assert delivery.group(1) == "sent", host.diagnostics()
    [delivered] = host.maildir("ann@receive.test")
    text = delivered.read_text()
    assert "hello over LMTP" in text and "Delivered-To: ann@receive.test" in text
    assert host.policyd.sent_today("send.test") == before + 1


def test_over_the_daily_limit_the_client_gets_our_defer_and_nothing_is_queued(
        host: MailHost) -> None:
    domain(host, "capped.test", sending=True)
    domain(host, "inbox.test")
    mailbox(host, "cap@capped.test")
    mailbox(host, "in@inbox.test")
    host.policyd.ok("PUT", "/domains/capped.test/outbound", {"daily_limit": 1})
    first = host.submit("cap@capped.test", "in@inbox.test")
    assert first.accepted, first.transcript
    host.wait_for_delivery(str(first.queue_id), "in@inbox.test")

    second = host.submit("cap@capped.test", "in@inbox.test")

    assert second.rcpt_codes == [450], second.transcript
    assert ("4.7.1 <in@inbox.test>: Recipient address rejected: Daily sending limit reached "
            "for capped.test, try again later") in second.final_reply
    assert not second.accepted and second.queue_id is None
    assert [m for m in host.postfix.queue() if m.get("sender") == "cap@capped.test"] == []
    assert len(host.maildir("in@inbox.test")) == 1
    assert host.policyd.sent_today("capped.test") == 1


def test_a_wrong_password_or_an_inactive_mailbox_gets_535(host: MailHost) -> None:
    domain(host, "login.test", sending=True)
    mailbox(host, "sam@login.test")
    mailbox(host, "old@login.test")
    host.policyd.ok("PUT", "/users/old@login.test", {"active": False})

    wrong = host.submit("sam@login.test", "x@example.org", password="not the password",
                        local_interface="127.0.0.3")
    inactive = host.submit("old@login.test", "x@example.org", local_interface="127.0.0.4")

    for refused in (wrong, inactive):
        assert refused.stage_codes.get("AUTH") == 535, refused.transcript
        assert not refused.accepted
    assert host.policyd.sent_today("login.test") == 0
    # The log lines README's troubleshooting table names (Dovecot's auth_verbose).
    log = host.dovecot.log()
    assert re.search(r"sql\(sam@login\.test,127\.0\.0\.3[^)]*\): Password mismatch", log), log
    assert re.search(r"sql\(old@login\.test,127\.0\.0\.4[^)]*\): unknown user", log), log
    assert re.search(r"SASL PLAIN authentication failed: .*sasl_username=sam@login\.test",
                     host.postfix.maillog())


def test_a_recipient_over_quota_is_refused_by_dovecot(host: MailHost) -> None:
    domain(host, "quota-from.test", sending=True)
    domain(host, "quota.test")
    mailbox(host, "ivy@quota-from.test")
    mailbox(host, "full@quota.test")
    host.policyd.ok("PUT", "/users/full@quota.test/quota", {"quota_bytes": 2000})

    sent = host.submit("ivy@quota-from.test", "full@quota.test", body=("x" * 75 + "\n") * 200)

    # Postfix accepts the message (its size is within limits); Dovecot's LMTP refuses it at
    # the end of DATA with the quota plugin's permanent 552, and Postfix returns it to the
    # sender: a bounce in ivy's Maildir names the refusal.
    assert sent.accepted, sent.transcript
    line = host.wait_for_delivery(str(sent.queue_id), "full@quota.test")
    assert line.group(1) == "bounced", host.diagnostics()
    assert "said: 552 5.2.2 <full@quota.test> Quota exceeded" in line.group(0)
    assert host.maildir("full@quota.test") == []
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not host.maildir("ivy@quota-from.test"):
        assert time.monotonic() < deadline, host.diagnostics()
        time.sleep(0.05)
    [bounce] = host.maildir("ivy@quota-from.test")
    text = bounce.read_text()
    assert "Undelivered Mail Returned to Sender" in text and "Quota exceeded" in text


def test_suspended_domain_mail_is_held_then_delivered_whole_and_its_logins_refused(
        host: MailHost) -> None:
    domain(host, "frozen.test", sending=True)
    mailbox(host, "dan@frozen.test")
    host.policyd.ok("PUT", "/domains/frozen.test/suspend")
    body = "".join(f"line {n} of a message that must arrive whole\n" for n in range(40))
    data = message("held-1", body.removesuffix("\n"))  # swaks ends the last line itself

    held = host.postfix.swaks(from_="someone@example.org", to="dan@frozen.test",
                              local_interface=OUTSIDE, extra=["--data", data])

    assert held.accepted, held.transcript
    assert held.queue_id in host.postfix.held_queue_ids()
    host.postfix.wait_for_maillog(r"NOQUEUE: hold: RCPT from .*: <dan@frozen\.test>: "
                                  r"Recipient address Domain frozen\.test is suspended")
    assert host.maildir("dan@frozen.test") == []
    login = host.submit("dan@frozen.test", "x@example.org", local_interface="127.0.0.5")
    assert login.stage_codes.get("AUTH") == 535, login.transcript
    assert host.dovecot.auth("dan@frozen.test", PASSWORD).returncode != 0
    assert re.search(r"sql\(dan@frozen\.test,127\.0\.0\.5[^)]*\): unknown user",
                     host.dovecot.log())

    host.policyd.ok("PUT", "/domains/frozen.test/activate")
    host.postfix.release(str(held.queue_id))

    delivery = host.wait_for_delivery(str(held.queue_id), "dan@frozen.test")
    assert delivery.group(1) == "sent", host.diagnostics()
    [delivered] = host.maildir("dan@frozen.test")
    headers, _, delivered_body = delivered.read_text().partition("\n\n")
    assert delivered_body == body
    assert "Message-Id: <held-1@policyd-test.invalid>" in headers
    assert host.postfix.held_queue_ids() == []
    assert host.dovecot.auth("dan@frozen.test", PASSWORD).returncode == 0
    sent = host.submit("dan@frozen.test", "dan@frozen.test", local_interface="127.0.0.6")
    assert sent.stage_codes.get("AUTH") == 235 and sent.accepted, sent.transcript
