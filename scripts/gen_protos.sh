#!/usr/bin/env bash
# Regenerate the committed Python code for protos/sottovoce/v1/*.proto into common/proto/.
#
# Usage: scripts/gen_protos.sh [OUTPUT_DIR]   (default: common/proto, relative to the repo root)
#
# protoc's virtual path mapping (-Isottovoce/common/proto=protos/sottovoce/v1) makes the
# generated modules import each other as `sottovoce.common.proto...`, the name the package
# is installed under, with no post-processing. Needs grpcio-tools and mypy-protobuf
# (`pip install -e .[dev]`); PYTHON picks the interpreter (default: python on PATH).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-common/proto}"
python="${PYTHON:-python}"
bin_dir="$(dirname "$(command -v "$python")")"

for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
    if [[ ! -x "$bin_dir/$plugin" ]] && ! command -v "$plugin" >/dev/null; then
        echo "gen_protos: $plugin not found (install mypy-protobuf: pip install -e .[dev])" >&2
        exit 1
    fi
done
export PATH="$bin_dir:$PATH"

protos=()
for source in protos/sottovoce/v1/*.proto; do
    protos+=("sottovoce/common/proto/$(basename "$source")")
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m grpc_tools.protoc \
    -Isottovoce/common/proto=protos/sottovoce/v1 \
    --python_out="$work" \
    --grpc_python_out="$work" \
    --mypy_out="$work" \
    --mypy_grpc_out="$work" \
    "${protos[@]}"

mkdir -p "$out"
cp "$work"/sottovoce/common/proto/*.py "$work"/sottovoce/common/proto/*.pyi "$out"/
echo "gen_protos: wrote $(cd "$work/sottovoce/common/proto" && ls | tr '\n' ' ')to $out"
