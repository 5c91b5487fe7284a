"""Fuzzing from the OpenAPI document: schemathesis against real gunicorn on a
real PostgreSQL.

The document schemathesis works from is the one the running app serves at
/api/openapi.json (the first test checks they are the same; it is built from
the generator at import time because pytest collects one test per operation
before any server runs). Every operation is exercised with a valid token for
one test user, whose id is in the path; a second pass puts other user ids in
the path (403), and a third follows the document's links through create, read,
update and delete sequences. Every answer must be documented: status code,
content type, headers and body schema (all of schemathesis's checks), so a 5xx,
which the document never lists for a healthy database and the builtin
assistant, fails too.

FUZZ_EXAMPLES sets the generated cases per operation and generation mode, and
FUZZ_SEED the seed; `make fuzz` raises the first and varies the second. The
examples and coverage phases add their own cases on top.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import hypothesis
import pytest
import requests
import schemathesis
from support import gunicorn, make_user
from hypothesis import strategies as st
from schemathesis.openapi.checks import RejectedPositiveData

from chat_blueprint.api.openapi import openapi_document

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20240607"))
FUZZ_MIN_CASES = int(os.environ.get("FUZZ_MIN_CASES", "100"))
FUZZ_USER = make_user("fuzz")
# Any 4xx the document lists is a rejection, 413 and 414 (input too large) included.
REJECTIONS = ["400", "401", "403", "404", "405", "409", "413", "414", "415", "422"]
NOT_OUR_CURSOR = {"cursor": ["Not a cursor returned by this API."]}
OWNED = {"task_id": [], "conversation_id": [], "message_id": []}


class Tally:
    """The cases sent, by operation and by answer."""

    def __init__(self):
        self.by_status = Counter()
        self.by_operation = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def record(self, case, response) -> None:
        self.by_status[response.status_code] += 1
        self.by_operation[case.operation.label] += 1

    def summary(self) -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.by_status.items()))
        return (f"fuzz: {self.total} cases over {len(self.by_operation)} operations, seed {FUZZ_SEED}, "
                f"answers {statuses}")


TALLY = Tally()


def document() -> dict:
    """A copy of the app's OpenAPI document, as JSON would carry it."""
    return json.loads(json.dumps(openapi_document()))


def fuzz_config(**overrides) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": FUZZ_SEED,
        "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none"},
        "checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}},
        "auth": {"openapi": {"bearer": {"bearer": FUZZ_USER.token}}},
        **overrides,
    })


schema = schemathesis.openapi.from_dict(document(), config=fuzz_config(parameters={"path.user_id": FUZZ_USER.id}))


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Half the time, aim at a task, conversation or message the user owns, so
    the answers with a body (200) are checked as well as the 404s."""
    owned = [name for name in OWNED if name in (path_parameters or {}) and OWNED[name]]
    if not owned:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.tuples(*(st.sampled_from(OWNED[name]) for name in owned)).map(
            lambda ids: {**path_parameters, **dict(zip(owned, ids))}),
    )


@schema.hook
def filter_failure(context, failure, case, response):
    """Drop the three rejections of schema-valid input that the contract makes
    and a schema cannot express, all 422: a cursor this API did not issue,
    an Idempotency-Key already used with another body, and feedback on a
    message that is the user's own rather than the assistant's."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 422:
        return True
    error = response.json()["error"]
    return not (error["code"] in ("idempotency_key_reused", "not_an_assistant_message")
                or error.get("fields") == NOT_OUR_CURSOR)


@pytest.fixture(scope="module")
def fuzz_server(app_url, request):
    # No write limit: `make fuzz` sends thousands of writes as one user. The
    # limits' answers are checked against the document on their own (below).
    with gunicorn(app_url, threads=8, WRITE_RATE_LIMIT="off") as server:
        yield server
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{TALLY.summary()}")


@pytest.fixture(scope="module")
def owned(fuzz_server):
    """Tasks, conversations and messages (of both roles) the fuzz user owns."""
    api = f"{fuzz_server.url}/api/{FUZZ_USER.id}"
    for n in range(3):
        task = requests.post(f"{api}/tasks", json={"title": f"task {n}"}, headers=FUZZ_USER.headers, timeout=10)
        OWNED["task_id"].append(task.json()["id"])
        chat = requests.post(f"{api}/chat", json={"message": f"hello {n}"}, headers=FUZZ_USER.headers, timeout=10)
        OWNED["conversation_id"].append(chat.json()["conversation_id"])
        OWNED["message_id"] += [chat.json()["user_message_id"], chat.json()["assistant_message_id"]]
    return OWNED


def test_the_served_document_is_the_one_fuzzed(fuzz_server):
    """The document fuzzed below is exactly the one the running app serves."""
    served = requests.get(f"{fuzz_server.url}/api/openapi.json", timeout=10).json()
    assert served == document()


@schema.parametrize()
def test_every_answer_is_documented(case, fuzz_server, owned):
    """Examples, boundary values and random valid and invalid requests for
    each operation, with the user's own id in the path."""
    response = case.call(base_url=fuzz_server.url, timeout=10)
    TALLY.record(case, response)
    case.validate_response(response, transport_kwargs={"base_url": fuzz_server.url, "timeout": 10})


others = schemathesis.openapi.from_dict(document(), config=fuzz_config(
    generation={"mode": "positive", "max-examples": max(FUZZ_EXAMPLES // 2, 5), "database": "none"},
    phases={"examples": {"enabled": False}, "coverage": {"enabled": False}},
)).include(path_regex="^/api/[{]user_id[}]/")


@others.parametrize()
def test_another_users_path_is_forbidden(case, fuzz_server):
    """A valid token on a path naming any other user: 403 whatever else the request holds."""
    response = case.call(base_url=fuzz_server.url, timeout=10)
    TALLY.record(case, response)
    case.validate_response(response, transport_kwargs={"base_url": fuzz_server.url, "timeout": 10})
    assert response.status_code in (403, 414), case.path_parameters


def test_stateful_workflows(fuzz_server):
    """Sequences that create, read, change and delete the same resources,
    following the links of the document (a new task's id, a chat's
    conversation id). Each sequence runs as a new user, so that replaying it
    meets the same state and gets the same answers, as Hypothesis requires."""

    @hypothesis.seed(FUZZ_SEED)
    class Workflow(schema.as_state_machine()):
        def setup(self):
            self.user = make_user("flow")

        def before_call(self, case):
            if case.path_parameters is not None and "user_id" in case.path_parameters:
                case.path_parameters["user_id"] = self.user.id
            if case.headers and case.headers.get("Authorization") == FUZZ_USER.headers["Authorization"]:
                case.headers["Authorization"] = self.user.headers["Authorization"]

        def get_call_kwargs(self, case):
            return {"base_url": fuzz_server.url, "timeout": 10}

        def after_call(self, response, case):
            TALLY.record(case, response)

    Workflow.run(settings=hypothesis.settings(max_examples=FUZZ_EXAMPLES, stateful_step_count=6, deadline=None,
                                              database=None))


def test_the_rate_limited_answers_are_documented(app_url):
    """429 only happens with the rate limits low enough, which the fuzzed
    server's are not: check those answers against the document on their own."""
    user = make_user("limited")
    chat = schema["/api/{user_id}/chat"]["POST"]
    add_task = schema["/api/{user_id}/tasks"]["POST"]
    with gunicorn(app_url, CHAT_RATE_LIMIT="1/hour", WRITE_RATE_LIMIT="3/hour") as server:
        turns = [requests.post(f"{server.url}/api/{user.id}/chat", json={"message": "hi"}, headers=user.headers,
                               timeout=10) for _ in range(2)]
        writes = [requests.post(f"{server.url}/api/{user.id}/tasks", json={"title": "t"}, headers=user.headers,
                                timeout=10) for _ in range(2)]
    assert [answer.status_code for answer in turns + writes] == [200, 429, 201, 429]
    assert "429" in chat.responses.status_codes and "429" in add_task.responses.status_codes
    for answer in (turns[1], writes[1]):
        assert answer.headers["Retry-After"].isdigit()
    for operation, answer in ((chat, turns[0]), (chat, turns[1]), (add_task, writes[0]), (add_task, writes[1])):
        operation.validate_response(answer)


def test_enough_cases_were_sent():
    """`make fuzz` asks for at least 1,000 cases; `make test` for a sanity floor."""
    assert TALLY.total >= FUZZ_MIN_CASES, TALLY.summary()
