"""A scriptable Chat Completions server on loopback, for tests and benchmarks.

`FakeChatCompletions` speaks just enough of the OpenAI Chat Completions
protocol (`POST {base_url}/chat/completions`) for the `openai` client to talk
to it. It runs in the test process on a background thread and is reached over
real HTTP, so gunicorn workers in other processes can use it too.

Every request is recorded (path, lower-cased headers, parsed JSON body) in
`.requests`. Answers come from the queue filled by `.script(...)`, one per
request, then from `.default`. An answer is built with one of the helpers
below: `text`, `tool_calls`, `echo`, `status`, `malformed`, `slow`.
`.delay` adds a pause before every answer (for benchmarks).

    with FakeChatCompletions() as llm:
        llm.script(status(500), text("recovered"))
        ...  # point ASSISTANT_BASE_URL at llm.base_url
        assert llm.requests[0].body["model"] == "fake-model"
"""
from __future__ import annotations

import json
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

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

    def render(self, request: RecordedRequest) -> bytes:
        return self.body(request) if callable(self.body) else self.body


def _completion(message: dict, finish_reason: str) -> bytes:
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return json.dumps(payload).encode()


def text(content: str) -> Answer:
    """A normal reply carrying `content`."""
    return Answer(body=_completion({"role": "assistant", "content": content}, "stop"))


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

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            request = RecordedRequest(
                method="POST",
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
            )
            if self.path != COMPLETIONS_PATH:
                self._send(status(404, f"no route {self.path}"), request)
                return
            answer = fake._take(request)
            pause = answer.delay_s + fake.delay
            if pause and fake._closing.wait(pause):
                self.close_connection = True
                return
            self._send(answer, request)

        def _send(self, answer: Answer, request: RecordedRequest) -> None:
            payload = answer.render(request)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                self.close_connection = True  # the client gave up (a timeout test), nothing to tell

        def log_message(self, format, *args):
            pass

    return Handler
