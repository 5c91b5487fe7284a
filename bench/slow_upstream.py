"""A slow Chat Completions server for the slow-assistant benchmarks.

It answers every `POST .../chat/completions` with the same short completion
after a fixed delay or, when the request asks for `"stream": true`, streams
it as server-sent Chat Completions chunks: `--chunks` content deltas
`--interval` seconds apart (the first after one interval), then a chunk
with the finish reason, a usage chunk and `data: [DONE]`. It is written on
asyncio, one coroutine per connection, so a thousand waiting requests cost
it almost no CPU: on a 2-core machine a thread-per-connection server would
take CPU from the app being measured.

    python bench/slow_upstream.py --port 9000 --delay 1.0
    python bench/slow_upstream.py --port 9000 --chunks 20 --interval 0.25
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource

COMPLETION = json.dumps({
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "noted."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION)
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(delta: dict | None = None, finish_reason: str | None = None, usage: dict | None = None) -> bytes:
    """One `data:` event as one HTTP chunk."""
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
            "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]}
    if usage:
        body["usage"] = usage
    return http_chunk(b"data: " + json.dumps(body).encode() + b"\n\n")


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stream(writer: asyncio.StreamWriter, chunks: int, interval_s: float) -> None:
    writer.write(STREAM_HEAD + chunk({"role": "assistant", "content": ""}))
    await writer.drain()
    for n in range(chunks):
        await asyncio.sleep(interval_s)
        writer.write(chunk({"content": f"word{n} "}))
        await writer.drain()
    writer.write(chunk(finish_reason="stop")
                 + chunk(usage={"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": chunks + 1})
                 + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                           chunks: int, interval_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b"{}"
            if json.loads(body).get("stream"):
                await stream(writer, chunks, interval_s)
            else:
                await asyncio.sleep(delay_s)
                writer.write(RESPONSE)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, delay_s: float, chunks: int, interval_s: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, delay_s, chunks, interval_s),
                                        "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds before a blocking answer")
    parser.add_argument("--chunks", type=int, default=20, help="content deltas of a streamed answer")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between streamed deltas")
    arguments = parser.parse_args()
    try:
        asyncio.run(main(arguments.port, arguments.delay, arguments.chunks, arguments.interval))
    except KeyboardInterrupt:
        pass
