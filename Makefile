# streamops developer entry points. `make help` lists them.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
VENV := .dev/venv

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: dev-up dev-down
dev-up: ## Start what is missing of the local stack (Kafka, PostgreSQL, Redis)
	bash scripts/dev-up.sh

dev-down: ## Stop only what dev-up started
	bash scripts/dev-down.sh

.PHONY: build crds
build: ## Build every binary (debug)
	$(CARGO) build --workspace --bins

crds: ## Regenerate crds/streamconsumer.yaml and the chart's copy
	$(CARGO) run -q -p streamops-crds --bin crdgen crds/streamconsumer.yaml
	@if [ -d charts/streamops/crds ]; then cp crds/streamconsumer.yaml charts/streamops/crds/streamconsumer.yaml; fi

$(VENV)/.installed: scripts/requirements-validate.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r scripts/requirements-validate.txt
	touch $@

.PHONY: validate
validate: $(VENV)/.installed ## Validate manifests, examples and the chart offline
	$(VENV)/bin/python scripts/validate_manifests.py

.PHONY: alerts-test
alerts-test: $(VENV)/.installed ## Check and unit-test the chart's PrometheusRule with promtool (built once from Go modules)
	$(VENV)/bin/python scripts/alerts_test.py

.PHONY: test
test: dev-up cluster-build ## Run every test: unit, integration (broker, PostgreSQL, Redis), mock-API, real control plane, manifests
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	$(MAKE) --no-print-directory validate

.PHONY: lint
lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: demo
demo: dev-up ## Run all four handlers locally on sample data and print their results
	bash scripts/demo.sh

.PHONY: bench bench-autoscale bench-lag bench-scale
bench: dev-up ## Throughput and memory benchmarks, autoscaling latency, lag readings, operator at scale (release build)
	bash scripts/bench.sh
	$(MAKE) --no-print-directory bench-autoscale
	$(MAKE) --no-print-directory bench-lag
	$(MAKE) --no-print-directory bench-scale

bench-autoscale: dev-up ## Autoscaling latency: lag over the threshold -> replicas patched (release build)
	$(CARGO) bench -p streamops-operator --bench autoscale

bench-lag: dev-up ## Lag readings of 256 consumer groups one by one against in batches: wall time, operator and broker CPU (release build)
	$(CARGO) bench -p streamops-operator --bench lag_batch

bench-scale: dev-up ## Operator at 100/500/1,000 StreamConsumers on the local control plane with kwok: convergence, RSS, API requests, fail-over
	bash scripts/bench-scale.sh

-include mk/kind.mk
-include mk/cluster.mk
-include mk/local.mk

.PHONY: chaos chaos-short fuzz
chaos: dev-up ## Full fault-injection suite (1,000,000 messages; long)
	$(CARGO) build --release -p streamops-worker -p streamops-chaos
	target/release/streamops-chaos --profile full --worker-bin target/release/streamops-worker $(CHAOS_ARGS)

chaos-short: dev-up ## Short fault-injection suite (the same scenarios, fewer messages; runs in CI)
	$(CARGO) build -p streamops-worker -p streamops-chaos
	target/debug/streamops-chaos --profile short --worker-bin target/debug/streamops-worker

fuzz: ## Build (nightly) and run every cargo-fuzz target for FUZZ_SECONDS (default 60) each; crashes land in fuzz/artifacts/
	bash scripts/fuzz.sh
