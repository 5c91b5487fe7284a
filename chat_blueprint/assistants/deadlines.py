"""Deadlines for reads that the HTTP client only bounds one at a time.

The client's timeout bounds each wait for bytes, so a server that sends a
little and then stalls can hold a call for up to one more whole timeout past
its deadline. `Watchdog.guard(deadline, sock)` closes that gap: at the
deadline it shuts the socket down, which wakes the blocked read at once (an
end of stream the client reports as a broken connection, and the caller, past
its deadline, as a timeout).

One watchdog thread per process (a greenlet under gevent, whose patched
`threading` it then uses), started at first use, so after gunicorn's fork.
Deadlines sit in a heap: registering one is a push, and since every call has
the same timeout a new deadline is never the earliest, so it rarely wakes the
thread. The shutdown happens under the lock that `guard` takes on the way out,
so a socket is never shut after its call has left the guard (and its
connection may serve another call).
"""
from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from contextlib import contextmanager


class Watchdog:
    def __init__(self):
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._heap: list[tuple[float, int]] = []
        self._sockets: dict[int, socket.socket] = {}
        self._keys = itertools.count()
        self._pid: int | None = None

    @contextmanager
    def guard(self, deadline: float, sock: socket.socket | None):
        """Within the block, `sock` is shut down once `time.monotonic()` passes `deadline`."""
        if sock is None:
            yield
            return
        key = next(self._keys)
        with self._lock:
            self._start()
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline, key))
            self._sockets[key] = sock
        if earliest is None or deadline < earliest:
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._sockets.pop(key, None)

    def _start(self) -> None:
        if self._pid != os.getpid():  # never started in this process (or inherited through a fork)
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="assistant-deadlines", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, key = heapq.heappop(self._heap)
                    sock = self._sockets.pop(key, None)
                    if sock is not None:
                        _shut(sock)
                wait_s = self._heap[0][0] - now if self._heap else None
                self._wake.clear()
            self._wake.wait(wait_s)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing is waiting on it


WATCHDOG = Watchdog()


def network_socket(response) -> socket.socket | None:
    """The socket an httpx response is read from (httpcore's `network_stream` extension)."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    return stream.get_extra_info("socket") if stream is not None else None
