"""A private, throwaway Postfix instance for end-to-end policy tests.

`PrivatePostfix` writes its own `main.cf`/`master.cf` into a work directory and runs a
complete Postfix (its own queue, data directory and `maillog_file`) with one smtpd on a
loopback port. Every transport is `discard:` and no SMTP/LMTP/local/virtual/pipe delivery
agent exists in its master.cf, so nothing it accepts can ever leave the machine.

Layout under `workdir` (Postfix insists that everything under the config directory is owned
by root, so config, queue and data live side by side, not nested):

    etc/      main.cf, master.cf, the sqlite: map files (root-owned)
    queue/    queue_directory (root-owned; `postfix check` creates the subdirectories)
    data/     data_directory (created by `postfix check`, owned by `postfix`)
    maillog   maillog_file, written by the postlogd(8) service (Postfix 3.4+)

The Postfix daemons that read the sqlite: maps run as the `postfix` user, so the database
(and, in WAL mode, its -wal/-shm files, which exist only while a writer holds it open) must
be readable by that user through a path it can traverse. pytest's `tmp_path` lives under a
0700 directory, so use `postfix_workdir()` for the work directory and put the database in it.

Outbound vs inbound: clients from `mynetworks` (127.0.0.1) are relayed; `--local-interface
127.0.0.2` makes swaks an outside client. With `sasl_users`, a tiny built-in Dovecot auth
server provides real SMTP AUTH, so the policy service sees `sasl_username`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import pty
import pwd
import re
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.ports import free_port

CONF_POSTFIX = Path(__file__).resolve().parent.parent / "conf" / "postfix"
MAP_FILES = {
    "virtual_mailbox_domains": "virtual_mailbox_domains.cf",
    "virtual_mailbox_maps": "virtual_mailbox_maps.cf",
    "virtual_alias_maps": "virtual_alias_maps.cf",
}
# A restriction-list element replaced by the check_policy_service clause.
POLICY = "{policy}"
# What Postfix does when the policy service fails, as in conf/postfix/main.cf.snippet.
DEFAULT_POLICY_OPTIONS: Mapping[str, str] = {
    "timeout": "10s",
    "default_action": "DEFER_IF_PERMIT 4.3.0 policy service unavailable",
    "try_limit": "2",
}
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
SWAKS_TIMEOUT = 30.0



class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the maillog tail."""


def require_postfix(*, swaks: bool = True) -> None:
    """Skip the calling test unless Postfix (and swaks) are installed and we are root."""
    if shutil.which("postfix") is None:
        pytest.skip("postfix is not installed")
    if swaks and shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")


@contextlib.contextmanager
def postfix_workdir(prefix: str = "policyd-postfix-") -> Iterator[Path]:
    """Yield a fresh directory the `postfix` user can traverse (mode 0755 under /tmp)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def postconf_default(name: str) -> str:
    """Return Postfix's compiled-in default of one parameter (`postconf -d -h NAME`)."""
    done = subprocess.run(["postconf", "-d", "-h", name], check=True, capture_output=True,
                          text=True)
    return done.stdout.strip()


def write_config_file(path: Path, text: str) -> None:
    """Write a Postfix config/map file with an mtime a minute in the past.

    Postfix commands stall for ~1.8 s (6 x 300 ms retries) when a config file they read was
    modified within the last moment, to avoid reading a half-written file; a freshly written
    file would cost every postmap/postfix call that much.
    """
    path.write_text(text)
    settled = time.time() - 60
    os.utime(path, (settled, settled))


def render_map_file(name: str, db_path: Path) -> str:
    """Return conf/postfix/<name> with its `dbpath` pointed at `db_path`."""
    text = (CONF_POSTFIX / name).read_text()
    text, count = re.subn(r"(?m)^dbpath\s*=.*$", f"dbpath = {db_path}", text)
    if count != 1:
        raise ValueError(f"{name}: expected exactly one dbpath line")
    return text


def policy_clause(port: int, options: Mapping[str, str]) -> str:
    """Return `check_policy_service { inet:127.0.0.1:PORT, k=v, ... }` (Postfix 3.0+ syntax).

    Values with whitespace or commas are wrapped as `{ name = value }`, per postconf(5).
    """
    parts = [f"inet:127.0.0.1:{port}"]
    for key, value in options.items():
        if re.search(r"[\s,]", value):
            parts.append(f"{{ {key} = {value} }}")
        else:
            parts.append(f"{key}={value}")
    return "check_policy_service { " + ", ".join(parts) + " }"


# --------------------------------------------------------------------------- swaks results

STAGE_OF_VERB = {"EHLO": "EHLO", "HELO": "EHLO", "MAIL": "MAIL", "RCPT": "RCPT", "DATA": "DATA",
                 "QUIT": "QUIT", "AUTH": "AUTH", "STARTTLS": "STARTTLS", "RSET": "RSET"}
# swaks transaction hints: server lines "<- ", "<~ ", "<**", "<~*"; client " ->", " ~>",
# "**>", "*~>" (swaks(1), "transaction hints").
_REPLY = re.compile(r"^<(?:- |~ |\*\*|~\*) *(\d{3})([ -]?)(.*)$")
_CLIENT = re.compile(r"^(?: -| ~|\*\*|\*~)> ?(.*)$")


@dataclass(frozen=True)
class SwaksResult:
    """One swaks run: exit status, raw transcript, and the SMTP reply of every stage.

    `steps` holds (stage, code, text) in order; stages are CONNECT, EHLO, AUTH, MAIL, RCPT
    (once per recipient), DATA (the 354), DATA_END (the reply after the final '.'), QUIT.
    """

    returncode: int
    transcript: str
    steps: tuple[tuple[str, int, str], ...]

    @property
    def stage_codes(self) -> dict[str, int]:
        """The reply code per stage (the last one when a stage repeats, e.g. RCPT)."""
        return {stage: code for stage, code, _ in self.steps}

    @property
    def rcpt_codes(self) -> list[int]:
        """The reply code of every RCPT TO, in order."""
        return [code for stage, code, _ in self.steps if stage == "RCPT"]

    @property
    def final_code(self) -> int | None:
        """The reply that decided the transaction: the last one before QUIT."""
        decisive = [code for stage, code, _ in self.steps if stage != "QUIT"]
        return decisive[-1] if decisive else None

    @property
    def final_reply(self) -> str:
        """The text of the deciding reply (e.g. '5.7.1 <a@b>: Recipient address rejected')."""
        decisive = [text for stage, _, text in self.steps if stage != "QUIT"]
        return decisive[-1] if decisive else ""

    @property
    def accepted(self) -> bool:
        """True when the message was queued (250 after end of data)."""
        return self.stage_codes.get("DATA_END") == 250

    @property
    def queue_id(self) -> str | None:
        """The queue id from '250 2.0.0 Ok: queued as ID', if the message was queued."""
        for stage, _, text in self.steps:
            found = re.search(r"queued as (\w+)", text)
            if stage == "DATA_END" and found:
                return found.group(1)
        return None


def parse_swaks_transcript(transcript: str) -> tuple[tuple[str, int, str], ...]:
    """Turn swaks' ' -> ' / '<- ' / '<** ' transcript into (stage, code, text) steps."""
    steps: list[tuple[str, int, str]] = []
    stage, in_body, after_334 = "CONNECT", False, False
    for line in transcript.splitlines():
        reply = _REPLY.match(line)
        if reply:
            if reply.group(2) == "-":
                continue  # multi-line reply: only the last line ends it
            code = int(reply.group(1))
            steps.append((stage, code, reply.group(3).strip()))
            in_body = stage == "DATA" and code == 354
            after_334 = code == 334
            continue
        client = _CLIENT.match(line)
        if client is None:
            continue
        sent = client.group(1)
        if in_body:
            if sent.rstrip() == ".":
                stage, in_body = "DATA_END", False
        elif not after_334:
            verb = sent.split(" ", 1)[0].split(":", 1)[0].upper()
            stage = STAGE_OF_VERB.get(verb, verb)
    return tuple(steps)


# --------------------------------------------------------------------------- SASL stand-in

class FakeDovecotAuth:
    """A minimal Dovecot auth server (protocol 1.x) so smtpd can offer real SMTP AUTH.

    Postfix (`smtpd_sasl_type = dovecot`, `smtpd_sasl_path = inet:...`) sends
    `AUTH <id> <mech> ... resp=<b64>`; we answer `OK <id> user=<name>` or `FAIL <id>`.
    Supports PLAIN (with or without an initial response) and LOGIN.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)
        self.port = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on an ephemeral loopback port in a background thread."""
        users = self.users

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    _serve_dovecot_auth(self.rfile, self.wfile, users)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server, self.port = server, int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _serve_dovecot_auth(rfile: IO[bytes], wfile: IO[bytes], users: Mapping[str, str]) -> None:
    wfile.write(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
                b"SPID\t1\nCUID\t1\nCOOKIE\t" + b"0" * 32 + b"\nDONE\n")
    wfile.flush()
    pending: dict[str, list[str]] = {}  # request id -> [mechanism, client responses...]
    for raw in rfile:  # Postfix's own VERSION/CPID lines fall through to `continue`
        fields = raw.decode("utf-8", "replace").rstrip("\n").split("\t")
        if fields[0] == "AUTH" and len(fields) >= 3:
            resp = [f[5:] for f in fields[3:] if f.startswith("resp=")]
            pending[fields[1]] = [fields[2].upper(), *resp]
        elif fields[0] == "CONT" and len(fields) >= 2 and fields[1] in pending:
            pending[fields[1]].append(fields[2] if len(fields) > 2 else "")
        else:
            continue
        wfile.write(_dovecot_step(fields[1], pending, users).encode())
        wfile.flush()


def _dovecot_step(req_id: str, pending: dict[str, list[str]], users: Mapping[str, str]) -> str:
    mech, *answers = pending[req_id]
    needed = {"PLAIN": 1, "LOGIN": 2}.get(mech)
    if needed is None:
        del pending[req_id]
        return f"FAIL\t{req_id}\treason=unsupported mechanism\n"
    if len(answers) < needed:
        prompt = b"" if mech == "PLAIN" else (b"Username:", b"Password:")[len(answers)]
        return f"CONT\t{req_id}\t{base64.b64encode(prompt).decode()}\n"
    del pending[req_id]
    name, secret = _sasl_credentials(mech, answers)
    if name and users.get(name) == secret:
        return f"OK\t{req_id}\tuser={name}\n"
    return f"FAIL\t{req_id}\tuser={name}\treason=authentication failed\n"


def _sasl_credentials(mech: str, answers: list[str]) -> tuple[str, str]:
    try:
        decoded = [base64.b64decode(a, validate=True).decode() for a in answers]
    except ValueError:
        return "", ""
    if mech == "LOGIN":
        return decoded[0], decoded[1]
    parts = decoded[0].split("\0")  # PLAIN: authzid NUL authcid NUL password (RFC 4616)
    return (parts[1], parts[2]) if len(parts) == 3 else ("", "")


# --------------------------------------------------------------------------- the instance

class PrivatePostfix:
    """A private Postfix instance on 127.0.0.1:`smtp_port` whose smtpd asks `policy_port`.

    Use as a context manager (start on enter, stop on exit), or call start()/stop().
    `recipient_restrictions` / `end_of_data_restrictions` default to just the policy check;
    put `POLICY` in a list where the check_policy_service clause should go.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        policy_port: int,
        db_path: Path | None = None,
        smtp_port: int = 0,
        relay_domains: Sequence[str] = (),
        mynetworks: str = "127.0.0.1/32",
        relay_restrictions: Sequence[str] = ("permit_mynetworks", "permit_sasl_authenticated",
                                             "reject_unauth_destination"),
        recipient_restrictions: Sequence[str] = (POLICY,),
        end_of_data_restrictions: Sequence[str] = (POLICY,),
        policy_options: Mapping[str, str] = DEFAULT_POLICY_OPTIONS,
        sasl_users: Mapping[str, str] | None = None,
        extra_main: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.policy_port = policy_port
        self.db_path = db_path
        self.smtp_port = smtp_port or free_port()
        self.relay_domains = tuple(relay_domains)
        self.mynetworks = mynetworks
        self.relay_restrictions = tuple(relay_restrictions)
        self.recipient_restrictions = tuple(recipient_restrictions)
        self.end_of_data_restrictions = tuple(end_of_data_restrictions)
        self.policy_options = dict(policy_options)
        self.extra_main = dict(extra_main or {})
        self.sasl = FakeDovecotAuth(sasl_users) if sasl_users is not None else None
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "queue"
        self.data_dir = self.workdir / "data"
        self.maillog_path = self.workdir / "maillog"

    # ---- lifecycle

    def __enter__(self) -> PrivatePostfix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, `postfix check`, `postfix start`, wait for the banner.

        On any failure everything started so far is stopped again before the error propagates.
        """
        if self.running:
            raise PostfixError(f"already running: {self.config_dir}")
        for path in (self.workdir, *([self.db_path.parent] if self.db_path else [])):
            _require_traversable(path)
        try:
            if self.sasl is not None:
                self.sasl.start()
            self.write_config()
            self._postfix("check")
            self._postfix("start")
            self._wait_for_banner()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Postfix and wait until its master has exited (SIGKILL as a last resort).

        `postfix abort` sends the same SIGTERM as `postfix stop` (master then terminates its
        children), but without `stop`'s fixed one-second sleep; we poll the pid instead.
        """
        pid = self.master_pid()
        if pid is not None:
            subprocess.run(self._cmd("postfix", "abort"), capture_output=True,
                           timeout=STOP_TIMEOUT)
            if not _wait_gone(pid, STOP_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)
        if self.sasl is not None:
            self.sasl.stop()

    def master_pid(self) -> int | None:
        """The pid of this instance's running master(8), or None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        """True while this instance's master process is alive."""
        return self.master_pid() is not None

    # ---- configuration

    def write_config(self) -> None:
        """Write main.cf, master.cf and the sqlite: map files into the work directory."""
        for directory in (self.workdir, self.config_dir, self.queue_dir):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.db_path is not None:
            for name in MAP_FILES.values():
                write_config_file(self.config_dir / name, render_map_file(name, self.db_path))
        write_config_file(self.config_dir / "main.cf", _render_settings(self.main_settings()))
        write_config_file(self.config_dir / "master.cf", self.master_cf())

    def main_settings(self) -> dict[str, str]:
        """All main.cf parameters of this instance, `extra_main` applied last."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            **{name: postconf_default(name) for name in
               ("shlib_directory", "daemon_directory", "command_directory", "meta_directory")},
            **self._network_settings(),
            **self._delivery_settings(),
            **self._restriction_settings(),
            **self._sasl_settings(),
        }
        settings.update(self.extra_main)
        return settings

    def _network_settings(self) -> dict[str, str]:
        return {
            "myhostname": "mx.policyd-test.invalid",
            "mydomain": "policyd-test.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": self.mynetworks,
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",  # no reverse DNS for loopback clients: fast, offline
            "biff": "no",
        }

    def _delivery_settings(self) -> dict[str, str]:
        virtual = {key: "" for key in MAP_FILES}
        if self.db_path is not None:
            virtual = {key: f"proxy:sqlite:{self.config_dir / name}"
                       for key, name in MAP_FILES.items()}
        return {
            # Nothing ever leaves: every transport discards (and master.cf has no deliverers).
            **{f"{kind}_transport": "discard:" for kind in
               ("default", "relay", "local", "virtual")},
            "relay_domains": ", ".join(self.relay_domains),
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            **virtual,
        }

    def _restriction_settings(self) -> dict[str, str]:
        clause = policy_clause(self.policy_port, self.policy_options)

        def render(items: Sequence[str]) -> str:
            return ",\n    ".join(clause if item == POLICY else item for item in items)

        return {
            "smtpd_relay_restrictions": render(self.relay_restrictions),
            "smtpd_recipient_restrictions": render(self.recipient_restrictions),
            "smtpd_end_of_data_restrictions": render(self.end_of_data_restrictions),
        }

    def _sasl_settings(self) -> dict[str, str]:
        if self.sasl is None:
            return {}
        return {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:127.0.0.1:{self.sasl.port}",
            "smtpd_sasl_security_options": "noanonymous",
        }

    def master_cf(self) -> str:
        """master.cf: one smtpd on loopback, the internal services, discard, and postlogd."""
        services = [
            f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n"

    # ---- mail

    def swaks_args(
        self,
        *,
        from_: str,
        to: str | Sequence[str],
        local_interface: str | None = None,
        helo: str = "client.policyd-test.invalid",
        port: int | None = None,
        auth_user: str | None = None,
        auth_password: str | None = None,
        auth_type: str = "PLAIN",
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The swaks command line for one message to this instance (its first smtpd, or
        the one on `port`)."""
        rcpts = [to] if isinstance(to, str) else list(to)
        args = ["swaks", "--server", "127.0.0.1", "--port", str(port or self.smtp_port),
                "--from", from_, "--to", ",".join(rcpts), "--helo", helo,
                "--timeout", str(int(SWAKS_TIMEOUT))]
        if local_interface:
            args += ["--local-interface", local_interface]
        if auth_user is not None:
            args += ["--auth", auth_type, "--auth-user", auth_user,
                     "--auth-password", auth_password or ""]
        if body is not None:
            args += ["--body", body]
        for name, value in (headers or {}).items():
            args += ["--add-header", f"{name}: {value}"]
        return args + list(extra)

    def swaks(self, **kw: Any) -> SwaksResult:
        """Run swaks against this instance (keywords as swaks_args) and parse its transcript.

        Blocking: a policy server on the caller's event loop must use swaks_async instead.
        """
        args = self.swaks_args(**kw)
        done = subprocess.run(args, capture_output=True, text=True, timeout=SWAKS_TIMEOUT + 10)
        return _swaks_result(done.returncode, done.stdout + done.stderr)

    async def swaks_async(self, **kw: Any) -> SwaksResult:
        """Like swaks(), without blocking the event loop."""
        args = self.swaks_args(**kw)
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), SWAKS_TIMEOUT + 10)
        return _swaks_result(proc.returncode or 0, out.decode("utf-8", "replace"))

    # ---- observation

    def maillog(self) -> str:
        """The whole maillog_file so far ('' before postlogd wrote anything)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_maillog(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a maillog line matches the regex `pattern` (postlogd writes async)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.maillog())
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no maillog line matches {pattern!r}:\n{self.maillog()}")
            time.sleep(0.05)

    def queue(self) -> list[dict[str, object]]:
        """Every queued message as `postqueue -j` describes it (works while stopped, too)."""
        done = self._run(self._cmd("postqueue", "-j"))
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def held_queue_ids(self) -> list[str]:
        """Queue ids of the messages in the HOLD queue."""
        return [str(m["queue_id"]) for m in self.queue() if m.get("queue_name") == "hold"]

    def message(self, queue_id: str) -> str:
        """A queued message, envelope and content, as `postcat -q` prints it."""
        return self._run(self._cmd("postcat", "-q", queue_id)).stdout

    def release(self, queue_id: str) -> None:
        """Release a held message (`postsuper -H`) and deliver it now (`postqueue -i`)."""
        self._run(self._cmd("postsuper", "-H", queue_id))
        self._run(self._cmd("postqueue", "-i", queue_id))

    # ---- internals

    def _cmd(self, program: str, *args: str) -> list[str]:
        return [program, "-c", str(self.config_dir), *args]

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        done = _run_with_tty_stderr(args, START_TIMEOUT)
        if done.returncode != 0:
            raise PostfixError(f"{' '.join(args)} exited {done.returncode}:\n"
                               f"{done.stdout}{done.stderr}\n--- maillog ---\n{self.maillog()}")
        return done

    def _postfix(self, command: str) -> None:
        self._run(self._cmd("postfix", command))

    def _wait_for_banner(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if _smtp_banner(self.smtp_port).startswith("220"):
                return
            fatal = re.search(r"(fatal|panic): .*", self.maillog())
            if fatal:
                raise PostfixError(f"postfix failed to start: {fatal.group(0)}")
            time.sleep(0.05)
        raise PostfixError(f"no SMTP banner on port {self.smtp_port}:\n{self.maillog()}")


# --------------------------------------------------------------------------- the mail host

def read_main_cf_snippet() -> dict[str, str]:
    """conf/postfix/main.cf.snippet's parameters, continuation lines joined as Postfix does."""
    settings: dict[str, str] = {}
    text = (CONF_POSTFIX / "main.cf.snippet").read_text()
    for logical in re.sub(r"\n[ \t]+", " ", text).splitlines():
        if logical.strip() and not logical.startswith("#"):
            name, _, value = logical.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def read_master_cf_snippet() -> list[list[str]]:
    """conf/postfix/master.cf.snippet's services: each a service line and its '-o' lines."""
    services: list[list[str]] = []
    for line in (CONF_POSTFIX / "master.cf.snippet").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            services[-1].append(line)
        else:
            services.append([line])
    return services


class MailHostPostfix(PrivatePostfix):
    """A private Postfix wired as a mail host by conf/postfix/ exactly as shipped, but for
    its paths and ports.

    main.cf is the harness's instance settings (own queue, loopback, every transport but
    virtual_transport discards), then every parameter of main.cf.snippet with two
    substitutions, then the host's TLS certificate (which the snippet leaves to the host's
    own main.cf, as Debian's has one):

        /etc/postfix/sqlite/   -> this instance's config directory (the map files)
        inet:127.0.0.1:10040   -> inet:127.0.0.1:<policy_port>

    So virtual_transport is the snippet's lmtp:unix:private/dovecot-lmtp, a socket that a
    private Dovecot (tests/dovecot_harness.py, spool = queue_dir) creates. master.cf is the
    harness's services plus the lmtp and tlsmgr services of Debian's master.cf, and each
    master.cf.snippet service verbatim with its name (submission, submissions) replaced by
    127.0.0.1:<free port> (`service_ports`). The harness's plain smtpd on `smtp_port` is
    port 25.
    """

    def __init__(self, workdir: Path, *, policy_port: int, db_path: Path, tls_key: Path,
                 tls_cert: Path) -> None:
        super().__init__(workdir, policy_port=policy_port, db_path=db_path)
        self.tls_key, self.tls_cert = tls_key, tls_cert
        self.service_ports = {lines[0].split()[0]: free_port()
                              for lines in read_master_cf_snippet()}

    def substitutions(self) -> dict[str, str]:
        """The only changes made to main.cf.snippet values."""
        return {"/etc/postfix/sqlite/": f"{self.config_dir}/",
                "inet:127.0.0.1:10040": f"inet:127.0.0.1:{self.policy_port}"}

    def main_settings(self) -> dict[str, str]:
        settings = super().main_settings()
        for name, value in read_main_cf_snippet().items():
            for old, new in self.substitutions().items():
                value = value.replace(old, new)
            settings[name] = value
        settings.update({
            "smtpd_tls_chain_files": f"{self.tls_key}, {self.tls_cert}",
            "smtpd_tls_security_level": "may",  # port 25; submission -o's encrypt
        })
        return settings

    def master_cf(self) -> str:
        lines = [super().master_cf().rstrip("\n"),
                 "lmtp unix - - n - - lmtp",
                 "tlsmgr unix - - n 1000? 1 tlsmgr"]
        for service in read_master_cf_snippet():
            name, rest = service[0].split(None, 1)
            lines.append(f"127.0.0.1:{self.service_ports[name]} {rest}")
            lines += service[1:]
        return "\n".join(lines) + "\n"

    def _wait_for_banner(self) -> None:
        super()._wait_for_banner()
        for port in self.service_ports.values():
            deadline = time.monotonic() + START_TIMEOUT
            while not _port_open(port):
                if time.monotonic() > deadline:
                    raise PostfixError(f"nothing listens on {port}:\n{self.maillog()}")
                time.sleep(0.05)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _run_with_tty_stderr(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a Postfix command; its stderr is a pty because Postfix only prints errors
    (e.g. "fatal: ... unknown user name value") to a terminal, otherwise only to syslog."""
    master, slave = pty.openpty()
    try:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=slave, text=True,
                              timeout=timeout, start_new_session=True)
    finally:
        os.close(slave)
    os.set_blocking(master, False)  # a daemonized master may still hold the pty: never wait
    chunks: list[bytes] = []
    with contextlib.suppress(OSError):  # EAGAIN when drained, EIO once every writer is gone
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    os.close(master)
    stderr = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return subprocess.CompletedProcess(args, done.returncode, done.stdout, stderr)


def _require_traversable(path: Path) -> None:
    """Fail fast unless the unprivileged `postfix` user can reach `path`: x on the way, for
    others or for the postfix group (Postfix's daemons have no other group)."""
    postfix = pwd.getpwnam("postfix")
    for directory in (path, *path.parents):
        if not directory.exists():
            continue
        info = directory.stat()
        if not (info.st_mode & stat.S_IXOTH or (info.st_mode & stat.S_IXGRP
                                                 and info.st_gid == postfix.pw_gid)):
            raise PostfixError(f"the postfix user cannot traverse {directory} (needed for "
                               f"{path}); use postfix_workdir() instead of tmp_path")


def _render_settings(settings: Mapping[str, str]) -> str:
    lines = ["# Written by tests/postfix_harness.py for a private test instance."]
    lines += [f"{name} = {value}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def _swaks_result(returncode: int, transcript: str) -> SwaksResult:
    return SwaksResult(returncode, transcript, parse_swaks_transcript(transcript))


def _smtp_banner(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            banner = sock.recv(512).decode("ascii", "replace")
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return banner
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
