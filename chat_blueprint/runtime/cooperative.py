"""psycopg's waits under gevent, at the cost of one event watcher each.

Under a gevent worker psycopg sees the monkey-patched `select` and waits with
`wait_poll` through gevent's `select.poll`: per wait, a poll object, a watcher
per registered file descriptor, a timer for its 100 ms interval and a result
list. A chat turn waits a dozen times, and a profile of the gevent runtime
showed those waits, and the hub work they cause, as the largest cost of a turn.
`wait` does the same job with one io watcher on the connection's socket, and
no timer unless psycopg asks for a timeout (then it hands over to psycopg's
own wait). `install()` puts it in place when gevent has patched `select`.
"""
from __future__ import annotations

import psycopg.waiting
from psycopg import errors

_psycopg_wait = psycopg.waiting.wait


def wait(gen, fileno: int, interval: float = 0.0, timeout: float | None = None):
    """Run psycopg's generator `gen` to completion, waiting on `fileno` in the
    gevent hub for what it asks (readable, writable or both)."""
    if timeout is not None:
        return _psycopg_wait(gen, fileno, interval=interval, timeout=timeout)
    from gevent.hub import Waiter, get_hub

    hub = get_hub()
    try:
        state = next(gen)
        while True:
            watcher = hub.loop.io(fileno, state)
            waiter = Waiter(hub)
            watcher.start(waiter.switch, pass_events=True)
            try:
                ready = waiter.get()
            finally:
                watcher.stop()
                watcher.close()
            state = gen.send(ready & state)
    except StopIteration as done:
        return done.value
    except OSError as exc:
        raise errors.OperationalError("connection socket closed") from exc


def install() -> bool:
    """Use `wait` for every psycopg connection of this process when gevent has
    patched `select` (a gevent worker); True when it did."""
    from sys import modules

    monkey = modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return False
    psycopg.waiting.wait = wait
    return True
