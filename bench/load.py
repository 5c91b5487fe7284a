"""A light load generator for a thousand connections at once.

wrk keeps a fixed number of connections busy, but it cannot read an event
stream as it arrives nor trickle a body, and a thread per connection would
take the CPU the server under test needs. This is asyncio on raw sockets,
HTTP/1.1, one request per connection. `bench/run.py` runs it in a process
of its own (so its CPU is counted apart) with a JSON spec, and reads one
JSON object from its stdout.

    python bench/load.py spec.json

Modes:

- `turns`: `clients` clients, each posting chat turns one after another
  until `seconds` have passed (a turn started before then runs to its end),
  blocking or, with `"stream": true`, streaming (at least one each). A streamed turn counts as
  done when its `finish` event and `data: [DONE]` arrived with no `error`.
  `per_s` is the sum over clients of their turns divided by their busy time,
  which is the clients in flight divided by the mean turn time (Little's
  law), so the start and the end of the run do not bias it.
- `trickle`: `clients` connections send a chat turn's headers, then its body
  one byte at a time over `trickle_s`, while `probes` GETs of /healthz, one
  after another, measure how long the server takes to answer anyone else.
- `overload`: like `turns` (blocking), but a client refused with 503 and
  `Retry-After` waits that long and posts again, as a well-behaved client
  does; refusals are timed apart from answers, and /healthz is probed every
  `probe_interval_s` meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class Outcome:
    client: int
    started: float
    finished: float
    status: int = 0
    first_delta: float | None = None
    error: str | None = None
    code: str | None = None  # the error code of a JSON error answer
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


class StreamProblem(Exception):
    """A 200 event stream that did not end with `finish` then `[DONE]`."""


def request_bytes(host: str, port: int, target: list[str], body: dict, *, with_body: bool = True) -> bytes:
    user, token, _ = target
    payload = json.dumps(body).encode()
    head = (f"POST /api/{user}/chat HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + (payload if with_body else b"")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the status line")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def read_body(reader: asyncio.StreamReader, headers: dict):
    """The body's pieces as they arrive (chunked, sized or until close)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            piece = await reader.readexactly(size)
            await reader.readexactly(2)
            yield piece
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


class EventStream:
    """Reads SSE `data:` events from body pieces; notes when the first text-delta came."""

    def __init__(self):
        self.buffer = b""
        self.first_delta: float | None = None
        self.types: list[str] = []
        self.done = False
        self.error: str | None = None

    def feed(self, piece: bytes) -> None:
        self.buffer += piece
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # a comment (keep-alive) or another field
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.done = True
                    continue
                message = json.loads(data)
                self.types.append(message.get("type"))
                if message.get("type") == "text-delta" and self.first_delta is None:
                    self.first_delta = time.monotonic()
                if message.get("type") == "error":
                    self.error = str(message.get("errorText"))[:200]

    def check(self) -> None:
        if self.error is not None:
            raise StreamProblem(f"error event: {self.error}")
        if not self.done or "finish" not in self.types:
            raise StreamProblem(f"stream ended without finish and [DONE]: {self.types[-3:]}")


async def turn(client: int, host: str, port: int, raw: bytes, stream: bool, timeout_s: float) -> Outcome:
    outcome = Outcome(client, time.monotonic(), 0.0)
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            await writer.drain()
            outcome.status, headers = await read_head(reader)
            events = EventStream() if stream and outcome.status == 200 else None
            body = b""
            async for piece in read_body(reader, headers):
                if events:
                    events.feed(piece)
                elif outcome.status != 200:
                    body += piece
            if outcome.status != 200:
                outcome.code = error_code(body)
                outcome.retry_after = float(headers["retry-after"]) if "retry-after" in headers else None
            if events:
                events.check()
                outcome.first_delta = events.first_delta
    except StreamProblem as problem:
        outcome.error = f"stream: {problem}"
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
        outcome.error = f"socket: {type(exc).__name__} {exc}"[:200]
    finally:
        if writer is not None:
            writer.close()
    outcome.finished = time.monotonic()
    return outcome


async def turns(spec: dict) -> dict:
    host, port = spec["host"], spec["port"]
    targets, stream = spec["targets"], spec.get("stream", False)
    deadline = time.monotonic() + spec["seconds"]
    outcomes: list[Outcome] = []

    async def client(n: int) -> None:
        target = targets[n % len(targets)]
        body = {"message": "bench turn", "conversation_id": target[2], **({"stream": True} if stream else {})}
        raw = request_bytes(host, port, target, body)
        while True:  # at least one turn each
            outcomes.append(await turn(n, host, port, raw, stream, spec.get("timeout_s", 120)))
            if time.monotonic() >= deadline:
                return

    started = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(spec["clients"])))
    return summarize_turns(outcomes, started, stream)


def error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def get(host: str, port: int, path: str, timeout_s: float) -> tuple[float, int]:
    """One GET on a connection of its own: how long it took, and its status (0: failed)."""
    started, writer, status = time.monotonic(), None, 0
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status, headers = await read_head(reader)
            async for _ in read_body(reader, headers):
                pass
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError):
        status = 0
    finally:
        if writer is not None:
            writer.close()
    return time.monotonic() - started, status


async def overload(spec: dict) -> dict:
    host, port, targets = spec["host"], spec["port"], spec["targets"]
    deadline = time.monotonic() + spec["seconds"]
    answered: list[Outcome] = []
    refused: list[Outcome] = []
    probes: list[tuple[float, int]] = []

    async def client(n: int) -> None:
        target = targets[n % len(targets)]
        raw = request_bytes(host, port, target, {"message": "bench turn", "conversation_id": target[2]})
        while time.monotonic() < deadline:
            outcome = await turn(n, host, port, raw, False, spec.get("timeout_s", 120))
            if outcome.status == 503 and outcome.retry_after is not None and outcome.code == "server_busy":
                refused.append(outcome)
                await asyncio.sleep(outcome.retry_after)
            else:
                answered.append(outcome)

    async def probe() -> None:
        while time.monotonic() < deadline:
            probes.append(await get(host, port, "/healthz", 30))
            await asyncio.sleep(spec.get("probe_interval_s", 0.25))

    started = time.monotonic()
    await asyncio.gather(probe(), *(client(n) for n in range(spec["clients"])))
    result = summarize_turns(answered, started, False)
    waits = [o.finished - o.started for o in refused]
    healthz = [elapsed for elapsed, _ in probes]
    result.update(refused=len(refused), refused_p50_ms=ms(percentile(waits, 50)),
                  refused_p99_ms=ms(percentile(waits, 99)), refused_max_ms=ms(max(waits, default=None)),
                  healthz_probes=len(probes), healthz_failed=sum(status != 200 for _, status in probes),
                  healthz_p50_ms=ms(percentile(healthz, 50)), healthz_p99_ms=ms(percentile(healthz, 99)),
                  healthz_max_ms=ms(max(healthz, default=None)),
                  failed_codes=dict(Counter(o.code or f"HTTP {o.status}" for o in answered if not o.ok)))
    return result


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize_turns(outcomes: list[Outcome], started: float, stream: bool) -> dict:
    done = [o for o in outcomes if o.ok]
    latencies = [o.finished - o.started for o in done]
    first = [o.first_delta - o.started for o in done if o.first_delta is not None]
    per_client: dict[int, list[Outcome]] = {}
    for outcome in outcomes:
        per_client.setdefault(outcome.client, []).append(outcome)
    per_s = 0.0
    for mine in per_client.values():
        busy = max(o.finished for o in mine) - min(o.started for o in mine)
        per_s += sum(o.ok for o in mine) / busy if busy > 0 else 0.0
    errors = Counter((o.error or f"HTTP {o.status}") for o in outcomes if not o.ok)
    result = {
        "clients": len(per_client),
        "requests": len(outcomes),
        "ok": len(done),
        "non_2xx": sum(o.status not in (0, 200) for o in outcomes),
        "socket_errors": sum(o.status == 0 for o in outcomes),
        "stream_errors": sum(o.status == 200 and o.error is not None for o in outcomes),
        "errors": dict(errors.most_common(5)),
        "per_s": round(per_s, 1),
        "completed_per_s": round(len(done) / (max(o.finished for o in outcomes) - started), 1) if outcomes else 0,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=None)),
        "duration_s": round(time.monotonic() - started, 2),
    }
    if stream:
        result["first_delta_p50_ms"] = ms(percentile(first, 50))
        result["first_delta_p99_ms"] = ms(percentile(first, 99))
        result["first_delta_max_ms"] = ms(max(first, default=None))
    return result


async def trickle(spec: dict) -> dict:
    host, port, targets = spec["host"], spec["port"], spec["targets"]
    clients, trickle_s, probes = spec["clients"], spec["trickle_s"], spec["probes"]
    timeout_s = spec.get("timeout_s", 60)
    connected = 0
    all_connected = asyncio.Event()
    statuses: Counter = Counter()

    async def slow_client(n: int) -> None:
        nonlocal connected
        target = targets[n % len(targets)]
        body = {"message": "trickled turn", "conversation_id": target[2]}
        head = request_bytes(host, port, target, body, with_body=False)
        payload = json.dumps(body).encode()
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(head)
            await writer.drain()
            connected += 1
            if connected == clients:
                all_connected.set()
            for byte in payload:
                await asyncio.sleep(trickle_s / len(payload))
                writer.write(bytes([byte]))
                await writer.drain()
            async with asyncio.timeout(timeout_s):
                status, headers = await read_head(reader)
                async for _ in read_body(reader, headers):
                    pass
            statuses["200" if status == 200 else f"HTTP {status}"] += 1
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
            statuses[f"socket: {type(exc).__name__}"] += 1
        finally:
            if writer is not None:
                writer.close()

    async def probe() -> tuple[float, str | None]:
        elapsed, status = await get(host, port, "/healthz", timeout_s)
        return elapsed, None if status == 200 else (f"HTTP {status}" if status else "socket: failed")

    started = time.monotonic()
    trickling = [asyncio.create_task(slow_client(n)) for n in range(clients)]
    async with asyncio.timeout(timeout_s):
        await all_connected.wait()
    await asyncio.sleep(1.0)  # let the server take them all up
    spacing = max(0.05, (trickle_s - (time.monotonic() - started) - 1.0) / probes)
    times, probe_errors = [], []
    for _ in range(probes):
        elapsed, error = await probe()
        times.append(elapsed)
        if error:
            probe_errors.append(error)
        await asyncio.sleep(max(0.0, spacing - elapsed))
    still_trickling = sum(not task.done() for task in trickling)
    await asyncio.gather(*trickling)
    failures = Counter(probe_errors) + Counter({s: n for s, n in statuses.items() if s != "200"})
    return {
        "clients": clients,
        "still_trickling_after_probes": still_trickling,
        "healthz_ms": [ms(t) for t in times],
        "healthz_max_ms": ms(max(times)),
        "healthz_p50_ms": ms(percentile(times, 50)),
        "trickle_statuses": dict(statuses),
        "requests": clients + probes,
        "non_2xx": sum(n for failure, n in failures.items() if not failure.startswith("socket")),
        "socket_errors": sum(n for failure, n in failures.items() if failure.startswith("socket")),
        "errors": dict(failures.most_common(5)),
        "duration_s": round(time.monotonic() - started, 2),
    }


MODES = {"turns": turns, "trickle": trickle, "overload": overload}


def main(path: str) -> None:
    spec = json.loads(open(path).read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < spec["clients"] + 64:
        raise SystemExit(f"RLIMIT_NOFILE is {hard}: too low for {spec['clients']} connections")
    print(json.dumps(asyncio.run(MODES[spec["mode"]](spec))))


if __name__ == "__main__":
    main(sys.argv[1])
