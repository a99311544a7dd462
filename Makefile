# spoolscan — the two commands that matter on a fresh Debian machine:
#   make run    install what is missing, then run the worker on a demo Maildir
#   make test   install what is missing, then run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: all deps venv test run bench lint clean

all: test

deps:
	@scripts/install-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	@scripts/start-postgres
	$(PY) -m pytest $(PYTEST_ARGS)

run: deps venv
	@$(PY) -m spoolscan.demo

bench: deps venv
	$(PY) bench/scan_maildir

lint: venv
	$(VENV)/bin/ruff check spoolscan tests bench
	$(VENV)/bin/mypy spoolscan

clean:
	rm -rf $(VENV) build dist *.egg-info
