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
	@echo "make bench  - benchmarks (simulator, publisher, gateway end to end)"

$(STAMP): requirements/base.txt requirements/dev.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Start PostgreSQL, RabbitMQ and Redis when they do not answer (local machines and CI).
services:
	@bash .ci/services.sh

test: venv services
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

migrate: venv services
	DJANGO_DEBUG=true $(PY) manage.py migrate --noinput

demo: venv services
	DJANGO_DEBUG=true $(PY) manage.py demo

bench: venv services
	$(PY) -m tests.bench

bench-sim: venv services
	$(PY) -m tests.bench sim

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
