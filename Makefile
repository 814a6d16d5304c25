# Everything a fresh machine needs is installed from here and pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install gen docs run demo test bench lint check clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

# Reinstall (which regenerates the protobuf code) whenever the project definition or a proto changes.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard protos/kara/sessions/v1/*.proto)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP) ## Create .venv, install the project and generate the gRPC code

gen: $(STAMP) ## Regenerate the gRPC code from protos/
	$(BIN)/python -c "import setup; setup.generate_protos()"

docs: $(STAMP) ## Regenerate docs/lifecycle.md from the state machines' transition tables
	$(BIN)/python -m kara_sessions_server.entrypoints.lifecycle_doc docs/lifecycle.md

run: $(STAMP) ## Serve on 127.0.0.1:50051 with SQLite in ./kara-sessions.db (ARGS="--database-url ..." to change)
	$(BIN)/kara-sessions serve $(ARGS)

demo: $(STAMP) ## Run the article's five scenarios, then invoice the paid ones, on a throwaway server
	$(BIN)/kara-sessions demo

test: $(STAMP) ## Run the whole test suite (SQLite, and PostgreSQL when reachable; required when CI=true)
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP) ## Benchmark on this machine (about 6 min; ARGS="--duration 2 --json out.json" etc.)
	$(BIN)/python -m bench $(ARGS)

lint: $(STAMP) ## ruff, mypy and the layer contracts (lint-imports) on the project's own code
	$(BIN)/ruff check server client tests bench setup.py
	$(BIN)/ruff format --check server client tests bench setup.py
	$(BIN)/mypy server/kara_sessions_server client/kara_sessions_client bench
	$(BIN)/lint-imports

check: lint test ## Everything CI runs

clean: ## Remove the virtualenv, generated code and caches
	rm -rf $(VENV) client/kara build *.egg-info .pytest_cache .mypy_cache .ruff_cache
