# Lifeboat: the two commands are `make run` and `make test`.
#
# One cargo profile (`ci`: dependencies optimised, debug assertions on) for
# tests, chaos tests, benches and `make run`, and one target directory kept
# outside the clone, so RocksDB is compiled once per machine, not per clone.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/lifeboat/target
PROFILE := ci
BIN := $(CARGO_TARGET_DIR)/$(PROFILE)/lifeboat
DATA_DIR ?= lifeboat-data

# Debian packages the build and the tests need: libclang for RocksDB's
# bindings, a C++ compiler for RocksDB, and the real NBD clients the tests
# drive (qemu-img/qemu-io, nbdinfo/nbdcopy, nbdkit and fio for benchmarks).
DEBIAN_PACKAGES := libclang-dev clang g++ make qemu-utils libnbd-bin nbdkit fio

.PHONY: run test verify fix deps build bench bench-codec bench-nbd clean-data

deps:
	@missing=""; \
	for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing missing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null || \
	  { echo "make: could not install$$missing; install them and retry"; exit 1; }; \
	fi

build: deps
	cargo build --profile $(PROFILE) --bin lifeboat

# Start a local cluster in ./$(DATA_DIR) and print its endpoints (Ctrl-C stops it).
run: build
	$(BIN) up --data-dir $(DATA_DIR)

# The whole test suite. Chaos tests and `lifeboat up` tests run the binary.
test: deps
	cargo build --profile $(PROFILE) --bin lifeboat
	LIFEBOAT_BIN=$(BIN) cargo test --profile $(PROFILE) --workspace --no-fail-fast

verify: deps
	cargo fmt --all -- --check
	cargo clippy --profile $(PROFILE) --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --profile $(PROFILE) --workspace --no-deps
	$(MAKE) test

# The only target that rewrites files.
fix:
	cargo fmt --all
	cargo clippy --profile $(PROFILE) --workspace --all-targets --fix --allow-dirty

bench: bench-codec bench-nbd

bench-codec: deps
	cargo bench --profile $(PROFILE) -p lifeboat-benches --bench codec

bench-nbd: build
	cargo build --profile $(PROFILE) -p lifeboat-benches --bin nbd-load
	LIFEBOAT_BIN=$(BIN) $(CARGO_TARGET_DIR)/$(PROFILE)/nbd-load

clean-data:
	rm -rf $(DATA_DIR)
