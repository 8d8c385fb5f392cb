# ws-gateway: `make demo` runs the service locally, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DJANGO_SETTINGS_MODULE := wsgateway.settings

.PHONY: help venv services test demo lint bench bench-sim migrate clean

help:
	@echo "make demo   - migrate, then run simulator, gateway, web, worker and beat locally"
	@echo "make test   - install what is needed and run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make .env   - write a local .env with a random DJANGO_SECRET_KEY (if there is none)"
	@echo "make bench  - benchmarks (simulator, publisher, gateway end to end)"

$(STAMP): requirements/base.txt requirements/dev.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

venv: $(STAMP)

# A local .env (never tracked: .gitignore) so manage.py, celery and flower work without exports.
# Written once with a random secret; an existing .env is never touched. Needs only bash, so
# `make .env` also serves a fresh clone before `docker compose up`.
.env:
	@umask 077 && { \
	  echo "# Written by make for this checkout: development values. Never commit it; .env.example lists every variable."; \
	  echo "DJANGO_SECRET_KEY=$$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 50)"; \
	  echo "LOG_FORMAT=console"; \
	} > $@
	@echo "wrote .env (a random DJANGO_SECRET_KEY and development values)"

# Start PostgreSQL, RabbitMQ and Redis when they do not answer (local machines and CI).
services:
	@bash .ci/services.sh

test: venv services .env
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

migrate: venv services .env
	DJANGO_DEBUG=true $(PY) manage.py migrate --noinput

demo: venv services .env
	DJANGO_DEBUG=true $(PY) manage.py demo

bench: venv services
	$(PY) -m tests.bench

bench-sim: venv services
	$(PY) -m tests.bench sim

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
