# Two commands matter on a fresh clone: `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench chaos simulate demo demo-replicas clean dev-env promtool

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Development secrets for config.yaml, in an ignored .env (mode 600); kept, and
# completed when config.yaml needs a new one.
dev-env: $(STAMP)
	@$(BIN)/python -m listener.dev.devenv .env

# Runs the daemon with ./config.yaml; development secrets are generated into .env once.
run: dev-env
	@set -a && . ./.env && set +a && exec $(BIN)/listener run --config config.yaml

# The whole suite, chaos scenarios included (~4 min). Under CI=true a test that needs
# RabbitMQ (or promtool) fails when none is there.
test: $(STAMP) promtool
	$(BIN)/python -m pytest -q

# promtool checks and unit-tests the alert rules (tests/test_observability.py): taken
# from Debian's prometheus package, unpacked into the venv (no daemon is installed).
# Best effort: without it that test skips, and fails under CI=true.
promtool: $(BIN)/promtool
$(BIN)/promtool: | $(STAMP)
	@tmp=$$(mktemp -d) && (cd $$tmp && apt-get download prometheus >/dev/null 2>&1 \
	  && dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(BIN)/promtool) \
	  || echo "promtool: Debian's prometheus package could not be fetched; the alert rules test will skip"; \
	  rm -rf $$tmp

# Only the fault scenarios, then their table: scenario, acknowledged, delivered, lost,
# duplicates, time to recover. Exits 1 on any loss.
chaos: $(STAMP)
	@rm -f data/chaos-results.jsonl
	$(BIN)/python -m pytest -q -m chaos; status=$$?; \
	$(BIN)/python -m tests.chaos.report || status=1; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check listener handlers
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# Every provider config.yaml's sources point at on this machine (Layerx402, Token
# Terminal, Terrapin), accepting the keys in .env.
simulate: dev-env
	@set -a && . ./.env && set +a && exec $(BIN)/listener simulate config --config config.yaml

demo: dev-env
	@set -a && . ./.env && set +a && exec $(BIN)/listener demo --config config.yaml

# Three replicas (cluster.enabled) against the local RabbitMQ: who holds each unit, live,
# while one is killed and comes back.
demo-replicas: dev-env
	@set -a && . ./.env && set +a && exec $(BIN)/listener demo --config config.yaml --replicas 3 --seconds 30

# Not data/: the journal there may hold accepted events not yet published.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
