# valet's tasks. Prerequisites: Rust, npm, `cargo install just`.

set shell := ["bash", "-euo", "pipefail", "-c"]

deno := "tools/deno/node_modules/@deno/linux-x64-glibc/deno"

# The Python environment that runs the e2e tests' SMTP server (aiosmtpd) and
# S3-compatible server (moto).
test_venv := justfile_directory() / "target/test-venv"

# tests/e2e/support.rs starts aiosmtpd with this Python.
export VALET_TEST_PYTHON := test_venv / "bin/python"

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
test: setup test-deps
    {{deno}} test --no-config --quiet --allow-net --allow-env runtime-js/
    cargo test --workspace --no-fail-fast
    # The API suite and the single-node suites with real runs again, on
    # PostgreSQL (the cluster's store).
    # (`--workspace`, so the build above is reused as it is.)
    VALET_TEST_DATABASE=postgres cargo test --workspace --test api
    VALET_TEST_DATABASE=postgres cargo test --workspace --test e2e -- api:: runs:: trust:: hot::
    cd tests/browser && CHROMIUM="${CHROMIUM:-$(command -v chromium)}" node --test
    cd tests/sdk && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && node --test
    ./target/debug/valet conformance fixtures

# What the tests need beyond Rust and npm, each installed only when missing:
# aiosmtpd (pinned, hash-checked) in target/test-venv, Debian's chromium and
# postgresql, and the browser tests' npm packages. As root it installs Debian's packages;
# otherwise it names the package to install and stops.

# Install what the tests need beyond Rust and npm (skips what is there).
test-deps: _test-venv _chromium _postgresql _browser-packages

# A venv with tools/test-deps/requirements.txt; remade when that file changes.
_test-venv:
    #!/usr/bin/env bash
    set -euo pipefail
    venv="{{test_venv}}"
    req=tools/test-deps/requirements.txt
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" = "$want" ] \
        && "$venv/bin/python" -c 'import aiosmtpd, moto.server, flask_cors' 2>/dev/null; then
        exit 0
    fi
    # Debian's python3 makes venvs only with its python3-venv package.
    if ! made="$(python3 -m venv --clear "$venv" 2>&1)"; then
        if [ "$(id -u)" != 0 ]; then
            echo "$made" >&2
            echo "error: python3 cannot create a virtual environment; install Debian's" \
                "python3-venv package (sudo apt-get install python3-venv), then run" \
                "'just test-deps' again" >&2
            exit 1
        fi
        echo "test-deps: installing Debian's python3-venv" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        python3 -m venv --clear "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        --require-hashes --only-binary=:all: -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
    echo "test-deps: aiosmtpd $("$venv/bin/python" -c 'import aiosmtpd; print(aiosmtpd.__version__)') in $venv" >&2

# Debian's chromium for the browser tests (or the one $CHROMIUM names).
_chromium:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -n "${CHROMIUM:-}" ]; then
        [ -x "$CHROMIUM" ] && exit 0
        echo "error: CHROMIUM=$CHROMIUM is not an executable" >&2
        exit 1
    fi
    command -v chromium >/dev/null 2>&1 && exit 0
    if [ "$(id -u)" != 0 ]; then
        echo "error: the browser tests need chromium; install Debian's chromium" \
            "package (sudo apt-get install chromium), then run 'just test' again" >&2
        exit 1
    fi
    echo "test-deps: installing Debian's chromium" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Debian's PostgreSQL server binaries for the cluster tests, which start their
# own server (crates/valet-testkit) from initdb and postgres on PATH or in
# /usr/lib/postgresql/N/bin (or $VALET_TEST_PG_BIN).
_postgresql:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -n "${VALET_TEST_PG_BIN:-}" ]; then
        [ -x "$VALET_TEST_PG_BIN/initdb" ] && exit 0
        echo "error: VALET_TEST_PG_BIN=$VALET_TEST_PG_BIN has no initdb" >&2
        exit 1
    fi
    command -v initdb >/dev/null 2>&1 && exit 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
    if [ "$(id -u)" != 0 ]; then
        echo "error: the cluster tests need PostgreSQL's server binaries; install Debian's" \
            "postgresql package (sudo apt-get install postgresql), then run 'just test' again" >&2
        exit 1
    fi
    echo "test-deps: installing Debian's postgresql" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql

# playwright-core for the browser tests, from their lockfile.
_browser-packages:
    #!/usr/bin/env bash
    set -euo pipefail
    cd tests/browser
    if ! cmp -s package-lock.json node_modules/.installed-lock.json; then
        npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
        cp package-lock.json node_modules/.installed-lock.json
    fi

# The official Val Town SDK (pinned) and vals in the hosted docs' style, against a real valet.
test-sdk: setup
    cargo build -p valet-cli
    cd tests/sdk && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && node --test

# Benchmarks: token mint/verify, API under load, run overhead, SQLite against
# PostgreSQL (and S3) per request, a 3-minute soak. The backends bench uses
# PostgreSQL and moto as `just test-deps` installs them, and skips what is missing.
bench: setup
    cargo bench -p valet-core --bench tokens
    cargo build --release -p valet-cli
    cargo bench -p valet-cli --bench system
    cargo bench -p valet-cli --bench http
    cargo bench -p valet-cli --bench backends
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
