# AUP Gateway. `make run` starts the demo, `make test` runs every test; both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Fast checks first: a style slip fails in seconds, before the suite.
format-check: $(STAMP)
	$(VENV)/bin/ruff format --check gateway tests bench

.PHONY: run demo test lint format-check bench certs check clean system-test-deps system-bench-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run demo: $(STAMP)
	$(PY) -m gateway demo --config gateway.yaml

certs: $(STAMP)
	$(PY) -m gateway certs --out certs

check: $(STAMP)
	$(PY) -m gateway check --config gateway.yaml

# Installs redis-server, chromium, nginx, promtool and the client programs of the compatibility
# suite (curl, Java 17, node and npm, JAX-WS) from Debian's packages when missing (as root), then
# runs the whole suite; the suite installs npm's `soap` into the virtualenv itself. Tests that
# need Redis start their own redis-server on a free port.
test: $(STAMP) system-test-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff format --check gateway tests bench
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

bench: $(STAMP) system-bench-deps
	$(PY) -m bench.run

system-test-deps:
	@bash .ci/system-deps redis-server:redis-server chromium:chromium nginx:nginx promtool:prometheus \
		curl:curl javac:openjdk-17-jdk-headless node:nodejs npm:npm \
		/usr/share/java/jaxws-rt.jar:libjaxws-java

system-bench-deps:
	@bash .ci/system-deps redis-server:redis-server nginx:nginx ab:apache2-utils

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
