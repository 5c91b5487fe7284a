"""The `lifecycle` phase: how far a reply's stored text lags its stream, and
how long a stop takes to end the stream (and with it the call to the model).

STOPS streamed turns, STOP_CONCURRENCY at a time, each against the slow
upstream streaming LIFECYCLE_CHUNKS deltas LIFECYCLE_INTERVAL_S apart: while
one streams, its conversation's messages are read every POLL_S; after
STOP_AFTER_S (and up to a second more) its stop route is called, and the time until the stream's
`abort` arrives is the stop's latency. The server shuts the call's socket
before it sends `abort`, so that latency bounds the time to close the
upstream call. The lag of a delta is the time from its arrival at the client
to the first read that found it stored. Plain threads and `requests`: a
dozen connections at a time need nothing lighter.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.settings import SECRET, log
from chat_blueprint.auth import mint_token

STOPS = 100
STOP_CONCURRENCY = 10
LIFECYCLE_CHUNKS = 60
LIFECYCLE_INTERVAL_S = 0.1
STOP_AFTER_S = 1.5  # plus n % 10 tenths: stops spread over the flush period
POLL_S = 0.05


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 1)


def one_stop(url: str, n: int) -> dict:
    user = f"lifecycle-{n}"
    headers = {"Authorization": f"Bearer {mint_token(SECRET, user, 3600)}"}
    api = f"{url}/api/{user}"
    response = requests.post(f"{api}/chat", json={"message": "stream until stopped", "stream": True},
                             headers=headers, stream=True, timeout=60)
    arrivals: list[tuple[float, int]] = []  # (when, text length so far)
    ended: dict = {}
    started = threading.Event()
    conversation: list[str] = []

    def read() -> None:
        length = 0
        for line in response.iter_lines(chunk_size=1, decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "start":
                conversation.append(event["messageMetadata"]["conversation_id"])
                started.set()
            elif event["type"] == "text-delta":
                length += len(event["delta"])
                arrivals.append((time.monotonic(), length))
            elif event["type"] in ("abort", "finish", "error"):
                ended.update(type=event["type"], at=time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    started.wait(30)
    polls: list[tuple[float, int]] = []
    stop_at = time.monotonic() + STOP_AFTER_S + (n % 10) / 10
    while time.monotonic() < stop_at:
        page = requests.get(f"{api}/conversations/{conversation[0]}/messages", headers=headers, timeout=30).json()
        polls.append((time.monotonic(), len(page["data"][-1]["content"])))
        time.sleep(POLL_S)
    asked = time.monotonic()
    requests.post(f"{api}/conversations/{conversation[0]}/stop", headers=headers, timeout=30)
    reader.join(30)
    lags = []
    for arrived, length in arrivals:
        seen = next((at for at, stored in polls if stored >= length), None)
        if seen is not None:
            lags.append(max(0.0, seen - arrived))
    return {"ended": ended.get("type"), "stop_s": ended["at"] - asked if "at" in ended else None, "lags": lags}


def lifecycle(url: str) -> dict:
    with ThreadPoolExecutor(STOP_CONCURRENCY) as pool:
        results = list(pool.map(lambda n: one_stop(url, n), range(STOPS)))
    stops = [result["stop_s"] for result in results if result["ended"] == "abort"]
    lags = [lag for result in results for lag in result["lags"]]
    found = {"stops": len(stops), "not_aborted": STOPS - len(stops),
             "stop_p50_ms": _percentile(stops, 50), "stop_p99_ms": _percentile(stops, 99),
             "stop_max_ms": _percentile(stops, 100), "lag_p50_ms": _percentile(lags, 50),
             "lag_p99_ms": _percentile(lags, 99), "lag_max_ms": _percentile(lags, 100), "lagged_deltas": len(lags)}
    log(f"lifecycle: {found['stops']} stops, stop p50 {found['stop_p50_ms']} ms, p99 {found['stop_p99_ms']} ms; "
        f"stored text lag p50 {found['lag_p50_ms']} ms, p99 {found['lag_p99_ms']} ms")
    return found
