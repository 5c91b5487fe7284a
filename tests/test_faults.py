"""The chat endpoint under faults, with a steady, bounded load running:

- PostgreSQL stops (immediate shutdown, as in a crash) for 5 s and comes back,
  both with gunicorn connecting directly and through the whole scaled-out
  deployment (nginx → gunicorn × 2 → PgBouncer): answers are 503 with
  Retry-After, quickly, never 500, never a hang; turns succeed again within
  2 s of the restart without restarting the app.
- a gunicorn worker is killed with SIGKILL mid-turn: the master replaces it.
- gunicorn gets SIGTERM with turns in flight: they finish and are stored.

After each, the database is audited: every acknowledged turn (a 200) has its
question and its answer stored exactly once, no answer lacks its question, and
no question is answered twice. The outage tests print their figures.

The outage tests stop a cluster of their own, so the session's is untouched.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
import pytest
import requests
from support import User, gunicorn, make_user, throwaway_cluster, wait_until_serving
from fake_llm import FakeChatCompletions
from stack import scaled_out

from devtools.cluster import APP_ROLE, SUPERUSER, Cluster
from devtools.server import child_pids

CLIENTS = 4
PAUSE_S = 0.05
REQUEST_TIMEOUT_S = 10.0
MAX_REQUESTS_PER_CLIENT = 400
OUTAGE_S = 5.0
RECOVERY_BOUND_S = 2.0
ANSWER_BOUND_S = 7.0
GRACEFUL_TIMEOUT_S = 10  # GUNICORN_GRACEFUL_TIMEOUT in conftest's gunicorn()


@dataclass
class Outcome:
    client: int
    message: str
    started: float
    finished: float
    status: int | None = None
    body: dict | None = None
    retry_after: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass
class Client:
    user: User
    conversation_id: str
    opening_message_id: int


class SteadyLoad:
    """One thread per client, each posting turns to its own conversation one
    after another with a short pause, until stopped (or `max_requests` each).
    Each request opens its own connection (no keep-alive, so a killed worker
    fails only the requests it had in flight) and has a client-side timeout;
    a timeout or a dropped connection is recorded as an `error`, never retried."""

    def __init__(self, url: str, clients: list[Client], label: str, *, pause_s: float = PAUSE_S,
                 max_requests: int = MAX_REQUESTS_PER_CLIENT, read_timeout_s: float = REQUEST_TIMEOUT_S):
        self.url = url
        self.read_timeout_s = read_timeout_s
        self.clients = clients
        self.label = label
        self.pause_s = pause_s
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(len(clients))]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.read_timeout_s + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a load thread did not stop"

    def _run(self, index: int) -> None:
        client = self.clients[index]
        for n in range(self.max_requests):
            if self._stop.is_set():
                return
            message = f"{self.label} client {index} turn {n}"
            outcome = Outcome(index, message, time.monotonic(), 0.0)
            try:
                response = requests.post(f"{self.url}/api/{client.user.id}/chat",
                                         json={"message": message, "conversation_id": client.conversation_id},
                                         headers=client.user.headers, timeout=(2, self.read_timeout_s))
                outcome.status = response.status_code
                outcome.retry_after = response.headers.get("Retry-After")
                try:
                    outcome.body = response.json()
                except ValueError:
                    outcome.body = {"raw": response.text[:200]}
            except requests.RequestException as exc:
                outcome.error = type(exc).__name__
            outcome.finished = time.monotonic()
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(self.pause_s)

    def between(self, start: float, end: float) -> list[Outcome]:
        """Outcomes of requests sent and answered within [start, end]."""
        return [o for o in self.outcomes if start <= o.started and o.finished <= end]


def open_conversations(url: str, count: int, label: str) -> list[Client]:
    clients = []
    for n in range(count):
        user = make_user(label)
        response = requests.post(f"{url}/api/{user.id}/chat", json={"message": f"{label} opens {n}"},
                                 headers=user.headers, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        answer = response.json()
        clients.append(Client(user, answer["conversation_id"], answer["user_message_id"]))
    return clients


@dataclass
class Audit:
    """What the database holds for some users, read as a role that bypasses RLS."""

    questions: dict[int, tuple] = field(default_factory=dict)  # id -> (conversation_id, content)
    answers: dict[int, tuple] = field(default_factory=dict)  # id -> (conversation_id, content, reply_to)
    counter_mismatches: list = field(default_factory=list)

    @property
    def answered(self) -> set[int]:
        return {reply_to for _, _, reply_to in self.answers.values()}

    @property
    def unanswered(self) -> set[int]:
        return set(self.questions) - self.answered


def audit(superuser_url: str, user_ids: list[str]) -> Audit:
    result = Audit()
    with psycopg.connect(superuser_url) as conn:
        rows = conn.execute("select id, conversation_id, role, content, reply_to from message"
                            " where user_id = any(%s) order by id", (user_ids,)).fetchall()
        for message_id, conversation_id, role, content, reply_to in rows:
            if role == "user":
                result.questions[message_id] = (conversation_id, content)
            else:
                result.answers[message_id] = (conversation_id, content, reply_to)
        result.counter_mismatches = conn.execute(
            "select c.id, c.message_count, c.turn_count, count(m.id), count(m.id) filter (where m.role = 'user')"
            " from conversation c left join message m on m.user_id = c.user_id and m.conversation_id = c.id"
            " where c.user_id = any(%s) group by c.user_id, c.id"
            " having c.message_count <> count(m.id) or c.turn_count <> count(m.id) filter (where m.role = 'user')",
            (user_ids,)).fetchall()
    return result


def assert_acknowledged_turns_stored_once(outcomes: list[Outcome], stored: Audit) -> None:
    """Every 200 has its question and answer stored, each exactly once; no answer
    lacks its question; no question is answered twice; counters match rows."""
    sent = Counter(content for _, content in stored.questions.values())
    assert max(sent.values(), default=0) <= 1, [content for content, n in sent.items() if n > 1]
    replies = Counter(reply_to for _, _, reply_to in stored.answers.values())
    assert max(replies.values(), default=0) <= 1, "a question was answered twice"
    for conversation_id, _, reply_to in stored.answers.values():
        assert reply_to in stored.questions and stored.questions[reply_to][0] == conversation_id
    for outcome in outcomes:
        if outcome.status != 200:
            continue
        question, answer = outcome.body["user_message_id"], outcome.body["assistant_message_id"]
        assert stored.questions.get(question, (None, None))[1] == outcome.message, outcome
        assert stored.answers.get(answer, (None, None, None))[1:] == (outcome.body["response"], question), outcome
    assert stored.counter_mismatches == []


def stop_immediately(cluster: Cluster) -> None:
    """`pg_ctl stop -m immediate`: every backend dies at once, as in a crash."""
    command = [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.datadir), "-m", "immediate", "-w", "stop"]
    if cluster.os_user:
        command = ["runuser", "-u", cluster.os_user, "--", *command]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=60)


@pytest.fixture(scope="module")
def own_cluster():
    """A cluster of this module's own, so stopping it disturbs no other test."""
    with throwaway_cluster("chat-test-pg-outage-") as cluster:
        yield cluster


@contextmanager
def served(path: str, cluster: Cluster):
    """The app on `cluster`: gunicorn connecting directly, or the whole deployment."""
    if path == "direct":
        with gunicorn(cluster.url(APP_ROLE), workers=2, threads=8, wait_ready=False) as server:
            wait_until_serving(server)
            yield server.url
    else:
        with scaled_out(cluster, instances=2, workers=1, threads=8) as deployment:
            yield deployment.url


@pytest.mark.parametrize("path", ["direct", "pgbouncer"])
def test_database_outage_under_load(own_cluster, path):
    with served(path, own_cluster) as url:
        clients = open_conversations(url, CLIENTS, f"outage-{path}")
        with SteadyLoad(url, clients, f"outage {path}") as load:
            time.sleep(1.0)
            stopping = time.monotonic()
            stop_immediately(own_cluster)
            stopped = time.monotonic()
            time.sleep(OUTAGE_S)
            starting = time.monotonic()
            own_cluster.start()
            restarted = time.monotonic()
            time.sleep(RECOVERY_BOUND_S + 1.0)
        outcomes = load.outcomes
        stored = audit(own_cluster.url(SUPERUSER), [client.user.id for client in clients])

    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == 200]
    unavailable = [o for o in outcomes if o.status == 503]
    after_restart = [o for o in ok if o.started >= restarted]
    first_success_s = min(o.finished for o in after_restart) - restarted if after_restart else float("inf")
    failures_after_restart = [o for o in outcomes if o.started >= restarted and o.status != 200]
    settled_s = max((o.finished for o in failures_after_restart), default=restarted) - restarted
    acknowledged = {o.body["user_message_id"] for o in ok} | {client.opening_message_id for client in clients}
    stored_turns = len(stored.answered) - len(clients)
    by_message = {o.message: o for o in outcomes}
    in_doubt = Counter(by_message[stored.questions[question][1]].status
                       for question in stored.answered - acknowledged)
    slowest_503 = max((o.latency for o in unavailable), default=0.0)
    print(f"\noutage via {path}: {len(outcomes)} requests from {CLIENTS} clients, {len(ok)} 200s, "
          f"{len(unavailable)} 503s, other {sum(n for s, n in statuses.items() if s not in (200, 503))}; "
          f"database down {starting - stopping:.2f}s (stop took {stopped - stopping:.2f}s, "
          f"start took {restarted - starting:.2f}s); slowest 503 {slowest_503:.2f}s; "
          f"first 200 {first_success_s:.2f}s after the restart, last failure {settled_s:.2f}s after it; "
          f"stored turns {stored_turns}, of them answered otherwise than 200 {dict(in_doubt)}; "
          f"questions stored unanswered {len(stored.unanswered)}")

    assert [o for o in outcomes if o.error] == [], "a request timed out or lost its connection"
    assert set(statuses) <= {200, 503}, statuses
    for outcome in unavailable:
        assert outcome.retry_after and int(outcome.retry_after) > 0, outcome
        # server_busy: the worker's pool queue waited half of DATABASE_POOL_TIMEOUT_S (behind PgBouncer's
        # query_wait_timeout), so a new turn is refused before anything is stored (admission, test_overload).
        assert outcome.body["error"]["code"] in ("database_unavailable", "server_busy"), outcome
    assert max(o.latency for o in outcomes) <= ANSWER_BOUND_S
    assert all(o.status == 200 for o in load.between(0, stopping)), "failures before the outage"
    during = load.between(stopped, starting)
    assert during and all(o.status == 503 for o in during), Counter(o.status for o in during)
    assert first_success_s <= RECOVERY_BOUND_S
    assert settled_s <= RECOVERY_BOUND_S, [(o.started - restarted, o.status) for o in failures_after_restart]
    assert [o for o in outcomes if o.started >= restarted + RECOVERY_BOUND_S], "no load after the recovery bound"
    assert_acknowledged_turns_stored_once(outcomes, stored)
    assert acknowledged <= stored.answered
    assert set(in_doubt) <= {503}, "a stored turn whose client saw neither 200 nor 503"


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def replacement(master: int, before: set[int]) -> set[int]:
    """The master's new workers, once it runs as many as `before` again."""
    now = child_pids(master)
    return now - before if len(now) == len(before) else set()


@pytest.fixture
def slow_llm():
    """A Chat Completions server that takes a while to answer, so turns are in flight."""
    with FakeChatCompletions() as llm:
        yield llm


def openai_env(llm: FakeChatCompletions) -> dict:
    return {"ASSISTANT": "openai", "ASSISTANT_BASE_URL": llm.base_url, "ASSISTANT_MODEL": "fake-model",
            "ASSISTANT_API_KEY": "sk-fake", "ASSISTANT_TIMEOUT_S": "10"}


def test_killed_workers_are_replaced_and_acknowledged_turns_are_stored(app_url, superuser_url, slow_llm):
    """Each of the two original workers is killed with SIGKILL in turn, under a
    load whose turns spend 0.3 s with the assistant, so turns die mid-flight:
    some after storing their question, some between the two transactions."""
    slow_llm.delay = 0.3
    with gunicorn(app_url, workers=2, threads=8, wait_ready=False, **openai_env(slow_llm)) as server:
        wait_until_serving(server)
        clients = open_conversations(server.url, 6, "killed")
        original = wait_until(lambda: server.worker_pids() if len(server.worker_pids()) == 2
                              else None, 10, "two workers")
        kills, workers = [], set(original)
        # A replacement gevent worker imports the app after the fork (the master
        # preloads nothing, so the worker can patch first): about 2 s on an idle
        # machine, several times that on a loaded one. A request queued while
        # both workers are booting waits that long; it must not fail.
        with SteadyLoad(server.url, clients, "killed", pause_s=0.02, read_timeout_s=45) as load:
            time.sleep(1.0)
            for victim in sorted(original):
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                workers.discard(victim)
                new = wait_until(lambda: replacement(server.process.pid, workers | {victim}), 10,
                                 f"a replacement for worker {victim}")
                workers |= new
                kills.append((victim, killed, time.monotonic() - killed))
                time.sleep(1.0)
            wait_until_serving(server)
            serving_again = time.monotonic()
            wait_until(lambda: len({o.client for o in load.outcomes if o.started >= serving_again}) == len(clients),
                       120, "a turn of every client after the replacements")
        outcomes = load.outcomes
        assert server.process.poll() is None, "the gunicorn master died"
    stored = audit(superuser_url, [client.user.id for client in clients])

    dropped = [o for o in outcomes if o.error]
    print(f"\nkilled workers {[victim for victim, _, _ in kills]}, each replaced within "
          f"{max(delay for _, _, delay in kills):.2f}s; {len(outcomes)} requests, "
          f"{sum(o.status == 200 for o in outcomes)} 200s, {len(dropped)} dropped in flight; "
          f"questions stored unanswered {len(stored.unanswered)}")
    assert {o.status for o in outcomes if not o.error} == {200}
    assert dropped, "no turn was in flight on a killed worker: the test proved nothing"
    kill_times = [killed for _, killed, _ in kills]
    not_in_flight = [(o.error, [(round(o.started - t, 2), round(o.finished - t, 2)) for t in kill_times])
                     for o in dropped if not any(o.started <= t <= o.finished for t in kill_times)]
    assert not_in_flight == [], "requests failed that were not in flight when a worker was killed"
    assert all(o.status == 200 for o in outcomes if o.started >= serving_again)
    assert_acknowledged_turns_stored_once(outcomes, stored)
    unanswered = {stored.questions[message_id][1] for message_id in stored.unanswered}
    assert unanswered <= {o.message for o in dropped}


def test_sigterm_lets_turns_in_flight_finish(app_url, superuser_url, slow_llm):
    in_flight = 8
    slow_llm.delay = 1.0
    with gunicorn(app_url, workers=2, threads=8, wait_ready=False, **openai_env(slow_llm)) as server:
        wait_until_serving(server)
        users = [make_user("graceful") for _ in range(in_flight)]

        def post(n):
            response = requests.post(f"{server.url}/api/{users[n].id}/chat", json={"message": f"in flight {n}"},
                                     headers=users[n].headers, timeout=REQUEST_TIMEOUT_S + 5)
            return response, time.monotonic()

        with ThreadPoolExecutor(in_flight) as pool:
            answers = [pool.submit(post, n) for n in range(in_flight)]
            wait_until(lambda: len(slow_llm.requests) == in_flight, 10, "every turn reaching the assistant")
            terminated = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            # A worker stops accepting within about a second (gevent checks once a second, gthread at
            # once): a late request is refused (queued in the listen backlog, then reset) or served
            # whole, never cut off.
            try:
                latecomer = make_user("late")
                late = requests.post(f"{server.url}/api/{latecomer.id}/chat", json={"message": "too late"},
                                     headers=latecomer.headers, timeout=REQUEST_TIMEOUT_S + 5)
            except requests.ConnectionError:
                late = None
            refused = time.monotonic()
            responses, finished = zip(*(answer.result() for answer in answers))
            answered = max(finished)
        code = server.process.wait(timeout=GRACEFUL_TIMEOUT_S + 10)
        exited = time.monotonic()
        output = server.output()
    stored = audit(superuser_url, [user.id for user in users])

    print(f"\nSIGTERM with {in_flight} turns in flight: a new request {'failed' if late is None else 'was served'} "
          f"{refused - terminated:.2f}s later, "
          f"all {in_flight} answered {answered - terminated:.2f}s later, "
          f"gunicorn exited {exited - terminated:.2f}s later with {code}")
    assert [r.status_code for r in responses] == [200] * in_flight, [r.text for r in responses]
    assert late is None or late.status_code == 200, late.text
    assert answered - terminated < GRACEFUL_TIMEOUT_S
    assert code == 0, output
    assert len(stored.answered) == in_flight and not stored.unanswered
    for n, response in enumerate(responses):
        body = response.json()
        assert stored.questions[body["user_message_id"]][1] == f"in flight {n}"
        assert stored.answers[body["assistant_message_id"]][2] == body["user_message_id"]
