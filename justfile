# valet's tasks. Prerequisites: Rust, npm, `cargo install just`.

set shell := ["bash", "-euo", "pipefail", "-c"]

deno := "tools/deno/node_modules/@deno/linux-x64-glibc/deno"

# Install the pinned Deno from the npm registry (lockfile, no install scripts).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x {{deno}} ]; then
        npm ci --prefix tools/deno --ignore-scripts --no-audit --no-fund --loglevel=error
    fi
    {{deno}} --version | head -1

# Build valet.
build: setup
    cargo build --release -p valet-cli

# Start valet on an empty data dir and run the example val: blob, sqlite, email.
demo: build
    bash examples/demo.sh

# Every test: Rust (unit, store, API, runs, conformance) and the shims' own.
test: setup
    {{deno}} test --no-config --quiet --allow-net --allow-env runtime-js/
    cargo test --workspace --no-fail-fast
    cd tests/browser && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && node --test
    ./target/debug/valet conformance fixtures

# Benchmarks: token mint/verify, API under load, run overhead, a 3-minute soak.
bench: setup
    cargo bench -p valet-core --bench tokens
    cargo build --release -p valet-cli
    cargo bench -p valet-cli --bench system
    cargo bench -p valet-cli --bench soak

# Mixed load against a real `valet serve`; RSS, fds, Deno processes, p50/p99 per minute.
soak secs="180": setup
    VALET_SOAK_SECS={{secs}} cargo bench -p valet-cli --bench soak

# The fuzz targets' smoke run (corpus, regressions, bounded mutations); `cargo test` runs it too.
fuzz-smoke:
    cargo test -p valet-fuzz --test smoke

# Coverage-guided fuzzing with AFL++ on stable Rust (cargo-afl): every target for SECS seconds.
fuzz secs="120":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-afl >/dev/null || cargo install cargo-afl --locked --version 0.18.2
    # Builds AFL++'s runtime once; "already built" is fine.
    cargo afl config --build >/dev/null 2>&1 || true
    export CARGO_TARGET_DIR=target/afl AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
    export AFL_NO_UI=1 AFL_AUTORESUME=1
    cargo afl build --release -p valet-fuzz --features afl --bin afl-target
    status=0
    for corpus in fuzz/corpus/*/; do
        target=$(basename "$corpus")
        out=target/afl/findings/$target
        mkdir -p "$out"
        cargo afl fuzz -V {{secs}} -i "$corpus" -o "$out" -- target/afl/release/afl-target "$target" > "$out.log" 2>&1 || true
        execs=$(awk '/^execs_done/ {print $3}' "$out"/default/fuzzer_stats 2>/dev/null || echo "?")
        crashes=$(find "$out" -path '*/crashes/id:*' | wc -l)
        echo "$target: $execs executions, $crashes crashing inputs"
        if [ "$crashes" -gt 0 ]; then
            status=1
            find "$out" -path '*/crashes/id:*' | head -5 | sed 's/^/    /'
        fi
    done
    if [ "$status" -ne 0 ]; then
        echo "fix each crash, then copy its input into fuzz/regressions/<target>/ (the smoke run replays it)"
    fi
    exit $status

# Format check and clippy with warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Run the conformance fixtures with the release binary.
conformance: build
    ./target/release/valet --data-dir "$(mktemp -d)" conformance fixtures
