"""Loopback ports for the dev cluster, the dev server and the tests."""
from __future__ import annotations

import os
import socket


class PortError(RuntimeError):
    """A port setting that is not a port, or a port that is taken."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_setting(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise PortError(f"{name} must be a TCP port number, got {raw!r}")
    return int(raw)


def require_free_port(host: str, port: int, variable: str) -> None:
    """Fail in one line when something already listens there (gunicorn and
    PostgreSQL would otherwise retry, then end in a stack of messages)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortError(f"{variable} {port} is taken by another program: choose a free one, e.g. "
                            f"{variable}={port + 1} make run") from None
