#!/usr/bin/env bash
# The benchmark suite (BENCHMARKS.md): syncgraph on each backend and the ceiling server (the
# leanest graphql-transport-ws fan-out, bench/loadgen/src/bin/ceiling.rs), each driven by
# the same load generator (bench/loadgen). The server runs on core 0, the load generator on
# core 1. Every scenario gets a fresh server (and database).
#
#   bench/run.sh [scenario ...]     scenarios: fanout saturation sustained memory mutations
#                                   shapes topics sse live editors yjs-history bus
#                                   (default: all of them)
#   TARGETS="ceiling sqlite postgres" DURATION=10 bench/run.sh fanout
#
# Each run's JSON line is appended to bench/results/<target>.jsonl;
# `python3 bench/tables.py` turns the newest of each into BENCHMARKS.md's tables.
# PostgreSQL runs use a fresh database `syncgraph_bench` on SYNCGRAPH_TEST_POSTGRES's server.
set -euo pipefail
cd "$(dirname "$0")/.."
scenarios=("${@:-fanout saturation sustained memory mutations shapes topics sse live editors yjs-history bus}")
read -r -a scenarios <<< "${scenarios[*]}"
read -r -a targets <<< "${TARGETS:-ceiling sqlite postgres}"
duration="${DURATION:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/syncgraph-target}"
cargo build --release -p syncgraph -p loadgen
# SERVER_BIN (with COMMIT naming it) runs another build of the server, e.g. a baseline.
server_bin="${SERVER_BIN:-$CARGO_TARGET_DIR/release/syncgraph}"
ceiling_bin="$CARGO_TARGET_DIR/release/ceiling"
loadgen_bin="$CARGO_TARGET_DIR/release/loadgen"
editors_bin="$CARGO_TARGET_DIR/release/editors"
history_bin="$CARGO_TARGET_DIR/release/yjs-history"
bus_bin="$CARGO_TARGET_DIR/release/bus-load"
nats="${SYNCGRAPH_TEST_NATS:-nats://127.0.0.1:4222}"
admin="${SYNCGRAPH_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
results=bench/results
mkdir -p "$results"
# 10,000 connections need 10,000 descriptors on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 1048576 || true
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# Uncommitted changes (other than these results) are not that commit: say so.
if ! git diff --quiet HEAD -- . ':!bench/results' 2>/dev/null; then commit="$commit-dirty"; fi
commit="${COMMIT:-$commit}"

server_pid=""
port=""
data_dir=""

# fresh_database <target>: sets db_url to a new, empty database for sqlite or postgres (a
# SQLite file in a new $data_dir, which `stop` removes). Not in a subshell: it sets both.
fresh_database() {
    if [ "$1" = sqlite ]; then
        data_dir="$(mktemp -d)"
        db_url="sqlite://$data_dir/bench.db"
    else
        psql "$admin" -qc "DROP DATABASE IF EXISTS syncgraph_bench WITH (FORCE)" \
            -c "CREATE DATABASE syncgraph_bench" >/dev/null
        db_url="${admin%/*}/syncgraph_bench"
    fi
}

start() { # start <target>
    local target="$1"
    port=$((20000 + RANDOM % 20000))
    case "$target" in
        ceiling)
            taskset -c 0 "$ceiling_bin" --listen "127.0.0.1:$port" 2> "$results/$target-server.log" &
            ;;
        sqlite|postgres)
            fresh_database "$target"
            local url="$db_url"
            # One user holds every subscription and sends every write: lift the per-user,
            # per-socket and per-address limits, and the connection cap.
            RUST_LOG=warn taskset -c 0 "$server_bin" --listen "127.0.0.1:$port" --database-url "$url" \
                --jwt-secret bench-secret-bench-secret-bench-secret \
                --auth-attempts-per-minute 1000000 --max-subscriptions-per-user 10000000 \
                --max-operations-per-connection 1000000 --max-connections 1000000 \
                2> "$results/$target-server.log" &
            ;;
        *) echo "unknown target $target" >&2; exit 2 ;;
    esac
    server_pid=$!
    for _ in $(seq 1 150); do
        # Ours answering, not something else that already held the port.
        kill -0 "$server_pid" 2>/dev/null || { echo "$target exited at start" >&2; exit 1; }
        if curl -s -o /dev/null "http://127.0.0.1:$port/graphql" 2>/dev/null; then return; fi
        sleep 0.2
    done
    echo "$target did not start" >&2
    exit 1
}

stop() {
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
    if [ -n "$data_dir" ]; then rm -rf "$data_dir"; data_dir=""; fi
}
trap stop EXIT

# loadgen <target> <label> <topics> [args...]: one run against the started server.
loadgen() {
    local target="$1" label="$2" topics="$3"; shift 3
    local topic_args
    if [ "$target" = ceiling ]; then
        topic_args=(--topics "$(seq -s, -f 't%g' 0 $((topics - 1)))")
    else
        topic_args=(--setup-channels "$topics")
    fi
    local out
    out="$(taskset -c 1 "$loadgen_bin" --url "http://127.0.0.1:$port/graphql" --pid "$server_pid" \
        --label "$label" "${topic_args[@]}" "$@")"
    echo "$out" | grep -v '^JSON '
    echo "$out" | sed -n 's/^JSON //p' \
        | jq -c --arg target "$target" --arg commit "$commit" '. + {target: $target, commit: $commit, at: (now | todate)}' \
        >> "$results/$target.jsonl"
    last_json="$(echo "$out" | sed -n 's/^JSON //p')"
}

# record <target> <command...>: runs a benchmark binary that prints a `JSON {...}` line and
# keeps that line in the target's results.
record() {
    local target="$1"; shift
    local out
    out="$("$@")"
    echo "$out" | grep -v '^JSON '
    echo "$out" | sed -n 's/^JSON //p' \
        | jq -c --arg target "$target" --arg commit "$commit" '. + {target: $target, commit: $commit, at: (now | todate)}' \
        >> "$results/$target.jsonl"
}

# write_ceiling: the database's own limit for postMessage's statement, in the same run, on
# the database the mutations scenario just wrote to (its user and 64 channels): pgbench with
# prepared statements, 8 and 32 clients, the capture trigger as migrated. "notify" is how
# any other SQL client writes (the trigger NOTIFYs in its transaction); "no-notify" is how
# syncgraph's own connections write (`syncgraph.writer=on`, ARCHITECTURE.md, "The doorbell").
# Each result is a JSON line with label write-ceiling-<notify|no-notify>-<clients>.
write_ceiling() {
    local url="${admin%/*}/syncgraph_bench" script range author
    range="$(psql "$url" -Atc "SELECT min(channel_id) || ' ' || max(channel_id) || ' ' || user_id FROM channel_members GROUP BY user_id ORDER BY count(*) DESC LIMIT 1")"
    read -r cmin cmax author <<< "$range"
    script="$(mktemp)"
    cat > "$script" <<'SQL'
\set c random(:cmin, :cmax)
INSERT INTO messages (channel_id, author_id, body) SELECT :c, :a, 'pgbench' WHERE EXISTS (SELECT 1 FROM channel_members WHERE channel_id = :c AND user_id = :a) RETURNING *;
SQL
    local mode clients tps
    for mode in notify no-notify; do
        for clients in 8 32; do
            local options=""
            [ "$mode" = no-notify ] && options="-c syncgraph.writer=on"
            tps="$(PGOPTIONS="$options" taskset -c 1 pgbench -n -M prepared -f "$script" \
                -D cmin="$cmin" -D cmax="$cmax" -D a="$author" -c "$clients" -j 1 \
                -T "$duration" "$url" 2>&1 | sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p')"
            echo "write ceiling ($mode, $clients clients): $tps tps"
            jq -nc --arg name "write-ceiling-$mode-$clients" --argjson tps "${tps:-0}" \
                --argjson clients "$clients" --arg target postgres --arg commit "$commit" \
                '{label: $name, tps: $tps, clients: $clients, target: $target, commit: $commit, at: (now | todate)}' \
                >> "$results/postgres.jsonl"
        done
    done
    rm -f "$script"
}

for scenario in "${scenarios[@]}"; do
    for target in "${targets[@]}"; do
        echo "### $scenario on $target"
        case "$scenario" in
            fanout)
                start "$target"
                loadgen "$target" fanout 1 --connections 100 --subscriptions 10000 \
                    --rate 10 --duration "$duration"
                stop ;;
            saturation)
                start "$target"
                loadgen "$target" saturation 1 --connections 100 --subscriptions 10000 \
                    --rate 0 --duration "$duration"
                stop ;;
            shapes) # (f) saturation with 10,000 subscriptions of 1,000 distinct shapes
                start "$target"
                loadgen "$target" shapes 1 --connections 100 --subscriptions 10000 --shapes 1000 \
                    --subscription 'subscription($c: ID!) { s{shape}: messageEvents(channelId: $c) { cursor message { body } } }' \
                    --rate 0 --duration "$duration"
                stop ;;
            sse) # (a) and (b) over graphql-sse (a reserved stream per connection), and (b) gzip
                if [ "$target" = ceiling ]; then
                    echo "the ceiling server speaks WebSocket only"
                    continue
                fi
                start "$target"
                loadgen "$target" fanout-sse 1 --connections 100 --subscriptions 10000 \
                    --rate 10 --duration "$duration" --transport sse
                stop
                start "$target"
                loadgen "$target" saturation-sse 1 --connections 100 --subscriptions 10000 \
                    --rate 0 --duration "$duration" --transport sse
                stop
                start "$target"
                loadgen "$target" saturation-sse-gzip 1 --connections 100 --subscriptions 10000 \
                    --rate 0 --duration "$duration" --transport sse --gzip
                stop ;;
            live) # (h) 10,000 live queries of one shape, one change at a time; (i) 1,000
                  # distinct live queries over 1,000 channels, changes at 100/s; their memory
                if [ "$target" = ceiling ]; then
                    echo "the ceiling server has no live queries"
                    continue
                fi
                live_query='query($c: ID!) @live { channel(id: $c) { messages(last: 1) { edges { node { body } } } } }'
                start "$target"
                loadgen "$target" live-fanout 1 --connections 100 --subscriptions 10000 \
                    --subscription "$live_query" --live --rate 10 --duration "$duration"
                stop
                start "$target"
                loadgen "$target" live-distinct 1000 --connections 100 --subscriptions 1000 \
                    --subscription "$live_query" --live --rate 100 --publishers 8 --duration "$duration"
                stop
                start "$target"
                loadgen "$target" idle-live-queries 1000 --connections 100 --subscriptions 10000 \
                    --subscription "$live_query" --live --idle
                stop ;;
            editors) # co-editing: 100 y-websocket peers on one document, 5 updates/s each
                if [ "$target" = ceiling ]; then
                    echo "the ceiling server has no documents"
                    continue
                fi
                start "$target"
                record "$target" taskset -c 1 "$editors_bin" --url "http://127.0.0.1:$port" \
                    --pid "$server_pid" --editors 100 --rate 5 --duration "$duration"
                stop ;;
            yjs-history) # loading a document of 100,000 updates, with and without its snapshot
                if [ "$target" = ceiling ]; then
                    continue
                fi
                fresh_database "$target"
                record "$target" taskset -c 0 "$history_bin" --database-url "$db_url" \
                    --updates 100000
                stop ;;
            bus) # change_log rows read per change and commit-to-subscriber latency with 1,
                 # 2, 4 and 8 processes, each reading the log or following the bus
                if [ "$target" != postgres ]; then
                    continue
                fi
                for processes in 1 2 4 8; do
                    for mode in log bus; do
                        fresh_database postgres
                        bus_args=()
                        [ "$mode" = bus ] && bus_args=(--bus "$nats")
                        record postgres taskset -c 1 "$bus_bin" --server "$server_bin" \
                            --database-url "$db_url" --processes "$processes" "${bus_args[@]}" \
                            --rate 200 --duration "$duration"
                    done
                done ;;
            topics) # (g) saturation with 10,000 subscriptions over 100 topics
                start "$target"
                # 8 publishers, each with one change in flight: with one, (g) measured how
                # fast one client can write more than how fast 100 topics fan out.
                loadgen "$target" topics 100 --connections 100 --subscriptions 10000 \
                    --rate 0 --publishers 8 --duration "$duration"
                stop ;;
            sustained)
                for rate in 250 500 1000 2000 3000 4000 5000 6000 8000; do
                    start "$target"
                    loadgen "$target" "sustained-$rate" 100 --connections 100 --subscriptions 100 \
                        --rate "$rate" --publishers 64 --duration "$duration"
                    stop
                    p99="$(echo "$last_json" | jq '.latency.p99_ms // 1e9')"
                    achieved="$(echo "$last_json" | jq '.mutations_per_sec')"
                    if jq -en "$p99 > 100 or $achieved < 0.9 * $rate" >/dev/null; then
                        echo "sustained on $target: $rate/s not held (p99 $p99 ms, $achieved/s)"
                        break
                    fi
                done ;;
            memory)
                start "$target"
                loadgen "$target" idle-connections 1 --connections 10000 --subscriptions 0 --idle
                stop
                start "$target"
                loadgen "$target" idle-subscriptions 1 --connections 100 --subscriptions 10000 --idle
                stop ;;
            mutations)
                start "$target"
                loadgen "$target" mutations 64 --connections 0 --subscriptions 0 \
                    --rate 0 --publishers 64 --duration "$duration"
                stop
                if [ "$target" = postgres ]; then write_ceiling; fi ;;
            *) echo "unknown scenario $scenario" >&2; exit 2 ;;
        esac
    done
done
