"""Deadlines for reads that the HTTP client only bounds one at a time.

The client's timeout bounds each wait for bytes, so a server that sends a
little and then stalls can hold a call for up to one more whole timeout past
its deadline. `Watchdog.guard(deadline, sock)` closes that gap: at the
deadline it shuts the socket down, which wakes the blocked read at once (an
end of stream the client reports as a broken connection, and the caller, past
its deadline, as a timeout).

A `CancelScope` ends the calls made within it before their deadline: a
reply stopped from the API (services/progress.py) has its call's socket shut
by `scope.cancel()`, from any thread, and a call started after that is shut
at once. The scope is a context variable, so the assistant backends need not
know about it.

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
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar


class CallCancelled(Exception):
    """Raised in a call to the assistant that its `CancelScope` ended."""


class CancelScope:
    """The calls made while it is `current` can be ended early by `cancel()`:
    their sockets are shut (once the response has begun, when the client hands
    its socket over), and under gevent a call still waiting for the response
    to begin is interrupted at once, the way `gevent.Timeout` interrupts a
    greenlet (`interruptible`)."""

    def __init__(self):
        self.cancelled = False
        self._sockets: list[socket.socket] = []
        self._interrupt = None  # (a hub timer, the greenlet to interrupt) within `interruptible`
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            sockets, self._sockets = self._sockets, []
            if self._interrupt is not None:
                timer, target = self._interrupt
                timer.start(target.throw, CallCancelled())
        for sock in sockets:
            _shut(sock)

    @contextmanager
    def interruptible(self):
        """Under gevent, `cancel()` raises CallCancelled in the greenlet running
        the block wherever it waits; never after it has left the block."""
        monkey = sys.modules.get("gevent.monkey")
        if monkey is None or not monkey.is_module_patched("socket"):
            yield
            return
        from gevent import get_hub, getcurrent

        timer = get_hub().loop.timer(0)
        with self._lock:
            if self.cancelled:
                raise CallCancelled()
            self._interrupt = (timer, getcurrent())
        try:
            yield
        finally:
            with self._lock:
                self._interrupt = None
                timer.stop()
                timer.close()

    @contextmanager
    def watching(self, sock: socket.socket):
        with self._lock:
            if self.cancelled:
                _shut(sock)
            else:
                self._sockets.append(sock)
        try:
            yield
        finally:
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)


current_scope: ContextVar[CancelScope | None] = ContextVar("assistant_cancel_scope", default=None)


@contextmanager
def cancellable(scope: CancelScope):
    """Calls to the assistant made within the block end when `scope` is cancelled."""
    token = current_scope.set(scope)
    try:
        yield scope
    finally:
        current_scope.reset(token)


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
        scope = current_scope.get()
        with scope.watching(sock) if scope is not None else nullcontext(), self._guarded(deadline, sock):
            yield

    @contextmanager
    def _guarded(self, deadline: float, sock: socket.socket):
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
