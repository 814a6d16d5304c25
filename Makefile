# Everything a fresh machine needs is installed from here and pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
# buf (lint and breaking-change checks for protos/) from the npm registry, into a project folder.
BUF_VERSION := 1.75.0
TOOLS  := .tools
BUF    := $(TOOLS)/node_modules/.bin/buf
# The Node caller of tests/api/test_node_client.py (@grpc/grpc-js, @grpc/proto-loader), from the
# npm registry into a cache folder. Without npm it is left out, and that test skips (fails on CI).
NODE_CALLER := $(TOOLS)/node-caller
NODE_DEPS   := $(NODE_CALLER)/node_modules/.package-lock.json
# PgBouncer for the tests behind a transaction-mode pooler (tests/support/pgbouncer.py): Debian's
# package, installed as root where apt-get is; elsewhere those tests skip (and fail on CI).
PGBOUNCER := /usr/sbin/pgbouncer
# promtool checks and unit-tests deploy/prometheus/, and the dashboard's test runs a real
# Prometheus (both from Debian's prometheus package, installed as root).
PROMTOOL := /usr/bin/promtool
# The container image (Containerfile): podman, else docker. BASE picks the base image (the
# Containerfile's default: a slim Python image). The machine's CA bundle goes to the build as a
# secret, for a network whose TLS to the package index needs it; it is in no layer.
ENGINE    ?= $(or $(shell command -v podman 2>/dev/null),$(shell command -v docker 2>/dev/null),podman)
IMAGE     ?= kara-sessions:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE      ?=
CA_BUNDLE ?= $(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt) /dev/null)
export CONTAINERS_CONF ?= $(CURDIR)/tests/image/containers.conf
# Clients in other languages (protos/buf.gen.yaml): its local plugins, and for test-clients the
# compilers and libraries the generated code is checked against, from Debian's packages (as root);
# protoc-gen-es is in the Node caller's packages. grpc-java's plugin is installed as
# grpc_java_plugin; buf.gen.yaml names it by grpc-java's own name, linked in .tools/bin.
CLIENT_PACKAGES := protobuf-compiler protoc-gen-go protoc-gen-go-grpc protobuf-compiler-grpc-java-plugin \
	golang-go golang-google-protobuf-dev golang-google-grpc-dev default-jdk-headless libprotobuf-java libgrpc-java
CLIENT_PATH     := $(CURDIR)/$(TOOLS)/bin:$(CURDIR)/$(NODE_CALLER)/node_modules/.bin:$(PATH)
# The API as released to clients: `buf breaking` compares protos/ with it. Move it forward (a
# full commit of main) when a release ships; a branch can compare with main instead:
# make lint BUF_AGAINST='.git\#branch=main,subdir=protos'
API_BASELINE ?= ed02b6fed7886825be1e19d6720dc2ca3e5cb748
BUF_AGAINST  ?= .git\#ref=$(API_BASELINE),subdir=protos,depth=10000

.DEFAULT_GOAL := help
.PHONY: help install gen docs run demo test test-bench test-client-install test-image image clients test-clients client-tools bench lint check clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

# Reinstall (which regenerates the protobuf code) whenever the project definition or a proto changes.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard protos/kara/sessions/v1/*.proto)
	@# setuptools says "Editable installation." on every editable build (a note, not a deprecation).
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e ".[server,dev]"
	@touch $@

install: $(STAMP) ## Create .venv, install the project and generate the gRPC code

gen: $(STAMP) ## Regenerate the gRPC code from protos/
	$(BIN)/python -c "import setup; setup.generate_protos()"

docs: $(STAMP) ## Regenerate docs/lifecycle.md from the state machines' transition tables
	$(BIN)/python -m kara_sessions_server.entrypoints.lifecycle_doc docs/lifecycle.md

run: $(STAMP) ## Serve on 127.0.0.1:50051 with SQLite in ./kara-sessions.db (ARGS="--database-url ..." to change)
	$(BIN)/kara-sessions serve $(ARGS)

demo: $(STAMP) ## Run the article's five scenarios, a programme's terms, then invoice the paid ones, on a throwaway server
	$(BIN)/kara-sessions demo

test: $(STAMP) $(NODE_DEPS) $(PGBOUNCER) $(PROMTOOL) ## Run the whole test suite (SQLite, and PostgreSQL when reachable; required when CI=true)
	$(BIN)/python -m pytest $(ARGS)

test-bench: $(STAMP) ## Run make bench end to end at tiny sizes (every part runs and reports; about a minute)
	$(BIN)/python -m pytest -m bench tests/operations/test_bench_smoke.py $(ARGS)

test-client-install: $(STAMP) ## Install just the client (no [server]) into a fresh venv; drive a server with it
	$(BIN)/python -m pytest -m client_install tests/install $(ARGS)

image: ## Build the container image $(IMAGE) with podman or docker (BASE=... picks the base image)
	@command -v $(ENGINE) >/dev/null 2>&1 || $(MAKE) --no-print-directory container-tools
	$(ENGINE) build --network host --secret id=ca,src=$(CA_BUNDLE) $(if $(BASE),--build-arg BASE=$(BASE)) \
		-t $(IMAGE) -f Containerfile .

test-image: $(STAMP) ## Build the image on a base made from Debian's packages, run it, stop it, restart it
	@command -v podman >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || $(MAKE) --no-print-directory container-tools
	$(BIN)/python -m pytest -m image tests/image $(ARGS)

# podman (with runc: see tests/image/containers.conf) and mmdebstrap, from Debian's packages.
container-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc mmdebstrap >/dev/null; \
	else echo "podman and mmdebstrap are needed (Debian: apt-get install podman runc mmdebstrap, as root)"; exit 1; fi

clients: $(BUF) $(NODE_DEPS) client-tools ## Generate Go, Java and TypeScript clients into gen/ (protos/buf.gen.yaml)
	PATH='$(CLIENT_PATH)' $(BUF) generate protos --template protos/buf.gen.yaml

test-clients: $(STAMP) $(BUF) $(NODE_DEPS) client-tools ## Generate the other languages' clients, compile Go's and Java's, call a server from TypeScript's
	$(BIN)/python -m pytest -m clients tests/clients $(ARGS)

client-tools:
	@missing=""; for p in $(CLIENT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "needed (Debian, as root): apt-get install$$missing"; exit 1; fi; \
	fi
	@mkdir -p $(TOOLS)/bin && ln -sf /usr/bin/grpc_java_plugin $(TOOLS)/bin/protoc-gen-grpc-java

bench: $(STAMP) ## Benchmark on this machine (about 12 min; ARGS="--duration 2 --json out.json" etc.)
	$(BIN)/python -m bench $(ARGS)

$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		mkdir -p $(NODE_CALLER) && cp tests/node/package.json tests/node/package-lock.json $(NODE_CALLER)/ && \
		npm ci --prefix $(NODE_CALLER) --no-audit --no-fund --silent; \
	else echo "npm not found: the Node client test will be skipped"; fi

$(PGBOUNCER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null; \
	else echo "pgbouncer not found and not root: the tests behind a pooler will be skipped"; fi

$(PROMTOOL):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "promtool not found and not root: install Debian's prometheus package"; exit 1; fi

$(BUF):
	npm install --prefix $(TOOLS) --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

lint: $(STAMP) $(BUF) $(PROMTOOL) ## ruff, mypy, the layer contracts, the records' fields, buf lint/breaking, the alerts' tests, the Kubernetes manifests
	$(BUF) lint protos
	$(BUF) breaking protos --against '$(BUF_AGAINST)'
	$(BIN)/ruff check server client tests bench setup.py
	$(BIN)/ruff format --check server client tests bench setup.py
	@# The in-memory unit of work too: mypy checks it keeps to the service layer's Protocols.
	$(BIN)/mypy server/kara_sessions_server client/kara_sessions_client bench tests/support/memory.py tests/service_layer
	$(BIN)/lint-imports
	@# Every field of every domain record is in its table row, stored snapshot and message.
	$(BIN)/python -m kara_sessions_server.entrypoints.records
	$(PROMTOOL) check rules deploy/prometheus/alerts.yaml
	cd deploy/prometheus && $(PROMTOOL) test rules alerts.test.yaml
	@# Rendered as `kubectl apply -k` would, then checked against Kubernetes' own schemas, offline.
	kubectl kustomize deploy/kubernetes > $(TOOLS)/kubernetes.yaml
	$(BIN)/kubernetes-validate --strict --quiet $(TOOLS)/kubernetes.yaml

check: lint test test-bench test-client-install test-clients test-image ## Everything CI runs

clean: ## Remove the virtualenv, generated code and caches
	rm -rf $(VENV) $(TOOLS) gen client/kara build *.egg-info .pytest_cache .mypy_cache .ruff_cache
