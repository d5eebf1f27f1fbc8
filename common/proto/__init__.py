"""Generated protobuf/gRPC code (do not edit; regenerate with `make protos` (scripts/gen_protos.sh))."""
