"""A scriptable Chat Completions server on loopback, for tests and benchmarks.

`FakeChatCompletions` speaks just enough of the OpenAI Chat Completions
protocol (`POST {base_url}/chat/completions`) for the `openai` client to talk
to it. It runs in the test process on a background thread and is reached over
real HTTP, so gunicorn workers in other processes can use it too.

Every request is recorded (path, lower-cased headers, parsed JSON body) in
`.requests`. Answers come from the queue filled by `.script(...)`, one per
request, then from `.default`. An answer is built with one of the helpers
below: `text`, `tool_calls`, `echo`, `status`, `malformed`, `slow`,
`trickled` (a body sent a few bytes at a time), `streamed` for
`stream: true` requests (server-sent chunks over time), and the hostile ones:
`redirect` (a 3xx to another server) and `flood` (a stream larger than any
answer may be). `.delay` adds a pause before every answer (for benchmarks).
GET requests are recorded and answered too, so a server that is only a
redirect's target shows whether anything reached it. `.streamed_bytes` holds,
per streamed answer, how many bytes went out before it ended or its client
hung up.

    with FakeChatCompletions() as llm:
        llm.script(status(500), text("recovered"))
        ...  # point ASSISTANT_BASE_URL at llm.base_url
        assert llm.requests[0].body["model"] == "fake-model"
"""
from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict
    body: object  # the parsed JSON body, or the raw text when it was not JSON


@dataclass(frozen=True)
class Answer:
    """What the server sends back: a status, a raw body, and an optional pause first."""

    status: int = 200
    body: bytes | Callable[[RecordedRequest], bytes] = b""
    delay_s: float = 0.0
    headers: dict = field(default_factory=dict)
    events: Iterable[bytes] | None = None  # a streamed answer: these SSE events, `interval_s` apart
    interval_s: float = 0.0
    cut_after: int | None = None  # drop the connection after this many events (an upstream dying mid-stream)
    piece_bytes: int | None = None  # send the body this many bytes at a time, `interval_s` apart
    stall_after: int | None = None  # after this many pieces or events, send nothing more (the connection stays open)

    def render(self, request: RecordedRequest) -> bytes:
        return self.body(request) if callable(self.body) else self.body


def _completion(message: dict, finish_reason: str, usage: dict | None = None, model: str = "fake-model") -> bytes:
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return json.dumps(payload).encode()


def text(content: str, finish_reason: str = "stop", *, usage: dict | None = None, model: str = "fake-model") -> Answer:
    """A normal reply carrying `content` (and `usage`, one token each by default)."""
    return Answer(body=_completion({"role": "assistant", "content": content}, finish_reason, usage, model))


def tool_calls(calls: list[dict], content: str | None = None) -> Answer:
    """A reply asking for tool calls; `calls` are `{"id", "name", "arguments"}` with
    `arguments` either a JSON value (encoded here) or a string sent as is."""
    wire_calls = [
        {
            "id": call["id"],
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"]),
            },
        }
        for call in calls
    ]
    message = {"role": "assistant", "content": content, "tool_calls": wire_calls}
    return Answer(body=_completion(message, "tool_calls"))


def _chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None, choices: bool = True,
           model: str = "fake-model") -> bytes:
    payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []}
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def streamed(pieces: list[str], interval_s: float = 0.0, *, finish_reason: str = "stop", calls: list[dict] = (),
             usage: dict | None = None, cut_after: int | None = None, model: str = "fake-model") -> Answer:
    """A streamed reply: one content chunk per piece, `interval_s` apart; then each tool
    call in two fragments (id and name, then the arguments split in two); a chunk with
    `finish_reason`; a usage chunk without choices; and `[DONE]`. `cut_after=N` drops
    the connection after N events; `model` is the name every chunk reports."""
    events = [{"role": "assistant", "content": ""}]
    events += [{"content": piece} for piece in pieces]
    for index, call in enumerate(calls):
        arguments = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"])
        half = len(arguments) // 2
        events.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["name"], "arguments": arguments[:half]}}]})
        events.append({"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]})
    events = [_chunk(delta, model=model) for delta in events]
    events.append(_chunk({}, finish_reason=finish_reason, model=model))
    usage = usage or {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
    events.append(_chunk({}, usage=usage, choices=False, model=model))
    events.append(b"data: [DONE]\n\n")
    return Answer(events=events, interval_s=interval_s, cut_after=cut_after)


class _Flood:
    """The events of `flood`, made as they are sent (never held whole), afresh for each request."""

    def __init__(self, piece: str, count: int):
        self.piece, self.count = piece, count

    def __iter__(self) -> Iterator[bytes]:
        yield _chunk({"role": "assistant", "content": ""})
        event = _chunk({"content": self.piece})
        for _ in range(self.count):
            yield event
        yield _chunk({}, finish_reason="stop")
        yield b"data: [DONE]\n\n"


def flood(total_bytes: int, piece_chars: int = 64 * 1024) -> Answer:
    """A well-formed streamed reply of about `total_bytes` of events: content chunks of
    `piece_chars` characters each, sent as fast as the client reads them."""
    piece = "x" * piece_chars
    return Answer(events=_Flood(piece, max(1, total_bytes // len(_chunk({"content": piece})))))


def redirect(code: int, location: str) -> Answer:
    """A `code` (301, 302, 303, 307, 308) pointing at `location`, with a body of its own."""
    return Answer(status=code, body=b'{"moved": true}', headers={"Location": location})


def echo(prefix: str = "fake reply to: ") -> Answer:
    """A reply that quotes the last message it was sent, so callers can see what arrived."""

    def render(request: RecordedRequest) -> bytes:
        messages = request.body.get("messages") if isinstance(request.body, dict) else None
        last = messages[-1].get("content") if messages else None
        return text(f"{prefix}{last}").body

    return Answer(body=render)


def status(code: int, message: str = "scripted failure", error_code: str | None = None,
           headers: dict | None = None) -> Answer:
    """An HTTP error with an OpenAI-style error body."""
    body = json.dumps({"error": {"message": message, "type": "fake_error", "code": error_code}}).encode()
    return Answer(status=code, body=body, headers=headers or {})


def malformed(body: bytes = b'{"choices": [ this is not json') -> Answer:
    """A 200 whose body is not a usable completion."""
    return Answer(body=body)


def trickled(answer: Answer, piece_bytes: int, interval_s: float, stall_after: int | None = None) -> Answer:
    """`answer`'s headers at once, then its body `piece_bytes` at a time, `interval_s` apart
    (a server or proxy dribbling a non-streamed answer); `stall_after=N`: N pieces, then silence."""
    return Answer(status=answer.status, body=answer.body, headers=answer.headers, piece_bytes=piece_bytes,
                  interval_s=interval_s, stall_after=stall_after)


def stalled(answer: Answer, after: int) -> Answer:
    """A streamed `answer` that sends its first `after` events, then nothing, keeping the connection open."""
    return Answer(events=answer.events, interval_s=answer.interval_s, stall_after=after)


def slow(seconds: float, then: Answer | None = None) -> Answer:
    """`then` (a text reply by default), sent only after `seconds`."""
    then = then or text("sorry for the wait")
    return Answer(status=then.status, body=then.body, delay_s=seconds, headers=then.headers)


class FakeChatCompletions:
    """The server. Use it as a context manager; `.base_url` ends in `/v1`."""

    def __init__(self, default: Answer | None = None, delay_s: float = 0.0):
        self.default = default or echo()
        self.delay = delay_s
        self.requests: list[RecordedRequest] = []
        self.hangups: list[float] = []  # when a client closed a call before its answer was all sent
        self.streamed_bytes: list[int] = []
        self._queue: deque[Answer] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-llm", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *answers: Answer) -> None:
        """Queue answers for the next requests, in order; `.default` follows."""
        with self._lock:
            self._queue.extend(answers)

    def reset(self) -> None:
        """Forget recorded requests and queued answers."""
        with self._lock:
            self.requests.clear()
            self.streamed_bytes.clear()
            self._queue.clear()

    def start(self) -> FakeChatCompletions:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake paused answers, drop kept-alive connections, join every thread."""
        self._closing.set()
        self._server.shutdown()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeChatCompletions:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _take(self, request: RecordedRequest) -> Answer:
        with self._lock:
            self.requests.append(request)
            return self._queue.popleft() if self._queue else self.default


class _Server(ThreadingHTTPServer):
    """Handler threads are joined on close; a client hanging up is not an error.
    The listen backlog is deep enough for hundreds of clients connecting at once
    (the default of 5 drops their SYNs, and each drop costs a second of retry)."""

    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _handler_for(fake: FakeChatCompletions) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's pool expects
        disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall

        def setup(self):
            super().setup()
            with fake._lock:
                fake._connections.add(self.connection)
            if fake._closing.is_set():
                self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self):
            with fake._lock:
                fake._connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def do_GET(self):
            self.do_POST()

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            request = RecordedRequest(
                method=self.command,
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
            )
            if self.path != COMPLETIONS_PATH:
                self._send(status(404, f"no route {self.path}"), request)
                return
            answer = fake._take(request)
            pause = answer.delay_s + fake.delay
            if pause and self._wait(pause):
                self.close_connection = True
                return
            self._send(answer, request)

        def _wait(self, seconds: float) -> bool:
            """Pause; True (stop answering) when the server closes or the client hangs up meanwhile."""
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if fake._closing.is_set():
                    return True
                if select.select([self.connection], [], [], min(left, 0.05))[0] and not self.connection.recv(
                        1, socket.MSG_PEEK):
                    fake.hangups.append(time.monotonic())
                    return True
            return False

        def _send(self, answer: Answer, request: RecordedRequest) -> None:
            if answer.events is not None:
                self._stream(answer)
                return
            payload = answer.render(request)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if answer.piece_bytes is None:
                    self.wfile.write(payload)
                    return
                for number, start in enumerate(range(0, len(payload), answer.piece_bytes)):
                    if start and fake._closing.wait(answer.interval_s):
                        break
                    if answer.stall_after is not None and number >= answer.stall_after:
                        fake._closing.wait()
                        break
                    self.wfile.write(payload[start:start + answer.piece_bytes])
                    self.wfile.flush()
            except OSError:
                self.close_connection = True  # the client gave up (a timeout test), nothing to tell

        def _stream(self, answer: Answer) -> None:
            """Chunked transfer, one SSE event per chunk, each flushed as it is written;
            the bytes that went out are added to `.streamed_bytes` at the end."""
            sent = 0
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for number, data in enumerate(answer.events):
                    if number and answer.interval_s and self._wait(answer.interval_s):
                        break
                    if answer.cut_after is not None and number >= answer.cut_after:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        break
                    if answer.stall_after is not None and number >= answer.stall_after:
                        fake._closing.wait()
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    sent += len(data)
                else:
                    self.wfile.write(b"0\r\n\r\n")
            except OSError:
                fake.hangups.append(time.monotonic())
            with fake._lock:
                fake.streamed_bytes.append(sent)
            self.close_connection = True

        def log_message(self, format, *args):
            pass

    return Handler
