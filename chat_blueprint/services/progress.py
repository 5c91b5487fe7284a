"""A reply while it is produced: its text stored as it comes, and a stop seen
from any instance (no Flask here).

The producer of a streamed reply appends the text it has not stored yet at
most every CHAT_STREAM_FLUSH_S (`ReplyProgress.add`): one small UPDATE by key,
which also says whether the reply is still `streaming`. A stop
(`conversations.stop`, from any instance) sets the reply `stopped`; the next
flush finds no `streaming` row, and the producer ends the call to the
assistant (its socket is shut through the call's `CancelScope`). When no text
comes (a blocking turn, or a model that thinks before it writes), the process's
`Minder` asks the database instead, at the same pace, so a stop ends any call
within CHAT_STREAM_FLUSH_S and a round trip. Nothing here costs a turn that
ends sooner than CHAT_STREAM_FLUSH_S anything but two dictionary operations.
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
from .turn_sql import APPEND_TEXT, STILL_STREAMING

log = logging.getLogger(__name__)

MINDER_TICK_S = 0.1


class Stopped(Exception):
    """The reply was stopped while it was produced (the call to the assistant ended on purpose)."""


class ReplyProgress:
    """One reply being produced by this process."""

    def __init__(self, engine: Engine, pending, flush_s: float):
        self.engine = engine
        self.params = {"user_id": pending.user_id, "conversation_id": pending.conversation_id,
                       "reply_id": pending.reply_id}
        self.flush_s = flush_s
        self.scope = CancelScope()
        self.pieces: list[str] = []
        self.stored = 0  # how many of `pieces` the database holds
        self.flushed_at = self.checked_at = time.monotonic()  # the last append; the last word from the database
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self.scope.cancelled

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, delta: str) -> str:
        """Take a piece of the reply (made storable: it is what the stream sends
        too); store what is pending when a flush is due."""
        delta = storable_text(delta)
        self.pieces.append(delta)
        if time.monotonic() - self.flushed_at >= self.flush_s:
            self.flush()
        return delta

    def flush(self) -> None:
        """Append the text not stored yet; a reply no longer `streaming` was stopped."""
        with self._lock:
            more = "".join(self.pieces[self.stored:])
            count = len(self.pieces)
            self.flushed_at = self.checked_at = time.monotonic()
            running = self._run(APPEND_TEXT if more else STILL_STREAMING, {**self.params, "more": more})
            if running:
                self.stored = count
        if running is False:
            self.scope.cancel()

    def check(self) -> None:
        """What the minder does when the producer has been quiet for a flush period."""
        if time.monotonic() - self.checked_at >= self.flush_s and self._lock.acquire(blocking=False):
            try:
                self.checked_at = time.monotonic()
                running = self._run(STILL_STREAMING, self.params)
            finally:
                self._lock.release()
            if running is False:
                self.scope.cancel()

    def _run(self, statement: str, params: dict) -> bool | None:
        """Whether the reply is still `streaming` (None: the database did not say)."""
        try:
            with tenancy.transaction(self.engine, self.params["user_id"]) as connection:
                cursor = connection.cursor()
                cursor.execute(statement, params)
                connection.commit()
                return cursor.fetchone() is not None
        except DATABASE_ERRORS as exc:
            log.warning("could not store a reply's progress (%s); retried at the next flush", type(exc).__name__)
            return None


class Minder:
    """One thread per process (a greenlet under gevent) that checks the replies
    whose producer has been quiet for a flush period."""

    def __init__(self):
        self._replies: dict[int, ReplyProgress] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None

    def watch(self, progress: ReplyProgress) -> None:
        with self._lock:
            self._start()
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
            time.sleep(MINDER_TICK_S)
            with self._lock:
                replies = list(self._replies.values())
            for progress in replies:
                progress.check()


MINDER = Minder()
