#!/usr/bin/env bash
# The Docker deployment end to end, on a real engine, against the same run done natively.
#
#   sudo docker/e2e.sh           # as root: it starts (and always stops) its own dockerd
#
# 1. Builds the images (docker/build.sh; SOTTOVOCE_SKIP_BUILD=1 reuses built ones).
# 2. Writes a short run on the tiny model (tiny-llama, 3 holders, every round waiting for
#    all three, full-split answers: the run is deterministic), its holders' folders
#    (`sottovoce federation`) and a CA with a certificate per party (`sottovoce certs`).
# 3. Runs docker/compose.yaml: a coordinator and three holders over mutual TLS on an
#    internal network; waits for the coordinator to finish and every holder to exit 0, and
#    checks the metrics read inside the coordinator's container against its journal.
# 4. Runs the same run natively (the same holder folders, copied before step 3, the same
#    certificates, `sottovoce server` + three `sottovoce client` over mTLS on loopback).
# 5. Exports both runs and compares the checkpoints byte for byte.
# Everything lands in build/docker/e2e/; the script exits non-zero unless the two match.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
SV=("$PY" -m sottovoce.cli)
# shellcheck source=docker/build.sh
. "$ROOT/docker/build.sh"
WORK="$DOCKER_ROOT/e2e"
COMPOSE=(docker-compose -f "$ROOT/docker/compose.yaml" -p sottovoce-e2e)
CONTAINER_UID=10001
TIMEOUT_S="${SOTTOVOCE_E2E_TIMEOUT_S:-900}"
started=$SECONDS

cleanup() {
    if [ -n "${DOCKER_HOST:-}" ] && docker version >/dev/null 2>&1; then
        "${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true
    fi
    for pid in ${NATIVE_PIDS:-}; do kill "$pid" 2>/dev/null || true; done
    stop_engine
}

write_run() {
    rm -rf "$WORK"
    mkdir -p "$WORK"
    cat >"$WORK/run.toml" <<'TOML'
# docker/e2e.sh: a short deterministic run on the tiny model.
[run]
name = "docker-e2e"
algorithm = "bboxer-1+lambda"
seed = 20261201
max_rounds = 16
bit_budget = 100.0

[model]
name = "tiny-llama"

[parametrization]
kind = "scale"
granularity = "channel"
patterns = ["model.norm.weight"]

[optimizer]
initial_step = 0.05
min_step = 0.001
max_step = 0.5
candidates = 3

[evaluation]
mode = "full"
batch_size = 16

[fitness]
prompt_template = "{text} ="   # the tiny model's byte tokenizer: one-token label words
label_words = ["0", "1"]

[server]
address = "0.0.0.0:50051"
min_holders = 3
quorum = 3
round_timeout_s = 300

[simulate]
holders = 3
train_size = 90
test_size = 30
dev_size = 30
TOML
    "${SV[@]}" federation --config "$WORK/run.toml" --out "$WORK/holders" >/dev/null
    cp -a "$WORK/holders" "$WORK/holders-native"  # the native run starts from the same ledgers
    "${SV[@]}" certs init --dir "$WORK/certs" >/dev/null
    "${SV[@]}" certs issue --dir "$WORK/certs" --name coordinator --host coordinator >/dev/null
    for h in holder-0 holder-1 holder-2; do
        "${SV[@]}" certs issue --dir "$WORK/certs" --name "$h" >/dev/null
    done
    mkdir -p "$WORK/runs"
    chown -R "$CONTAINER_UID:$CONTAINER_UID" "$WORK/holders" "$WORK/certs" "$WORK/runs"
}

run_compose() {
    export SOTTOVOCE_DIR="$WORK" SOTTOVOCE_CONFIG="$WORK/run.toml" SOTTOVOCE_MODEL=tiny-llama
    local up=$SECONDS
    if ! "${COMPOSE[@]}" up -d; then
        "${COMPOSE[@]}" logs --no-color >"$WORK/compose.log" 2>&1 || true
        echo "error: compose up failed; the containers' logs:" >&2
        tail -40 "$WORK/compose.log" >&2
        return 1
    fi
    local coordinator service id state
    coordinator="$("${COMPOSE[@]}" ps -q coordinator)"
    # Poll rather than block in `docker wait`: bash runs a trap only between commands.
    while [ "$(docker inspect -f '{{.State.Status}}' "$coordinator")" != exited ]; do
        if [ ! -s "$WORK/metrics-in-container.txt" ] \
            && grep -qs '"type":"finished"' "$WORK/runs/run/journal.jsonl"; then
            # The coordinator's metrics, read from inside its container (127.0.0.1 there; no
            # port is published and the network is internal, so nothing else can read them)
            # once the run is over (the tiny model's 16 rounds take about a second) while the
            # coordinator waits for its holders to leave and measures the public quality.
            docker exec "$coordinator" python3 -c \
                'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode())' \
                2>"$WORK/metrics-exec.err" | grep '^sottovoce_' >"$WORK/metrics-in-container.txt" || true
        fi
        for service in holder-0 holder-1 holder-2; do
            id="$("${COMPOSE[@]}" ps -q "$service")"
            state="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$id")"
            case "$state" in
                "exited 0 "*) ;;
                exited*) echo "error: $service gave up ($state)" >&2; _fail_compose; return 1 ;;
            esac
        done
        if [ $((SECONDS - up)) -gt "$TIMEOUT_S" ]; then
            echo "error: the coordinator did not finish in $TIMEOUT_S s" >&2
            _fail_compose
            return 1
        fi
        sleep 0.5
    done
    docker inspect -f '{{.State.ExitCode}}' "$coordinator" >"$WORK/coordinator.exit"
    local failed=0 code
    for service in holder-0 holder-1 holder-2; do
        id="$("${COMPOSE[@]}" ps -q "$service")"
        for _ in $(seq 1 60); do
            [ "$(docker inspect -f '{{.State.Status}}' "$id")" = exited ] && break
            sleep 2
        done
        code="$(docker inspect -f '{{.State.ExitCode}}' "$id")"
        echo "  $service exited $code" >&2
        [ "$code" = 0 ] || failed=1
    done
    "${COMPOSE[@]}" logs --no-color >"$WORK/compose.log" 2>&1
    check_metrics || failed=1
    echo "  coordinator exited $(cat "$WORK/coordinator.exit"); compose run took $((SECONDS - up)) s" >&2
    [ "$(cat "$WORK/coordinator.exit")" = 0 ] && [ "$failed" = 0 ]
}

# The metrics read in the container must say what the journal says: rounds and bits heard.
check_metrics() {
    local journal="$WORK/runs/run/journal.jsonl" metrics="$WORK/metrics-in-container.txt"
    if [ ! -s "$metrics" ]; then
        echo "error: the coordinator's metrics could not be read in its container:" >&2
        tail -3 "$WORK/metrics-exec.err" >&2 2>/dev/null || true
        return 1
    fi
    local figures
    figures="$("$PY" - "$journal" "$metrics" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rounds = [r for r in records if r["type"] == "round"]
bits = sum(r["bits"] for r in records if r["type"] == "answer")  # as RunState counts
scraped = {}
for line in open(sys.argv[2]):
    name, value = line.rsplit(" ", 1)
    scraped[name] = float(value)
ok = scraped.get("sottovoce_rounds_total") == len(rounds) and \
    abs(scraped.get("sottovoce_bits_heard_total", -1) - bits) < 1e-9
print(("ok" if ok else "MISMATCH") + f": journal {len(rounds)} rounds, {bits} bits; metrics "
      f"{scraped.get('sottovoce_rounds_total')} rounds, "
      f"{scraped.get('sottovoce_bits_heard_total')} bits")
PY
)"
    echo "  metrics in the container: $figures" >&2
    [ "${figures%%:*}" = ok ]
}

_fail_compose() {
    "${COMPOSE[@]}" logs --no-color >"$WORK/compose.log" 2>&1 || true
    echo "the containers' last lines (all in $WORK/compose.log):" >&2
    tail -30 "$WORK/compose.log" >&2
}

run_native() {
    local port
    port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    sed "s/^address = .*/address = \"127.0.0.1:$port\"/" "$WORK/run.toml" >"$WORK/run-native.toml"
    local native=$SECONDS
    "${SV[@]}" server --config "$WORK/run-native.toml" --run-dir "$WORK/runs-native/run" \
        --certs "$WORK/certs" --metrics-address off >"$WORK/native-server.log" 2>&1 &
    NATIVE_PIDS="$!"
    local clients=()
    for h in holder-0 holder-1 holder-2; do
        local folder="$WORK/holders-native/$h"
        "${SV[@]}" client --server "127.0.0.1:$port" --server-name coordinator \
            --data "$folder/data.jsonl" --policy "$folder/policy.toml" --holder-id "$h" \
            --certs "$WORK/certs" --model tiny-llama >"$WORK/native-$h.log" 2>&1 &
        clients+=("$!")
        NATIVE_PIDS="$NATIVE_PIDS $!"
    done
    local failed=0
    for pid in "${clients[@]}"; do wait "$pid" || failed=1; done
    wait "${NATIVE_PIDS%% *}" || failed=1
    NATIVE_PIDS=""
    echo "  native run took $((SECONDS - native)) s" >&2
    return "$failed"
}

set_traps() {
    trap cleanup EXIT
    trap 'cleanup; exit 130' INT
    trap 'cleanup; exit 143' TERM
}

main() {
    set_traps
    if [ "${SOTTOVOCE_SKIP_BUILD:-0}" = 1 ]; then
        start_engine
        set_traps  # start_engine's own traps stop only the engine
    else
        build_base_tar
        build_wheels
        start_engine
        set_traps
        build_images
    fi
    echo "e2e: writing the run, holders and certificates in $WORK" >&2
    write_run
    echo "e2e: docker-compose up (coordinator + 3 holders, mTLS, internal network)" >&2
    run_compose
    echo "e2e: the same run natively (sottovoce server + 3 clients, mTLS on loopback)" >&2
    run_native
    "${SV[@]}" export --run "$WORK/runs/run" --out "$WORK/export-docker" >&2
    "${SV[@]}" export --run "$WORK/runs-native/run" --out "$WORK/export-native" >&2
    echo "e2e: comparing the exported checkpoints" >&2
    # Byte for byte; the two runs' ids differ by design (a random nonce per run, so task ids
    # never repeat across runs), so the files that name the run are compared with the
    # Docker run's id written as the native one's.
    local same=1 native_id docker_id
    native_id="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$WORK/runs-native/run/run.json")"
    docker_id="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$WORK/runs/run/run.json")"
    for file in "$WORK"/export-native/*; do
        local name
        name="$(basename "$file")"
        if cmp -s "$file" "$WORK/export-docker/$name"; then
            echo "  identical: $name ($(stat -c %s "$file") bytes, sha256 $(sha256sum "$file" | cut -c1-16))"
        elif cmp -s "$file" <(sed "s/$docker_id/$native_id/g" "$WORK/export-docker/$name"); then
            echo "  identical but for the run id ($docker_id vs $native_id): $name"
        else
            echo "  DIFFERENT: $name"
            same=0
        fi
    done
    echo "e2e: done in $((SECONDS - started)) s" >&2
    [ "$same" = 1 ]
}

main "$@"
