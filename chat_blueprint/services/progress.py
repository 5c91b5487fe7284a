"""A reply while it is produced: its text stored as it comes, and a stop seen
from any instance (no Flask here).

The producer of a reply only hands its pieces of text to its `ReplyProgress`
(two list operations). The process's `Minder` (one thread, a greenlet under
gevent) does the rest, for all the replies the process holds at once: every
tick it stores the text each reply has not stored yet, once its last store is
almost CHAT_STREAM_FLUSH_S old, in one transaction for all of them (each
UPDATE after the binding of its own user: row-level security holds statement
by statement), and asks, in the same round trip, which of its quiet replies
(no text since the last flush: a blocking turn, or a model that thinks before
it writes) were stopped (`stopped_replies`, across users). A stop
(`conversations.stop`, from any instance) sets the reply `stopped` and notes
its ui_id in reply_stop; either way the minder sees it within
CHAT_STREAM_FLUSH_S and a round trip, and ends the call to the assistant (its
socket is shut, or under gevent its wait interrupted, through the call's
`CancelScope`). So storing progress costs a process one transaction per tick
however many turns it holds, and a turn that ends sooner than
CHAT_STREAM_FLUSH_S nothing at all.

The progress is committed without waiting for its WAL to reach the disk
(`synchronous_commit` off for that transaction alone): a crash of the database
may lose the last second of a reply still being produced, which `finish`
stores whole, durably.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy.engine import Engine

from ..assistants.deadlines import CancelScope
from ..db import tenancy
from ..errors import DATABASE_ERRORS
from .storable import storable_text
from .turn_sql import APPEND_TEXT, STOPPED_REPLIES

log = logging.getLogger(__name__)

MINDER_TICK_S = 0.25
# At most this much text goes into one transaction of the minder (the rest waits
# for the next one): a pipeline that large cannot fill both directions' buffers.
BATCH_CHARS = 64 * 1024

NO_WAL_WAIT = "SELECT set_config('synchronous_commit', 'off', true)"


class Stopped(Exception):
    """The reply was stopped while it was produced (the call to the assistant ended on purpose)."""


class ReplyProgress:
    """One reply being produced by this process: the producer adds to it, the minder stores it."""

    def __init__(self, engine: Engine, pending, flush_s: float):
        self.engine = engine
        self.params = {"user_id": pending.user_id, "conversation_id": pending.conversation_id,
                       "reply_id": pending.reply_id}
        self.ui_id = pending.reply_ui_id
        self.flush_s = flush_s
        self.scope = CancelScope()
        self.pieces: list[str] = []
        self.stored = 0  # how many of `pieces` the database holds (the minder's)
        self.checked_at = time.monotonic()  # the last word from the database

    @property
    def stopped(self) -> bool:
        return self.scope.cancelled

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, delta: str) -> str:
        """Take a piece of the reply, made storable: it is what the stream sends too."""
        delta = storable_text(delta)
        self.pieces.append(delta)
        return delta

    def due(self, now: float, tick_s: float) -> bool:
        """Whether the database should hear about this reply at this tick, so that
        neither its stored text nor a stop seen lags more than a flush period."""
        return now - self.checked_at >= self.flush_s - tick_s


class Minder:
    """One thread per process (a greenlet under gevent) that stores the text of
    the replies it holds and ends the ones stopped."""

    def __init__(self):
        self._replies: dict[int, ReplyProgress] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._tick_s = MINDER_TICK_S

    def watch(self, progress: ReplyProgress) -> None:
        with self._lock:
            self._start()
            self._tick_s = min(self._tick_s, progress.flush_s / 4)
            self._replies[id(progress)] = progress

    def forget(self, progress: ReplyProgress) -> None:
        with self._lock:
            self._replies.pop(id(progress), None)

    def _start(self) -> None:
        if self._pid != os.getpid():  # never started in this process (or inherited through a fork)
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="reply-minder", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self._tick_s)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        with self._lock:
            due = [progress for progress in self._replies.values() if progress.due(now, self._tick_s)]
        by_engine: dict = {}
        for progress in due:
            by_engine.setdefault(progress.engine, []).append(progress)
        for engine, replies in by_engine.items():
            while replies:
                replies = self._store(engine, replies, now)

    def _store(self, engine: Engine, replies: list[ReplyProgress], now: float) -> list[ReplyProgress]:
        """Append what the first of `replies` have not stored, and ask about the
        quiet ones, in one transaction; returns the ones left for another."""
        appends, quiet, chars = [], [], 0
        for index, progress in enumerate(replies):
            count = len(progress.pieces)
            if count == progress.stored:
                quiet.append(progress)
                continue
            more = "".join(progress.pieces[progress.stored:count])
            if appends and chars + len(more) > BATCH_CHARS:
                rest = replies[index:]
                break
            chars += len(more)
            appends.append((progress, count, more))
        else:
            rest = []
        try:
            with tenancy.shared_transaction(engine) as shared:
                cursors = []
                for progress, _count, more in appends:
                    cursor = shared.as_user(progress.params["user_id"]).cursor()
                    cursor.execute(APPEND_TEXT, {**progress.params, "more": more})
                    cursors.append(cursor)
                connection = shared.connection
                connection.execute(NO_WAL_WAIT)
                asked = connection.execute(STOPPED_REPLIES, {"ui_ids": [p.ui_id for p in quiet]}) if quiet else None
            running = [cursor.fetchone() is not None for cursor in cursors]
            stopped = {row[0] for row in asked.fetchall()} if asked is not None else set()
        except DATABASE_ERRORS as exc:
            log.warning("could not store the progress of %d replies (%s); retried at the next tick",
                        len(appends) + len(quiet), type(exc).__name__)
            return rest
        for (progress, count, _more), still in zip(appends, running):
            progress.checked_at = now
            if still:
                progress.stored = count
            else:
                progress.scope.cancel()
        for progress in quiet:
            progress.checked_at = now
            if progress.ui_id in stopped:
                progress.scope.cancel()
        return rest


MINDER = Minder()
