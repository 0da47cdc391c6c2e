# AUP Gateway. `make run` starts the demo, `make test` runs every test; both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Fast checks first: a style slip fails in seconds, before the suite.
format-check: $(STAMP)
	$(VENV)/bin/ruff format --check gateway tests bench

.PHONY: run demo test lint format-check bench certs check clean lock system-test-deps system-bench-deps

# Installs exactly what requirements.lock pins, every file checked against its hash; the gateway
# itself is then installed editable without dependencies (pyproject.toml keeps the ranges for
# library users; the lock is what the tests and the image run). See docs/development.md.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Re-resolves both locks from pyproject.toml's ranges against PyPI alone: the developer's pip
# configuration (find-links, extra indexes, mirrors) is set aside so the lock names no local
# paths and hashes only PyPI's files. The runtime lock (the Docker image) is constrained by the
# full one, so both pin the same versions. Pins already in the locks are kept where pyproject still
# allows them; `make lock LOCK_ARGS=--upgrade` moves every pin to the newest allowed release.
LOCK_ARGS ?=
LOCK_ENV := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock"
PIP_COMPILE := $(LOCK_ENV) $(VENV)-lock/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe
lock:
	test -x $(VENV)-lock/bin/pip-compile || { $(PYTHON) -m venv $(VENV)-lock && \
		$(LOCK_ENV) $(VENV)-lock/bin/pip install -q pip-tools; }
	$(PIP_COMPILE) $(LOCK_ARGS) --extra test -o requirements.lock pyproject.toml
	$(PIP_COMPILE) $(LOCK_ARGS) --constraint requirements.lock -o requirements-runtime.lock pyproject.toml

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
	rm -rf $(VENV) $(VENV)-lock .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
