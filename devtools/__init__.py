"""Developer tooling behind `make run`, `make test` and `make bench`: a private
PostgreSQL cluster, gunicorn started as production starts it, free ports and
the dev token. Not part of the installed package; nothing here runs in
production.

    python -m devtools run          # what `make run` does
    python -m devtools token alice  # what `make token USER=alice` does
    python -m devtools install      # what `make postgres` does
"""
