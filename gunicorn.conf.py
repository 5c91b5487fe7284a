"""The production runtime: `gunicorn -c gunicorn.conf.py wsgi:app`.

Two workers per core (each has its own GIL; measured 15-25% more turns/s
than one per core, see docs/benchmarks.md), and threads carry the rest: a
chat turn spends most of its time waiting on the assistant with no database
connection held, so 4 x 64 threads serve 200 slow turns at once on a pool of
DATABASE_POOL_SIZE connections per worker, by default 10 per instance in all.

Logs are JSON lines on stdout: the app writes one access line per request
(with its request id), and gunicorn's own messages use the same format.
"""
import os
import shutil
import sys
import tempfile

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", str(2 * (os.cpu_count() or 1))))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
INSTANCE_DB_CONNECTIONS = 10
os.environ.setdefault("DATABASE_POOL_SIZE", str(max(1, INSTANCE_DB_CONNECTIONS // workers)))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
backlog = 2048
control_socket_disable = True
# Better Auth puts the whole user row in its JWTs: the app reads tokens up to
# 16 KiB and answers a longer Authorization header itself (401 in JSON).
limit_request_field_size = 32768
accesslog = None
loglevel = os.environ.get("LOG_LEVEL", "info")
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "chat_blueprint.observability.JsonFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": "WARNING"},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
    },
}

# Metrics from every worker are merged from files in this directory (one per
# server: a fresh directory unless the operator chose one).
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-metrics-")


def on_starting(server):
    """Refuse to serve on a bad configuration or a role that bypasses row-level security."""
    from chat_blueprint.startup import RefuseToServe, check_before_serving

    try:
        check_before_serving()
    except RefuseToServe as refusal:
        print(str(refusal), file=sys.stderr, flush=True)
        server.log.error(str(refusal))
        sys.exit(1)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
