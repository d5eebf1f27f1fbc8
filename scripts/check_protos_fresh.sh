#!/usr/bin/env bash
# CI check: the committed code in common/proto/ is what scripts/gen_protos.sh makes now.
# Regenerates into a temporary directory and compares file by file; exits 1 if stale.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT

if ! log="$(scripts/gen_protos.sh "$fresh" 2>&1)"; then
    echo "$log" >&2
    echo "check_protos_fresh: could not regenerate the proto code (see above)" >&2
    exit 1
fi

stale=0
for generated in "$fresh"/*; do
    name="$(basename "$generated")"
    if ! cmp -s "$generated" "common/proto/$name"; then
        echo "check_protos_fresh: common/proto/$name is stale or missing" >&2
        stale=1
    fi
done
# A generated file whose .proto is gone is stale too.
for committed in common/proto/*_pb2*.py common/proto/*_pb2*.pyi; do
    [[ -e "$committed" ]] || continue
    if [[ ! -e "$fresh/$(basename "$committed")" ]]; then
        echo "check_protos_fresh: $committed has no .proto source any more" >&2
        stale=1
    fi
done
if [[ "$stale" -ne 0 ]]; then
    echo "check_protos_fresh: generated code is out of date; run scripts/gen_protos.sh and commit" >&2
    exit 1
fi
echo "check_protos_fresh: common/proto is fresh"
