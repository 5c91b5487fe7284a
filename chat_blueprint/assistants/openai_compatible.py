"""An assistant backed by any server that speaks OpenAI Chat Completions.

OpenAI itself, vLLM, llama.cpp's server, Ollama and the like all accept the
same request, so one backend covers them: ASSISTANT_BASE_URL picks the
server, ASSISTANT_MODEL the model. The official `openai` package does the
wire format, authentication and timeouts.

Time budget: the chat endpoint treats a request whose assistant call never
came back as failed once ASSISTANT_TIMEOUT_S + 30 s have passed, so one call
must not outlive ASSISTANT_TIMEOUT_S by much. The client therefore makes a
single attempt (`max_retries=0`): its retries would each get a full timeout
and it would honour a `Retry-After` of up to minutes. A failed turn is
retried by the caller instead, with the same `Idempotency-Key`, which is
safe; a `Retry-After` the server sent with a 429 or 503 is passed on to that
caller (at most a minute). The client's timeout bounds the wait for the
response's headers; after them, both forms read the body as it arrives,
check the call's deadline at every piece (a server trickling its answer), and
have the socket shut at the deadline (a server that stalls: see deadlines.py),
so ASSISTANT_TIMEOUT_S bounds the whole answer, first byte to last.

The server is not trusted further than that either. Both forms read at most
MAX_ANSWER_BYTES of body, counted as the bytes arrive (before any parsing, so
the SSE decoder's buffer is bounded too), and close the connection once it is
passed. Redirects are not followed: a 3xx is an error status like any other,
so the window is never re-sent to, nor an answer taken from, another host.
Error statuses are refused as soon as their headers arrive (statuses.py).

The request goes through the client's documented `post()` for custom
requests rather than `chat.completions.create()`: the latter walks every
message through its typed-parameter transform, which cost about 7 ms of CPU
per call with a 20-message window against about 1 ms for `post()` (the slow
assistant benchmark is CPU-bound on exactly that). Authentication, timeouts,
error classes and the parsed `ChatCompletion` are the same.

The API key is sent as the bearer token and nowhere else: error messages
are composed here from the status code and a short error code, never from
the upstream body (which may echo the key), and the original exception is
not chained. What logs may name of the server is `endpoint`: the host and
port of ASSISTANT_BASE_URL, never its credentials, path or query.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import dropwhile
from typing import Iterator, Sequence
from urllib.parse import urlsplit

import httpx2
import openai
from openai import Stream
from openai.types.chat import ChatCompletion

from . import AssistantError, AssistantTimeout, HistoryMessage, Reply
from .completions import StreamedReply, reply_from
from .deadlines import WATCHDOG, network_socket
from .statuses import ERROR_BODY_BYTES, status_error

# Every call a process makes may keep its connection for the next one: the
# client's default keeps 100, so a process with more calls at once than that
# opened a new TCP connection for most turns (a tenth of a streaming worker's CPU).
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=5.0)

NO_API_KEY = "unused"
# An answer larger than this, in bytes received (blocking or streamed), is refused rather than held in memory.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
# Joins consecutive messages of one role into one (see `messages`).
MERGED_SEPARATOR = "\n\n"
USER_HASH_CONTEXT = b"assistant-user:"
# The deadline of the call in progress, for the client's response hook (`_refuse_error_status`).
_CALL_DEADLINE: ContextVar[float] = ContextVar("assistant_call_deadline")


class OpenAICompatibleAssistant:
    """Sends the system prompt and the history window; maps the reply or the failure."""

    def __init__(self, *, base_url: str, model: str, timeout_s: float,
                 api_key: str | None = None, system_prompt: str | None = None,
                 temperature: float | None = None, max_tokens: int | None = None,
                 user_key: str | None = None):
        self.model = model
        self.endpoint = urlsplit(base_url).netloc.rpartition("@")[2]  # host[:port], without user:password@
        self.system_prompt = system_prompt
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._user_key = user_key.encode() if user_key else None
        # What every request carries besides the messages.
        self._options = {"model": model}
        if temperature is not None:
            self._options["temperature"] = temperature
        if max_tokens is not None:
            self._options["max_tokens"] = max_tokens
        # Local servers need no key, but the client insists on one; a placeholder
        # also keeps it from reading OPENAI_API_KEY behind the operator's back.
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or NO_API_KEY,
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(follow_redirects=False, limits=CONNECTION_LIMITS,
                                                  event_hooks={"response": [self._refuse_error_status]}),
        )

    @classmethod
    def from_settings(cls, settings) -> OpenAICompatibleAssistant:
        return cls(
            base_url=settings.assistant_base_url,
            model=settings.assistant_model,
            timeout_s=settings.assistant_timeout_s,
            api_key=settings.assistant_api_key,
            system_prompt=settings.assistant_system_prompt,
            temperature=settings.assistant_temperature,
            max_tokens=settings.assistant_max_tokens,
            user_key=settings.assistant_user_key,
        )

    def reply(self, history: Sequence[HistoryMessage], turn: int, *, user_id: str | None = None) -> Reply:
        """One Chat Completions call for the window; `turn` is not needed by the model.

        The body is read in the pieces it arrives in, the deadline checked at
        each, then parsed as plain JSON (no typed model: cheaper, and the
        shape is checked by `reply_from` anyway).
        """
        deadline = time.monotonic() + self.timeout_s
        with self._mapped_errors(deadline):
            body = b"".join(self._within(deadline, self.request_body(history, user_id), _BodyPieces))
            completion = json.loads(body)
        return reply_from(completion)

    def stream(self, history: Sequence[HistoryMessage], turn: int, *,
               user_id: str | None = None) -> Iterator[str | Reply]:
        """The same call with `stream: true`: each content delta as it arrives, then the Reply.

        Tool calls arrive as fragments keyed by their index (the id and name
        first, the arguments in pieces) and are assembled here; usage comes in
        a last chunk without choices (`stream_options.include_usage`).
        ASSISTANT_TIMEOUT_S bounds the whole answer, as in `reply`.
        """
        deadline = time.monotonic() + self.timeout_s
        assembled = StreamedReply()
        body = {**self.request_body(history, user_id), "stream": True, "stream_options": {"include_usage": True}}
        with self._mapped_errors(deadline):
            for chunk in self._within(deadline, body, _ChunkDicts):
                delta = assembled.add(chunk)
                if delta:
                    yield delta
        yield assembled.reply()

    def _within(self, deadline: float, body: dict, stream_cls) -> Iterator:
        """POST `body` and yield what `stream_cls` reads of the response as it arrives, all
        by `deadline`: checked at every item and at the end (an answer the watchdog cut
        short is not an answer), with the socket shut at the deadline meanwhile."""
        token = _CALL_DEADLINE.set(deadline)
        try:
            items = self._client.post("/chat/completions", cast_to=ChatCompletion, body=body, stream=True,
                                      stream_cls=stream_cls)
        finally:
            _CALL_DEADLINE.reset(token)
        with items, WATCHDOG.guard(deadline, network_socket(items.response)):
            for item in items:
                _check(deadline)
                yield item
        _check(deadline)

    def request_body(self, history: Sequence[HistoryMessage], user_id: str | None) -> dict:
        """`model`, the optional `temperature` and `max_tokens`, `messages`, and `user`
        when a key for it is configured."""
        body = {**self._options, "messages": self.messages(history)}
        if user_id is not None and self._user_key is not None:
            body["user"] = self.user_hash(user_id)
        return body

    def user_hash(self, user_id: str) -> str:
        """A stable identifier of the user for the model server's abuse tracing: a keyed
        hash (HMAC-SHA256, 128 bits as hex), so the server cannot recover the user id or
        test a guess of it without the key."""
        digest = hmac.new(self._user_key, USER_HASH_CONTEXT + user_id.encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def _refuse_error_status(self, response) -> None:
        """The HTTP client's response hook: a status other than 2xx fails the call here, once
        at most ERROR_BODY_BYTES of its body are read by the call's deadline (statuses.py)."""
        if response.is_success:
            return
        head = b""
        with WATCHDOG.guard(_CALL_DEADLINE.get(), network_socket(response)):
            for piece in _received(response):
                head += piece
                if len(head) >= ERROR_BODY_BYTES:
                    break
        raise status_error(response.status_code, response.headers, head, self._redact)

    @contextmanager
    def _mapped_errors(self, deadline: float):
        """The client's failures as AssistantError / AssistantTimeout, never chained (they may hold the key)."""
        try:
            yield
        except AssistantError:
            raise
        except (openai.OpenAIError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
            raise self._mapped(exc, deadline) from None

    def _mapped(self, exc: Exception, deadline: float) -> AssistantError:
        if isinstance(exc, openai.APITimeoutError) or time.monotonic() >= deadline:
            # Past the deadline, a broken connection or a cut body is the watchdog's doing.
            return AssistantTimeout("the assistant backend did not answer in time")
        if isinstance(exc, openai.APIConnectionError):
            return AssistantError("the assistant backend could not be reached")
        if isinstance(exc, openai.APIError):
            return AssistantError("the assistant backend reported an error while streaming")
        return AssistantError("the assistant backend answered with a malformed body")

    def messages(self, history: Sequence[HistoryMessage]) -> list[dict]:
        """The request's messages: the system prompt if set, then the window oldest first,
        in a form every chat template accepts: user and assistant strictly alternating,
        starting and ending with a user message.

        Strict templates (several open models' in vLLM and llama.cpp) raise on
        two messages of one role in a row, which the stored history holds after
        a turn whose answer failed (the unanswered user message stays), and on
        a conversation that opens with the assistant, which a window cut at
        CHAT_HISTORY_LIMIT does. So messages of one role in a row are merged
        into one (their texts joined by a blank line, none lost), and an
        assistant message that opens the window is left out (the question it
        answered is outside the window already).

        Past tool calls are described in the assistant's text rather than sent
        as `tool_calls`: the protocol requires a `tool` result message after
        every tool call, this app stores none, and servers reject the request
        without them.
        """
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        opened = len(messages)
        for message in dropwhile(lambda message: message.role != "user", history):
            content = message.content
            if message.tool_calls:
                content = "\n".join(filter(None, [content, *map(_describe_tool_call, message.tool_calls)]))
            if len(messages) > opened and messages[-1]["role"] == message.role:
                messages[-1]["content"] += MERGED_SEPARATOR + content
            else:
                messages.append({"role": message.role, "content": content})
        return messages

    def close(self) -> None:
        """Release the client's pooled connections."""
        self._client.close()

    def _redact(self, message: str) -> str:
        return message.replace(self._api_key, "[redacted]") if self._api_key else message


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise AssistantTimeout("the assistant backend did not finish in time")


def _received(response) -> Iterator[bytes]:
    """The body's bytes in the pieces they arrive in, MAX_ANSWER_BYTES at most (the
    caller's `finally` then closes the connection, which stops the server); a timeout
    or a broken connection raised as the client's own errors."""
    size = 0
    try:
        for piece in response.iter_bytes():
            size += len(piece)
            if size > MAX_ANSWER_BYTES:
                raise AssistantError("the assistant backend's answer is too large")
            yield piece
    except httpx2.TimeoutException:
        raise openai.APITimeoutError(request=response.request) from None
    except httpx2.TransportError:
        raise openai.APIConnectionError(request=response.request) from None


class _BodyPieces(Stream[bytes]):
    """The client's response (its status and error handling done) with the body left
    unread: its bytes as `_received` reads them."""

    def __stream__(self):
        try:
            yield from _received(self.response)
        finally:
            self.response.close()


class _ChunkDicts(Stream[dict]):
    """The client's SSE decoder over the bytes `_received` reads, each chunk left as
    the parsed JSON dict: building a typed model per chunk cost about three quarters
    of a streamed turn's CPU (docs/benchmarks.md)."""

    def __stream__(self):
        try:
            for sse in self._decoder.iter_bytes(_received(self.response)):
                if sse.data.startswith("[DONE]"):
                    break
                data = sse.json()
                if isinstance(data, dict) and data.get("error"):
                    raise AssistantError("the assistant backend reported an error while streaming")
                yield data
        finally:
            self.response.close()


def _describe_tool_call(call: dict) -> str:
    arguments = json.dumps(call.get("arguments"), ensure_ascii=False)
    return f"[called tool {call.get('name')} with {arguments}]"
