# Lifeboat: the two commands are `make run` and `make test`.
#
# One cargo profile (`ci`: dependencies optimised, debug assertions on) for
# tests, chaos tests and `make run`, another (`perf`: optimised, no debug
# assertions) for the end-to-end benchmarks, and one target directory kept
# outside the clone, so RocksDB is compiled once per machine and profile,
# not per clone.
#
# Every cargo command here selects the whole workspace with all targets:
# building a subset (`-p store`, `--bin lifeboat`) unifies the features of
# build-time crates differently, which changes bindgen's fingerprint and
# recompiles RocksDB from scratch (20+ minutes on two cores).

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/lifeboat/target
PROFILE := ci
CARGO_ALL := --profile $(PROFILE) --workspace --all-targets
BIN := $(CARGO_TARGET_DIR)/$(PROFILE)/lifeboat
DATA_DIR ?= lifeboat-data
# The load generators drive what an operator runs: an optimised build.
BENCH_PROFILE := perf
BENCH_DIR := $(CARGO_TARGET_DIR)/$(BENCH_PROFILE)
BENCH_BIN := $(BENCH_DIR)/lifeboat

# Debian packages the build and the tests need: libclang for RocksDB's
# bindings, a C++ compiler for RocksDB, the real NBD clients the tests
# drive (qemu-img/qemu-io, nbdinfo/nbdcopy, nbdkit and fio for benchmarks)
# and the real S3 clients (restic, rclone).
DEBIAN_PACKAGES := libclang-dev clang g++ make qemu-utils libnbd-bin nbdkit fio restic rclone
# aws-cli and boto3 may come from pip rather than Debian: each package is
# installed only when its command (or Python module) is missing.
#   command-or-module:package
TOOL_PACKAGES := aws:awscli python3:python3 boto3:python3-boto3

.PHONY: run test verify fix deps build build-bench bench bench-codec bench-nbd bench-replicated bench-pgs bench-etcd bench-s3 bench-history clean-data

# Installs the Debian packages in the shell variable $missing, if any,
# saying so.
INSTALL_MISSING = if [ -n "$$missing" ]; then \
	  echo "make: installing missing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null || \
	  { echo "make: could not install$$missing; install them and retry"; exit 1; }; \
	fi

# Installs those of the Debian packages $(1) that are missing, saying so.
define apt_install
	@missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(INSTALL_MISSING)
endef

deps:
	$(call apt_install,$(DEBIAN_PACKAGES))
	@missing=""; \
	for pair in $(TOOL_PACKAGES); do \
	  tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  case $$tool in \
	    boto3) python3 -c 'import boto3' >/dev/null 2>&1 || missing="$$missing $$pkg" ;; \
	    *) command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg" ;; \
	  esac; \
	done; \
	$(INSTALL_MISSING)

build: deps
	cargo build $(CARGO_ALL)

# Always the same selection, so the `perf` build of RocksDB is reused.
build-bench: deps
	cargo build --profile $(BENCH_PROFILE) -p lifeboat-cli -p lifeboat-benches --bins

# Start a local cluster in ./$(DATA_DIR) and print its endpoints (Ctrl-C stops it).
run: build
	$(BIN) up --data-dir $(DATA_DIR)

# The whole test suite. Chaos tests and `lifeboat up` tests run the binary.
# Ends with one summary line over every test binary ("tests: N passed, N
# failed"): cargo's own last line belongs to the last binary only.
TEST_LOG := $(CARGO_TARGET_DIR)/make-test.log
test: build
	@set -o pipefail; \
	LIFEBOAT_BIN=$(BIN) cargo test --profile $(PROFILE) --workspace --no-fail-fast 2>&1 | tee $(TEST_LOG); \
	status=$$?; \
	awk '/^test result:/ { passed += $$4; failed += $$6 } \
	     END { printf "tests: %d passed, %d failed\n", passed, failed }' $(TEST_LOG); \
	exit $$status

verify: deps
	cargo fmt --all -- --check
	cargo clippy $(CARGO_ALL) -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --profile $(PROFILE) --workspace --no-deps
	$(MAKE) test

# The only target that rewrites files.
fix:
	cargo fmt --all
	cargo clippy $(CARGO_ALL) --fix --allow-dirty

bench: bench-codec bench-nbd bench-replicated bench-pgs bench-etcd bench-s3 bench-history

bench-codec: build
	cargo bench --profile $(PROFILE) --workspace --bench codec

bench-nbd: build-bench
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/nbd-load

bench-pgs: build-bench
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/pg-scale --pgs 500 --seconds 20

# 4 KiB durable writes beside a three-member etcd cluster (Debian's
# etcd-server, installed for this benchmark only).
bench-etcd: build-bench
	$(call apt_install,etcd-server)
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/durable-writes --seconds 10 --rounds 2

# S3 PUT/GET beside s3s-fs (the reference, installed for this benchmark
# only, at the version this Rust builds).
bench-s3: build-bench
	@command -v s3s-fs >/dev/null || { echo "make: installing s3s-fs 0.14.1 (cargo install)"; \
	  cargo install s3s-fs@0.14.1 --locked --features binary; }
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/s3-load --seconds 8

# Snapshot creation against data size, volume and bucket clones to first
# read, reads after ten overwrites (read amplification), GC, on one node.
bench-history: build-bench
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/history

bench-replicated: build-bench
	LIFEBOAT_BIN=$(BENCH_BIN) $(BENCH_DIR)/nbd-load --replicated --seconds 8 --size-mib 512 --lag-seconds 20

clean-data:
	rm -rf $(DATA_DIR)
