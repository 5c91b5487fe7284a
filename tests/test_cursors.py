"""Page cursors: whatever a client sends back as `cursor` is a page or a 422,
never a 500. Property-based (hypothesis) over arbitrary JSON, at the decoders
and through the routes on the real database, plus the crafted cursor of the
finding against real gunicorn."""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_user

from chat_blueprint.services import pagination as cursors
from chat_blueprint.db.models import BIGINT_MAX

NOT_OUR_CURSOR = {"cursor": ["Not a cursor returned by this API."]}


def encode(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
offsets = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                                            max_value=timedelta(hours=23, minutes=59)))
times = st.datetimes(timezones=st.none() | st.just(timezone.utc) | offsets).map(datetime.isoformat)
ids = st.integers(min_value=-1, max_value=BIGINT_MAX + 1)
# Near misses of the real shapes reach past the first checks of each decoder.
near_misses = st.one_of(
    st.tuples(times | json_values, st.uuids().map(str) | ids | json_values).map(list),
    st.tuples(st.booleans() | json_values, times | json_values, st.uuids().map(str) | json_values).map(list),
    st.tuples(ids | json_values).map(list),
    st.lists(times | ids | st.uuids().map(str), max_size=4),
)
any_json = json_values | near_misses
cursor_strings = st.one_of(
    any_json.map(encode),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=80),
    st.binary(max_size=60).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
)
DECODERS = [cursors.decode_conversation, cursors.decode_message, cursors.decode_task]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
@settings(max_examples=400, deadline=None)
@given(cursor=cursor_strings)
def test_a_decoder_returns_typed_values_or_refuses(decode, cursor):
    try:
        decoded = decode(cursor)
    except cursors.InvalidCursor:
        return
    values = decoded if isinstance(decoded, tuple) else (decoded,)
    if decode is cursors.decode_conversation:
        assert isinstance(values[0], bool)  # pinned, the only flag a cursor holds
        values = values[1:]
    for value in values:
        if isinstance(value, datetime):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        elif isinstance(value, int):
            assert not isinstance(value, bool) and 0 <= value <= BIGINT_MAX
        else:
            assert isinstance(value, uuid.UUID)


@settings(max_examples=200, deadline=None)
@given(moment=st.datetimes(timezones=st.just(timezone.utc) | offsets), row_id=st.integers(0, BIGINT_MAX),
       conversation_id=st.uuids(), pinned=st.booleans())
def test_every_cursor_an_encoder_writes_decodes_to_its_values(moment, row_id, conversation_id, pinned):
    try:
        moment.astimezone(timezone.utc)
    except OverflowError:
        return  # a time that has no UTC representation is never a row's
    assert cursors.decode_conversation(cursors.encode_conversation(pinned, moment, conversation_id)) == (
        pinned, moment, conversation_id)
    assert cursors.decode_message(cursors.encode_message(row_id)) == row_id
    assert cursors.decode_task(cursors.encode_task(moment, row_id)) == (moment, row_id)


@pytest.fixture(scope="module")
def owner(app):
    """A user with a conversation and a task, for the routes to page through."""
    user = make_user("cursor")
    client = app.test_client()
    chat = client.post(f"/api/{user.id}/chat", json={"message": "hello"}, headers=user.headers)
    assert client.post(f"/api/{user.id}/tasks", json={"title": "t"}, headers=user.headers).status_code == 201
    return user, chat.get_json()["conversation_id"]


def routes(user, conversation_id):
    messages = f"/api/{user.id}/conversations/{conversation_id}/messages"
    return [(f"/api/{user.id}/conversations", {}), (messages, {}), (messages, {"order": "desc"}),
            (f"/api/{user.id}/tasks", {}), (f"/api/{user.id}/tasks", {"status": "pending"})]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cursor=cursor_strings, route=st.integers(0, 4))
def test_any_cursor_through_the_routes_is_a_page_or_a_422(app, owner, cursor, route):
    user, conversation_id = owner
    url, query = routes(user, conversation_id)[route]
    response = app.test_client().get(url, query_string={**query, "cursor": cursor}, headers=user.headers)
    assert response.status_code in (200, 422), (url, cursor, response.get_data(as_text=True))
    if response.status_code == 422:
        assert response.get_json()["error"]["fields"].keys() == {"cursor"}


def test_the_crafted_conversation_cursor_is_422_over_gunicorn(shared_server):
    """The finding: base64url of `["2026-12-31T00:00:00+00:00", 1]` raised in uuid.UUID (a 500)."""
    user = make_user()
    for where_the_uuid_goes in (1, [1], {"a": 1}, None, True, 1.5):
        cursor = encode(["2026-12-31T00:00:00+00:00", where_the_uuid_goes])
        response = requests.get(f"{shared_server.url}/api/{user.id}/conversations", params={"cursor": cursor},
                                headers=user.headers, timeout=10)
        assert response.status_code == 422, (where_the_uuid_goes, response.text)
        assert response.json()["error"]["fields"] == NOT_OUR_CURSOR
