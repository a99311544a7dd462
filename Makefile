# spoolscan — the two commands that matter on a fresh Debian machine:
#   make run    install what is missing, then run the worker on a demo Maildir
#   make test   install what is missing, then run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's own Python when there is one: the worker runs as an unprivileged user (privilege
# separation) and must be able to read its interpreter and standard library.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)

.PHONY: all deps demo-deps venv compile test run bench fuzz faults lint man clean

all: test

deps:
	@scripts/install-deps test

demo-deps:
	@scripts/install-deps demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The byte code of the checkout (pip compiles an installed package; the -e install does
# not, and the unprivileged worker cannot write __pycache__ here): without it every
# spoolscan process compiles what it imports again.
compile: venv
	@PYTHONDONTWRITEBYTECODE= $(PY) -m compileall -q spoolscan

# Three test files at a time (pytest-xdist; a file's tests stay together, sharing its
# Postfix and clamd): the tests mostly wait on Postfix, clamd and the database, so this
# takes a third of the time even on 2 cores.  PYTEST_ARGS= runs them one at a time.
PYTEST_ARGS ?= -n 3 --dist loadfile

test: deps compile
	@scripts/start-postgres
	$(PY) -m pytest $(PYTEST_ARGS)

# ARGS=--forever keeps the worker (and the demo's clamd) running afterwards.
run: demo-deps compile
	@$(PY) -m spoolscan.demo $(ARGS)

# The parsers of untrusted input, 100,000 random examples per target (examples/s at the end).
fuzz: deps venv
	@scripts/start-postgres
	SPOOLSCAN_FUZZ_EXAMPLES=$${SPOOLSCAN_FUZZ_EXAMPLES:-100000} $(PY) -m pytest -q \
		-p no:cacheprovider tests/test_fuzz.py $(FUZZ_ARGS)

# The fault matrix at the issue's scale (200-message bursts, clamd stopped 30 s...), every
# row on SQLite and PostgreSQL; writes docs/reliability.md (ARGS=--rows sigkill --db sqlite).
faults: deps venv
	@scripts/start-postgres
	$(PY) bench/faults --output docs/reliability.md $(ARGS)

bench: compile
	@scripts/install-deps bench
	$(PY) bench/scan_maildir

# spoolscan(1) from the argument parser (tests/test_cli_docs.py checks it is current).
man: venv
	$(PY) -m spoolscan.manpage > docs/spoolscan.1

lint: venv
	$(VENV)/bin/ruff check spoolscan tests bench
	$(VENV)/bin/mypy spoolscan

clean:
	rm -rf $(VENV) build dist *.egg-info
