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

# The official Val Town SDK (pinned) and vals in the hosted docs' style, against a real valet.
test-sdk: setup
    cargo build -p valet-cli
    cd tests/sdk && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && node --test

# Benchmarks: token mint/verify, API under load, run overhead.
bench: setup
    cargo bench -p valet-core --bench tokens
    cargo build --release -p valet-cli
    cargo bench -p valet-cli --bench system

# Format check and clippy with warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Run the conformance fixtures with the release binary.
conformance: build
    ./target/release/valet --data-dir "$(mktemp -d)" conformance fixtures
