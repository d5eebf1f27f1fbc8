# Sourced by docker/build.sh and docker/e2e.sh: a Docker engine of our own, stopped on every exit.
#
# Starts `dockerd` (as root) with its state under $SOTTOVOCE_DOCKER_ROOT (default
# build/docker/engine), its own socket and no iptables changes beyond its bridge, unless
# DOCKER_HOST already names an engine that answers (then that one is used and left alone).
# The EXIT/INT/TERM trap stops the daemon this script started, and only that one.

DOCKER_ROOT="${SOTTOVOCE_DOCKER_ROOT:-$ROOT/build/docker}"
ENGINE_DIR="$DOCKER_ROOT/engine"
STARTED_DOCKERD_PID=""

stop_engine() {
    if [ -n "$STARTED_DOCKERD_PID" ] && kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null; then
        echo "engine: stopping dockerd $STARTED_DOCKERD_PID" >&2
        kill -TERM "$STARTED_DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$STARTED_DOCKERD_PID" 2>/dev/null || true
    fi
    STARTED_DOCKERD_PID=""
    if [ "${HAD_DOCKER0:-1}" = 0 ] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0 2>/dev/null || true  # the bridge our dockerd made
    fi
}

start_engine() {
    if [ -n "${DOCKER_HOST:-}" ] && docker version >/dev/null 2>&1; then
        echo "engine: using the running engine at $DOCKER_HOST" >&2
        return 0
    fi
    command -v dockerd >/dev/null || { echo "error: no dockerd (apt-get install docker.io)" >&2; return 1; }
    [ "$(id -u)" = 0 ] || { echo "error: dockerd needs root" >&2; return 1; }
    mkdir -p "$ENGINE_DIR/data" "$ENGINE_DIR/exec"
    HAD_DOCKER0=1
    ip link show docker0 >/dev/null 2>&1 || HAD_DOCKER0=0
    export DOCKER_HOST="unix://$ENGINE_DIR/docker.sock"
    trap 'stop_engine' EXIT
    trap 'stop_engine; exit 130' INT
    trap 'stop_engine; exit 143' TERM
    dockerd --data-root "$ENGINE_DIR/data" --exec-root "$ENGINE_DIR/exec" \
        --host "$DOCKER_HOST" --pidfile "$ENGINE_DIR/dockerd.pid" \
        >"$ENGINE_DIR/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 1 120); do
        if docker version >/dev/null 2>&1; then
            echo "engine: dockerd $STARTED_DOCKERD_PID up at $DOCKER_HOST" >&2
            return 0
        fi
        kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    echo "error: dockerd did not start; see $ENGINE_DIR/dockerd.log" >&2
    tail -5 "$ENGINE_DIR/dockerd.log" >&2 || true
    return 1
}
