"""The benchmark's settings: the BENCH_* environment variables, the sizes of
the seed data and of each phase's load, and the runtimes the servers run
under (see bench/run.py for what each phase does with them)."""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
CONCURRENCIES = [int(c) for c in os.environ.get("BENCH_CONCURRENCIES", "1,16,64").split(",")]
USERS = 200
CONVERSATIONS = 2000
SEED_MESSAGES = 10
HISTORY_CONVERSATIONS = 64
LONG_HISTORY = 10_000
SLOW_CLIENTS = 200
SLOW_ASSISTANT_S = 1.0
IN_FLIGHT = 1000
IN_FLIGHT_ASSISTANT_S = 5.0
OVERLOAD_CLIENTS = 3000  # three times the turns in flight one instance must hold
STREAM_CHUNKS = 20
STREAM_INTERVAL_S = 0.25
TRICKLING_CLIENTS = 300
HEALTHZ_PROBES = 20
RLS_ROUNDS = 3
RLS_CONCURRENCY = 64  # when the app phase did not run to find the best
BASELINE = os.environ.get("BENCH_BASELINE")
BASELINE_ASSISTANT = os.environ.get("BENCH_BASELINE_ASSISTANT", "builtin")
RUNTIMES = {
    "conf": {},  # gunicorn.conf.py as it is
    "gevent": {"GUNICORN_WORKER_CLASS": "gevent"},
    # 4 workers x 256 threads: enough threads for 1,000 turns in flight.
    "gthread": {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "256"},
    "gthread64": {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "64"},  # the runtime before gevent
}
RUNTIME_NAMES = os.environ.get("BENCH_RUNTIMES", "gevent,gthread").split(",")
# A runtime named `base:<runtime>` runs the BENCH_BASELINE revision's app (a worktree in the bench's
# directory) under <runtime>: the runtime phases then compare before and after in one run.
BASELINE_PREFIX = "base:"


def runtime_of(name: str) -> str:
    return name.removeprefix(BASELINE_PREFIX)
# The baseline pins its runtime on gunicorn's command line, which any revision's
# gunicorn.conf.py obeys: gthread, the runtime of revisions before gevent (whose
# master imported psycopg before a gevent worker could patch it).
SAME_RUNTIME = {"WEB_CONCURRENCY": "4", "DATABASE_POOL_SIZE": "2",
                "GUNICORN_CMD_ARGS": "--worker-class gthread --threads 64"}
SECRET = "bench-secret-" + uuid.uuid4().hex * 2
RESULTS = ROOT / "bench" / "results"
NORLS_DATABASE = "chat_norls"
BASELINE_DATABASE = "chat_base"  # migrated and served by the BENCH_BASELINE revision
# The search phase's own database: SEARCH_USERS users with SEARCH_CONVERSATIONS
# conversations of SEARCH_MESSAGES messages each (BENCH_SEARCH_USERS and
# BENCH_SEARCH_CONVERSATIONS make a quick run smaller), of 20 words drawn from
# SEARCH_VOCABULARY words with a Zipf-like frequency (word wN about 1/N as
# often as w1), and its copy without the text-search indexes.
SEARCH_USERS = int(os.environ.get("BENCH_SEARCH_USERS", "200"))
SEARCH_CONVERSATIONS = int(os.environ.get("BENCH_SEARCH_CONVERSATIONS", "2000"))
SEARCH_MESSAGES = 20
SEARCH_VOCABULARY = 20_000
SEARCH_DATABASE = "chat_search"
SEARCH_NOINDEX_DATABASE = "chat_search_noindex"
SEARCH_CLIENTS = 16


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
