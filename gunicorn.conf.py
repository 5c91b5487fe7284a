"""The production runtime: `gunicorn -c gunicorn.conf.py wsgi:app`.

gevent workers (GUNICORN_WORKER_CLASS, default `gevent`; `gthread` is the
alternative): a chat turn spends almost all of its time waiting on the
assistant with no database connection held, and a greenlet per connection
makes that wait cost a few kilobytes instead of a thread, so one instance
holds a thousand turns (blocking or streaming) in flight, and clients that
trickle their bodies block only their own greenlet. Measured side by side
with gthread in docs/benchmarks.md. Two workers per core (each has its own
GIL), each with up to GUNICORN_WORKER_CONNECTIONS clients, on a pool of
DATABASE_POOL_SIZE database connections per worker, 10 per instance in all.
psycopg (3.1.14 and later) waits cooperatively under gevent by itself, and
the assistant's HTTP client goes through gevent's patched sockets.

Logs are JSON lines on stdout: the app writes one access line per request
(with its request id), and gunicorn's own messages use the same format.

What gunicorn refuses before the app sees a request (a request line it cannot
parse, 414, 431, 501) it answers itself; those answers carry the API's JSON
error shape too (see `_json_error` below).
"""
import gc
import glob
import http
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import gunicorn.util

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", str(2 * (os.cpu_count() or 1))))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
threads = int(os.environ.get("GUNICORN_THREADS", "64"))  # gthread only
INSTANCE_DB_CONNECTIONS = 10
os.environ.setdefault("DATABASE_POOL_SIZE", str(max(1, INSTANCE_DB_CONNECTIONS // workers)))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
backlog = 2048
control_socket_disable = True
# A Better Auth token carries the user's row in its claims: the app reads
# tokens of up to 16 KiB, so a header line must fit one with room to spare
# (gunicorn's default is 8190 bytes). A longer Authorization header reaches
# the app and is a 401 there; only a line over this limit is gunicorn's 431.
# gunicorn buffers at most limit_request_fields (100) lines of this size.
limit_request_field_size = 32 * 1024
accesslog = None
loglevel = os.environ.get("LOG_LEVEL", "info")
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "chat_blueprint.runtime.logs.JsonFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": "WARNING"},
    "loggers": {
        # The app's lines (access lines included) reach the root's handler by
        # propagation, once: the package adds no handler of its own here.
        "chat_blueprint": {"level": loglevel.upper(), "propagate": True},
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
    },
}

# Metrics from every worker are merged from files in this directory (one per
# server: a fresh directory unless the operator chose one).
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-metrics-")


# The master imports nothing of the app but two stdlib-only modules, its log
# formatter and, for the banner, its settings: a gevent worker must
# monkey-patch the standard library before Flask, psycopg or the ssl module
# are imported, and workers inherit whatever the master imported. Hence the
# start-up check runs as its own process.


def on_starting(server):
    """Refuse to serve on a bad configuration or a role that bypasses row-level security."""
    checked = subprocess.run([sys.executable, "-m", "chat_blueprint.runtime.startup"], stderr=subprocess.PIPE, text=True)
    if checked.returncode != 0:
        refusal = checked.stderr.strip() or f"the start-up check failed (exit {checked.returncode})"
        print(refusal, file=sys.stderr, flush=True)
        server.log.error(refusal)
        sys.exit(1)


def when_ready(server):
    """One line saying what serves, once the start-up check passed: the assistant (`builtin`, or `openai`
    with its model and the host of ASSISTANT_BASE_URL, never its credentials, path or query), the workers
    and their class. An operator reading why turns fail (a 502 naming a host) sees here what was meant."""
    from urllib.parse import urlsplit

    from chat_blueprint.config import load_settings

    settings = load_settings()
    assistant = settings.assistant
    if assistant == "openai":
        host = urlsplit(settings.assistant_base_url).netloc.rpartition("@")[2]
        assistant = f"openai {settings.assistant_model} at {host}"
    cfg, kind = server.cfg, server.cfg.worker_class_str
    each = (f", {cfg.threads} threads each" if kind == "gthread" else
            f", {cfg.worker_connections} connections each" if kind.startswith("gevent") else "")
    server.log.info("Serving with assistant %s; %d %s worker%s%s", assistant, cfg.workers, kind,
                    "" if cfg.workers == 1 else "s", each)


def post_worker_init(worker):
    """A worker leaves Ctrl-C to the master. A terminal's Ctrl-C signals every process of the group, so
    each worker heard SIGINT from the terminal and then SIGQUIT from the master (whose answer to SIGINT
    is to quit its workers); under gevent each of the two raised its own SystemExit, and the second
    one, arriving while the worker was already exiting, was printed as a traceback. Ignoring SIGINT
    here leaves one signal per worker, the master's, and a clean exit.

    The app is loaded by now, and it and every module it imported live as long as the worker: frozen,
    they are out of the cyclic collector's reach, so a full collection walks only what requests allocate.
    It walked about 170,000 objects, 67-109 ms during which every request of the worker waited; frozen,
    about 1 ms (docs/benchmarks.md)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()


def child_exit(server, worker):
    """What prometheus_client's multiprocess.mark_process_dead does: drop the dead
    worker's live gauges (its other metrics stay, summed into the totals)."""
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"gauge_live*_{worker.pid}.db")):
        os.remove(path)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


PROTOCOL_ERROR_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                        431: "request_header_fields_too_large", 501: "not_implemented"}


def _json_error(sock, status_int, reason, mesg):
    """gunicorn's answer to a request it refused, in the API's error shape.

    Every worker class (gthread, gevent, sync) answers such a request through
    `Worker.handle_error`, which calls `gunicorn.util.write_error` to write an
    HTML page; gunicorn has no setting for the format, so the function is
    replaced here, in the master, before any worker is forked.
    `tests/test_protocol_errors.py` holds gunicorn to it.
    """
    try:
        phrase = http.HTTPStatus(status_int).phrase  # gunicorn's 501 says "Bad Request"
    except ValueError:
        phrase = reason
    body = json.dumps({"error": {"code": PROTOCOL_ERROR_CODES.get(status_int, "internal_error"),
                                 "message": (mesg or phrase)[:300]}}).encode()
    head = (f"HTTP/1.1 {status_int} {phrase}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = _json_error


# Request headers: at most 64 KiB together, read in time linear in their size.
#
# gunicorn's Python parser (`Request._parse_python`) looks for the blank line
# that ends the headers by copying and searching its whole buffer again, and
# counting its line ends, each time a piece arrives (8 KiB at most, one byte
# if the client trickles), and buffers up to limit_request_fields lines of
# limit_request_field_size (3.2 MB here) before refusing: one such request
# cost a worker a second of CPU. gunicorn has no setting for the headers'
# total, so the method is replaced here, in the master before any worker is
# forked, by one that searches each byte once and refuses header lines over
# HEADERS_LIMIT together (each with its CRLF) as 431 through `_json_error`.
# gunicorn_h1c's parser, which gunicorn would prefer once installed, has no
# such limit: the Python parser is chosen explicitly.
# `tests/test_header_limits.py` holds gunicorn's method to the one replaced.
import re  # noqa: E402

from gunicorn.http.errors import InvalidHeader, LimitRequestHeaders  # noqa: E402
from gunicorn.http.message import Request  # noqa: E402

HEADERS_LIMIT = 64 * 1024
http_parser = "python"
_BARE_LF = re.compile(rb"(?<!\r)\n")


def _parse_head(self, unreader, buf):
    """`Request._parse_python` of gunicorn 27 with its header loop bounded and
    linear: only what each read adds is searched for the blank line and for a
    bare LF, and no more than HEADERS_LIMIT + 1 bytes are buffered in wait."""
    while buf[:1] == b"\r" and len(buf) < 2:
        self.read_into(unreader, buf)
    if buf[:2] == b"\r\n":
        del buf[:2]
    line, buf = self.read_line(unreader, buf, self.limit_request_line)
    self.parse_request_line(line)
    searched = 0
    while not buf.startswith(b"\r\n"):
        end = buf.find(b"\r\n\r\n", max(0, searched - 3))
        if end >= 0 and end + 2 <= HEADERS_LIMIT:
            self.headers = self.parse_headers(bytes(buf[:end]), from_trailer=False)
            return bytes(buf[end + 4:])
        if end >= 0 or len(buf) > HEADERS_LIMIT + 1:
            raise LimitRequestHeaders(f"request headers over {HEADERS_LIMIT // 1024} KiB together")
        if _BARE_LF.search(buf, searched):
            raise InvalidHeader("bare LF as line terminator")
        searched = len(buf)
        self.read_into(unreader, buf)
    self.unreader.unread(bytes(buf[2:]))
    return b""


Request._parse_python = _parse_head
