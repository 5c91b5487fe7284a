# The two commands of the README. Both work on a fresh machine: they create
# .venv, install the project, and make sure PostgreSQL server binaries exist.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run token test test-deps install postgres bench fuzz clean

run: install postgres
	@$(PY) -m devtools run

# `make token USER=alice` prints export lines with a token for alice, signed
# with the secret `make run` uses. USER given on the command line only (the
# shell's own USER is not meant).
TOKEN_USER := $(if $(filter command line,$(origin USER)),$(USER),dev-user)

token: install
	@$(PY) -m devtools token '$(TOKEN_USER)'

test: install postgres test-deps ai-sdk
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

postgres: install
	@$(PY) -m devtools install >/dev/null

# The deployment tests start nginx and PgBouncer from the distribution's
# packages, the /docs and CORS tests drive its Chromium (through Playwright,
# which then downloads no browser), the README test runs its curl session.
# Install the missing ones when we are root; otherwise say which are missing
# (those tests then fail, naming them). Each program is its package's name.
TEST_PACKAGES := nginx pgbouncer chromium curl

test-deps:
	@missing=""; \
	for program in $(TEST_PACKAGES); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$program >/dev/null 2>&1 || missing="$$missing $$program"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "missing for the tests:$$missing (apt-get install$$missing)" >&2; exit 0; \
	fi; \
	echo "installing the distribution's packages for the tests:$$missing" >&2; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null

# The AI SDK's own client (the `ai` npm package) drives the streaming endpoint
# in tests/test_ai_sdk.py; without Node.js that test fails, naming it.
AI_SDK := tests/ai_sdk

ai-sdk: $(AI_SDK)/node_modules/.installed

$(AI_SDK)/node_modules/.installed: $(AI_SDK)/package.json
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix $(AI_SDK) --no-package-lock --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: tests/test_ai_sdk.py needs Node.js and npm" >&2; fi

clean:
	rm -rf $(VENV) .data *.egg-info $(AI_SDK)/node_modules

bench: install postgres test-deps
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; } || { echo "wrk not found: install the distribution's wrk package"; exit 1; }
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench.run

# Fuzzing from the OpenAPI document with many more cases than `make test`
# runs: FUZZ_EXAMPLES per operation and generation mode, on a fresh seed each
# time unless FUZZ_SEED is given (the summary line prints it).
FUZZ_EXAMPLES ?= 100
FUZZ_SEED ?= $(shell date +%s)

fuzz: install postgres
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) FUZZ_MIN_CASES=1000 \
		$(PY) -m pytest tests/test_fuzz.py $(PYTEST_ARGS)
