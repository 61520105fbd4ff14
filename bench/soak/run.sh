#!/usr/bin/env bash
# Soak run: a release build of syncgraph on one core, the soak client on the other, for
# each backend given (sqlite, postgres). Results (CSV of RSS over time, and the summary
# line) go to bench/soak/results/. Usage:
#   bench/soak/run.sh [minutes] [backends...]      e.g. bench/soak/run.sh 10 sqlite postgres
# PostgreSQL runs use a fresh database `syncgraph_soak` on SYNCGRAPH_TEST_POSTGRES's server.
set -euo pipefail
cd "$(dirname "$0")"
minutes="${1:-10}"; shift || true
backends=("${@:-sqlite}")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/syncgraph-target}"
(cd ../.. && cargo build --release --bin syncgraph)
bin="$CARGO_TARGET_DIR/release/syncgraph"
[ -d node_modules ] || npm ci --no-audit --no-fund
mkdir -p results
admin="${SYNCGRAPH_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
for backend in "${backends[@]}"; do
    case "$backend" in
        sqlite)
            dir="$(mktemp -d)"; url="sqlite://$dir/soak.db" ;;
        postgres)
            psql "$admin" -qc "DROP DATABASE IF EXISTS syncgraph_soak WITH (FORCE)" -c "CREATE DATABASE syncgraph_soak"
            url="${admin%/*}/syncgraph_soak" ;;
        *) echo "unknown backend $backend" >&2; exit 2 ;;
    esac
    port=$((18000 + RANDOM % 1000))
    taskset -c 0 "$bin" --listen "127.0.0.1:$port" --database-url "$url" \
        --auth-attempts-per-minute 100000 --jwt-secret soak-secret-soak-secret-soak-secret \
        2> "results/$backend-server.log" &
    server=$!
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
    set +e
    taskset -c 1 node soak.mjs --url "http://127.0.0.1:$port" --pid "$server" \
        --connections 100 --per-connection 100 --rate 20 --minutes "$minutes" \
        --out "results/$backend.csv" | tee "results/$backend.log"
    status=${PIPESTATUS[0]}
    set -e
    kill -TERM "$server"; wait "$server" || true
    echo "$backend: soak client exit $status"
done
