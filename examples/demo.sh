#!/usr/bin/env bash
# The demo: valet on an empty data dir, running examples/visits.ts twice,
# then serving it as an http val. Run with `just demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
valet=./target/release/valet
data=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$data"' EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a user on an empty data dir ($data)"
$valet --data-dir "$data" user create demo --email demo@valet.localhost --tier pro >/dev/null 2>&1

say "valet run examples/visits.ts (twice): blob, sqlite, email, and a refused val:write"
$valet --data-dir "$data" run examples/visits.ts --user demo
$valet --data-dir "$data" run examples/visits.ts --user demo

say "a scoped API token for people (blob:read only), and what it may do"
token=$($valet --data-dir "$data" token create --user demo --name demo-reader --scopes "blob:read")
$valet --data-dir "$data" token list --user demo

say "valet serve, and the same val as a stored script run through the API"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$valet --data-dir "$data" val create --user demo --name visits --file examples/visits.ts >/dev/null
writer=$($valet --data-dir "$data" token create --user demo --name demo-writer --scopes "val:read val:write blob:read")
VALET_LOG=warn $valet --data-dir "$data" serve --listen "127.0.0.1:$port" --vals-listen 127.0.0.1:0 2>/dev/null &
server=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/.well-known/jwks.json" >/dev/null && break; sleep 0.1; done
val_id=$(curl -fs -H "Authorization: Bearer $writer" "http://127.0.0.1:$port/v1/vals" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
curl -fs -X POST -H "Authorization: Bearer $writer" "http://127.0.0.1:$port/v1/vals/$val_id/run" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("run", r["run_id"] + ":", r["outcome"]); print(r["logs"], end="")'
printf 'blob "visits" read with the blob:read token: '
curl -fs -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/blob/visits"; echo
printf 'and a write with it: '
curl -s -X POST -H "Authorization: Bearer $token" --data 0 "http://127.0.0.1:$port/v1/blob/visits"; echo
say "done"
