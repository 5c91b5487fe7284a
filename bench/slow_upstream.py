"""A slow Chat Completions server for the slow-assistant benchmark.

It answers every `POST .../chat/completions` with the same short completion
after a fixed delay. It is written on asyncio, one coroutine per connection,
so hundreds of waiting requests cost it almost no CPU: on a 2-core machine a
thread-per-connection server would take CPU from the app being measured.

    python bench/slow_upstream.py --port 9000 --delay 1.0
"""
from __future__ import annotations

import argparse
import asyncio
import json

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


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(delay_s)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port: int, delay_s: float) -> None:
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, delay_s), "127.0.0.1", port,
                                        backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=1.0)
    arguments = parser.parse_args()
    try:
        asyncio.run(main(arguments.port, arguments.delay))
    except KeyboardInterrupt:
        pass
