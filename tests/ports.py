"""Ports for the servers tests start as separate processes (a daemon, Postfix, moto) that
must be told a port before they bind it; in-process servers bind port 0 themselves."""
from __future__ import annotations

import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host, never the same one twice per test process (two
    servers asked for ports before either binds must not get the same one)."""
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")
