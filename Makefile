# The two commands of the README. Both work on a fresh machine: they create
# .venv, install the project, and make sure PostgreSQL server binaries exist.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test install postgres bench fuzz clean

run: install postgres
	$(PY) -m chat_blueprint.devcluster run

test: install postgres
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

postgres: install
	@$(PY) -m chat_blueprint.devcluster install >/dev/null

clean:
	rm -rf $(VENV) .data *.egg-info
