"""The composition root: builds one process (API, policy server, scheduler) on one store."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
from typing import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from policyd.config import Config
from policyd.config import warnings as config_warnings
from policyd.notifier import Notifier
from policyd.policyserver import PolicyServer
from policyd.replication import ReplicationMonitor
from policyd.runtime import Runtime
from policyd.scheduler import Scheduler
from policyd.service import PolicyService
from policyd.ses import SesClient
from policyd.sns import SnsVerifier
from policyd.store import Store

log = logging.getLogger(__name__)


def master_token(config: Config) -> str:
    """The master token: config/env, else master.token beside the database (made once, 0600)."""
    if config.auth.master_token:
        return config.auth.master_token
    path = config.db_path.resolve().parent / "master.token"
    if path.exists():
        # A replica of the database (Litestream, `policyd backup`) does not carry this file:
        # a node restored from it would mint a new token and every client would get 401.
        log.warning("master token read from %s, which only this host has: set [auth] "
                    "master_token or POLICYD_MASTER_TOKEN so that a restored database "
                    "keeps it (see the README's failover runbook)", path)
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    log.warning("no master token configured: generated one in %s (mode 0600)", path)
    return token


def build_runtime(config: Config) -> Runtime:
    """The runtime with its store and clients (not yet started)."""
    store = Store(config.db_path, synchronous=config.database.synchronous,
                  busy_timeout=config.database.busy_timeout,
                  write_on_loop=config.database.write_on_loop)
    rt = Runtime(config=config, store=store)
    if not config.ses.instance_metadata:
        # boto3's last credential source is the EC2 metadata service; off unless asked for, so
        # a host without AWS credentials never probes 169.254.169.254.
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    rt.ses = SesClient(region=config.ses.region, endpoint_url=config.ses.endpoint_url or None)
    rt.sns = SnsVerifier(cert_host_pattern=config.sns.cert_host_pattern,
                         insecure_http_certs=config.sns.insecure_http_certs,
                         allowed_topic_arns=config.sns.allowed_topic_arns)
    return rt


SWITCH_INTERVAL = 0.0002  # seconds; see serve()
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def services(rt: Runtime, *, policy: bool = True, scheduler: bool = True,
             notifier: bool = True) -> CleanupCtx:
    """A cleanup_ctx pairing every start with its stop, in order.

    The notifier runs whether or not the scheduler does: with systemd timers doing the
    periodic jobs, notifications queued by them (or by the API) are still delivered here.
    """
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await rt.store.open()
        http = rt.http = aiohttp.ClientSession()
        rt.notifier = Notifier(rt.store, lambda: http, rt.metrics)
        server = None
        if policy:
            server = rt.policy_server = await start_policy(rt)
        sched = Scheduler(rt) if scheduler and rt.config.scheduler.enabled else None
        if sched:
            sched.start()
        sender = (asyncio.create_task(rt.notifier.run(rt.config.scheduler.notify_interval),
                                      name="notifier") if notifier else None)
        watcher = start_replication_monitor(rt)
        try:
            yield
        finally:
            if server is not None:
                await server.stop()
            if sched:
                await sched.stop()
            for task in (sender, watcher):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await rt.tasks.drain(timeout=5)
            if rt.sns is not None:
                await rt.sns.close()
            if rt.http is not None:
                await rt.http.close()
            await rt.store.close()
            log.info("stopped cleanly")
    return ctx


def start_replication_monitor(rt: Runtime) -> asyncio.Task[None] | None:
    """Watch Litestream's control socket when [replication] control_socket is set."""
    if not rt.config.replication.control_socket:
        return None
    rt.replication = ReplicationMonitor(rt.config.replication, rt.config.db_path,
                                        rt.metrics.registry)
    return asyncio.create_task(rt.replication.run(), name="replication-monitor")


async def start_policy(rt: Runtime) -> PolicyServer:
    """Start the policy server on [policy] listen."""
    cfg = rt.config.policy
    def wake_notifier() -> None:  # a lock's sender_locked notification is in the outbox
        if rt.notifier is not None:
            rt.notifier.wake()

    service = PolicyService(rt.store, cfg, rt.periods, rt.metrics, rt.config.senders,
                            on_locked_reply=wake_notifier)
    server = PolicyServer(service.handle, host=cfg.listen[0], port=cfg.listen[1],
                          idle_timeout=cfg.idle_timeout, max_connections=cfg.max_connections,
                          on_count=rt.metrics.connections.set,
                          on_protocol_error=rt.metrics.protocol_error)
    await server.start()
    return server


async def serve(config: Config) -> None:
    """Run everything until SIGTERM or SIGINT, then shut down gracefully."""
    from api.app import create_app  # the composition root is the one place core meets api

    for warning in config_warnings(config):
        log.warning("%s", warning)
    rt = build_runtime(config)
    app = create_app(rt, master_token(config), services(rt))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    host, port = config.api.listen
    site = web.TCPSite(runner, host, port, backlog=512)
    await site.start()
    log.info("API listening on http://%s:%d (database %s)", host, port, config.db_path)
    # Start-up objects live for the whole process: keep them out of the collector's full
    # passes, which otherwise show up as pauses in policy latency.
    gc.freeze()
    # Worker threads (boto3, the writer) hold the GIL for up to the switch interval before the
    # event loop gets it back, and a policy reply takes the GIL several times (after epoll,
    # around each SQLite call): 0.2 ms instead of the default 5 ms bounds what boto3 adds to
    # the policy tail, and costs nothing while the workers are idle (measured with
    # bench/stress_bench.py; figures in bench/README.md).
    sys.setswitchinterval(SWITCH_INTERVAL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
