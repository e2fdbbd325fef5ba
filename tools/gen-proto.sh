#!/usr/bin/env bash
# Regenerates src/onnx/generated.rs from proto/onnx.proto3.
# proto/onnx.proto3 is onnx/onnx v1.22.0's onnx/onnx.proto3, unmodified.
# Needs only cargo: the generator uses protox (a pure-Rust protobuf compiler).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo run --quiet --release --manifest-path "$root/tools/gen-proto/Cargo.toml" -- "$root"
