"""A reply while it is produced: its text stored as it comes, and a stop seen
from any instance (no Flask here).

The producer of a streamed reply appends the text it has not stored yet at
most every CHAT_STREAM_FLUSH_S (`ReplyProgress.add`): one small UPDATE by key,
which also says whether the reply is still `streaming`. A stop
(`conversations.stop`, from any instance) sets the reply `stopped` and notes
its ui_id in reply_stop; the next flush finds no `streaming` row, and the
producer ends the call to the assistant (its socket is shut, or under gevent
its wait interrupted, through the call's `CancelScope`). When no text comes (a
blocking turn, or a model that thinks before it writes), the process's
`Minder` asks instead, for all of its quiet replies in one statement
(`stopped_replies`, across users), so a stop ends any call within
CHAT_STREAM_FLUSH_S and a round trip, at one query per interval per process
however many turns it holds. Nothing here costs a turn that ends sooner than
CHAT_STREAM_FLUSH_S anything but two dictionary operations.
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


class Stopped(Exception):
    """The reply was stopped while it was produced (the call to the assistant ended on purpose)."""


class ReplyProgress:
    """One reply being produced by this process."""

    def __init__(self, engine: Engine, pending, flush_s: float):
        self.engine = engine
        self.params = {"user_id": pending.user_id, "conversation_id": pending.conversation_id,
                       "reply_id": pending.reply_id}
        self.ui_id = pending.reply_ui_id
        self.flush_s = flush_s
        self.scope = CancelScope()
        self.pieces: list[str] = []
        self.stored = 0  # how many of `pieces` the database holds
        self.flushed_at = self.checked_at = time.monotonic()  # the last append; the last word from the database

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
        more = "".join(self.pieces[self.stored:])
        count = len(self.pieces)
        self.flushed_at = self.checked_at = time.monotonic()
        running = self._append(more) if more else None
        if running:
            self.stored = count
        if running is False:
            self.scope.cancel()

    def quiet(self, now: float) -> bool:
        """Whether the database has not been asked about this reply for a flush period."""
        return now - self.checked_at >= self.flush_s

    def _append(self, more: str) -> bool | None:
        """Whether the reply is still `streaming` (None: the database did not say)."""
        try:
            with tenancy.transaction(self.engine, self.params["user_id"]) as connection:
                cursor = connection.cursor()
                cursor.execute(APPEND_TEXT, {**self.params, "more": more})
                connection.commit()
                return cursor.fetchone() is not None
        except DATABASE_ERRORS as exc:
            log.warning("could not store a reply's progress (%s); retried at the next flush", type(exc).__name__)
            return None


def stopped_replies(engine: Engine, ui_ids: list[str]) -> set[str]:
    """Which of these replies (by ui_id, of any users) were stopped: one
    statement, through the SECURITY DEFINER function of policies/reply_stop.sql."""
    with engine.connect() as pooled:
        connection = pooled.connection.driver_connection
        try:
            return {row[0] for row in connection.execute(STOPPED_REPLIES, {"ui_ids": ui_ids}).fetchall()}
        finally:
            connection.rollback()


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
            now = time.monotonic()
            with self._lock:
                due = [progress for progress in self._replies.values() if progress.quiet(now)]
            by_engine: dict = {}
            for progress in due:
                by_engine.setdefault(progress.engine, []).append(progress)
            for engine, replies in by_engine.items():
                self._check(engine, replies, now)

    @staticmethod
    def _check(engine: Engine, replies: list[ReplyProgress], now: float) -> None:
        try:
            stopped = stopped_replies(engine, [progress.ui_id for progress in replies])
        except DATABASE_ERRORS as exc:
            log.warning("could not look for stopped replies (%s); retried at the next tick", type(exc).__name__)
            return
        for progress in replies:
            progress.checked_at = now
            if progress.ui_id in stopped:
                progress.scope.cancel()


MINDER = Minder()
