"""What an assistant answers, made storable: PostgreSQL text and jsonb hold
neither NUL nor a lone surrogate, and a model may send either (both are valid
JSON escapes) in its text, its tool calls or what it reports."""
from __future__ import annotations

import dataclasses
import re

import psycopg

from ..assistants import Reply

# What storing a reply raises when it holds something PostgreSQL refuses that
# `storable` did not foresee: the assistant's fault (502), not the client's.
UNSTORABLE = (psycopg.DataError, UnicodeError)
# NUL, and any surrogate code point: in a str parsed from JSON, a valid pair is
# one character already, so every surrogate left is a lone one.
UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """PostgreSQL text and jsonb hold neither NUL nor a lone surrogate (which
    UTF-8 cannot encode): each becomes U+FFFD, the replacement character.

    Character by character, so that the pieces of a streamed reply, each made
    storable as it is sent, add up to the whole reply made storable: a pair
    split across two pieces is two lone surrogates in either reading."""
    return UNSTORABLE_CHARACTER.sub("\ufffd", text)


def storable_json(value):
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    if isinstance(value, dict):
        return {storable_text(str(key)): storable_json(item) for key, item in value.items()}
    return value


def storable(reply: Reply) -> Reply:
    """`reply` as PostgreSQL can store it: a model may send NUL characters or
    lone surrogates (valid JSON escapes) in its text or in tool-call arguments."""
    return dataclasses.replace(reply, text=storable_text(reply.text), tool_calls=storable_json(reply.tool_calls),
                               model=storable_json(reply.model), finish_reason=storable_json(reply.finish_reason),
                               usage=storable_json(reply.usage))
