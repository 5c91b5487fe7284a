"""The production runtime: `gunicorn -c gunicorn.conf.py wsgi:app`.

Threads, not processes, carry concurrency: a chat turn spends most of its time
waiting on the assistant with no database connection held, so a few workers
with many threads serve many slow turns on a small connection pool
(DATABASE_POOL_SIZE per worker).
"""
import os
import sys

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
control_socket_disable = True


def on_starting(server):
    """Refuse to serve on a bad configuration or a role that bypasses row-level security."""
    from chat_blueprint.startup import RefuseToServe, check_before_serving

    try:
        check_before_serving()
    except RefuseToServe as refusal:
        print(str(refusal), file=sys.stderr, flush=True)
        server.log.error(str(refusal))
        sys.exit(1)
