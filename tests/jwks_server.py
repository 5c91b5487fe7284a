"""A JWKS endpoint on loopback, like Better Auth's /api/auth/jwks, for tests."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KeyServer:
    """A JWKS endpoint on loopback that counts its fetches. Its keys can be
    swapped, it can fail with a 500, answer any `body` instead, or take
    `delay_s` to answer."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.fetches = 0
        self.failing = False
        self.body = None
        self.delay_s = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.fetches += 1
                time.sleep(server.delay_s)
                status, body = (500, b"down") if server.failing else (200, server.document())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/auth/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def document(self) -> bytes:
        return self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
