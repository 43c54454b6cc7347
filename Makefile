# Switchyard: `make demo` runs the local demo, `make test` runs every test.
CARGO ?= cargo

.PHONY: all build test lint fmt crds demo demo-up demo-down e2e-vllm e2e-vllm-quality bench-quality bench-fairness

all: build

build:
	$(CARGO) build --workspace --bins

# The end-to-end tests start the real binaries: `cargo test --workspace`
# builds them (with the test build's features) before any test runs, so a
# separate `cargo build` would only compile the workspace a second time. The
# global rate-limit tests start their own redis-server (Debian's package).
test: test-deps
	$(CARGO) test --workspace

.PHONY: test-deps
test-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (the global rate-limit tests run a real Redis)"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
# The slow hostile-client probes (floods, parked and slow bodies, slowloris,
# huge fields), one at a time so memory is measured per probe, plus the fast
# ones again for their figures; prints the README's "Failure behaviour" rows
# (memory "after" a probe is read once RSS has settled: SWITCHYARD_FIGURES).
.PHONY: test-faults
test-faults:
	$(CARGO) build --workspace --bins
	SWITCHYARD_FIGURES=1 $(CARGO) test -p switchyard-e2e --no-fail-fast --test faults --test hostile_clients -- --include-ignored --test-threads 1 --nocapture 2>&1 \
		| tee target/test-faults.log | grep -E '^(FIGURE|test |test result)'

# 200,000 mixed requests through a release-built dataplane; prints RSS,
# descriptors, metric series and in-flight counts every 20,000 and fails on
# growth past warm-up. Not part of `make test` (a few minutes).
.PHONY: soak fuzz
soak:
	$(CARGO) build --release -p switchyard-dataplane -p switchyard-controller -p switchyard-e2e --bins
	$(CARGO) run --release -p switchyard-e2e --example soak

# A million generated inputs per fuzz harness (release build; stable Rust).
# `make test` runs the same harnesses on 5,000 inputs each.
fuzz:
	$(CARGO) run --release -p switchyard-fuzz -- --inputs $${FUZZ_INPUTS:-1000000}

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --workspace
	python3 scripts/import-cycles.py controller/src dataplane/src shared/runtime/src shared/snapshot/src shared/crd/src

fmt:
	$(CARGO) fmt --all

# Regenerates crds/ from the Rust types (a test fails when they drift).
crds:
	$(CARGO) run -q -p switchyard-controller --bin crdgen -- --write crds
	cp crds/*.yaml manifests/crds/

demo: build
	e2e/demo.sh run

demo-up: build
	e2e/demo.sh up

demo-down:
	e2e/demo.sh down

# Optional, not part of `make test`: two real vLLM engines (CPU build, ~6 GB
# download on first run), pods of one ModelServer, behind the controller
# (local mode) and a dataplane.
e2e-vllm: build
	e2e/vllm.sh check
# Optional, not part of `make test`; CPU-heavy (about 15 minutes, engines
# restarted cold for each of 6 runs): the scheduling-quality table on those
# two real engines, one and three dataplanes; fails if the default mix misses
# a target (hit rate >= 80%, busiest engine <= 60% of requests).
e2e-vllm-quality: build
	$(CARGO) build -p switchyard-e2e --example prefix_workload
	e2e/vllm.sh quality
# Scheduling quality benchmark (not part of `make test`): shared-prefix
# workloads against simulated engines; prints the README's results tables.
bench-quality: build
	$(CARGO) run -p switchyard-e2e --example bench_quality
# Fairness benchmark (not part of `make test`): a heavy and a light user on
# engines at capacity, FIFO vs VTC queueing, one and three dataplanes;
# prints the README's fairness table.
bench-fairness: build
	$(CARGO) run -p switchyard-e2e --example bench_fairness

# Benchmarks (not part of `make test`; loopback only, bounded in time, see README "Performance").
.PHONY: bench bench-scale
bench:
	$(CARGO) build --release -p switchyard-bench -p switchyard-controller -p switchyard-dataplane
	python3 bench/run.py $(BENCH_ARGS)
	taskset -c 1 $${CARGO_TARGET_DIR:-target}/release/switchyard-bench-hotpath | tee bench/results/hotpath.md

bench-scale:
	$(CARGO) build --release -p switchyard-bench -p switchyard-dataplane
	$${CARGO_TARGET_DIR:-target}/release/switchyard-bench-scale \
		--dataplane-bin $${CARGO_TARGET_DIR:-target}/release/switchyard-dataplane \
		--output bench/results/bench-scale.md $(BENCH_SCALE_ARGS)
