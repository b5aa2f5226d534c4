# The README's commands. Every target creates and uses .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint bench bench-overhead bench-routing bench-index loadtest clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefix-router demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/prefix-router bench overhead
	$(BIN)/prefix-router bench routing

bench-overhead: $(STAMP)
	$(BIN)/prefix-router bench overhead

bench-routing: $(STAMP)
	$(BIN)/prefix-router bench routing

bench-index: $(STAMP)
	$(BIN)/prefix-router bench index

# Locust scenarios, headless and time-bounded, against a demo fleet it starts and stops.
LOADTEST_PORT ?= 18080
LOADTEST_USERS ?= 24
LOADTEST_RATE ?= 8
LOADTEST_TIME ?= 30s
loadtest: $(STAMP)
	BIN=$(BIN) LOADTEST_PORT=$(LOADTEST_PORT) LOADTEST_USERS=$(LOADTEST_USERS) \
	LOADTEST_RATE=$(LOADTEST_RATE) LOADTEST_TIME=$(LOADTEST_TIME) sh loadtest/run_locust.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
