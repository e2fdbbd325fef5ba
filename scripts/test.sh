#!/usr/bin/env bash
# The whole test suite: sets up the Python tooling and the ONNX Runtime library, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-python.sh
ORT_DYLIB_PATH="$(.venv/bin/python -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')"
export ORT_DYLIB_PATH
export FAMC_PYTHON="$PWD/.venv/bin/python"
export FAMC_REQUIRE_PYTHON=1 FAMC_REQUIRE_ORT=1
# A real pretrained Llama for tests/smollm2.rs: downloaded (93 MB) and converted once per cache.
FAMC_SMOLLM2="$(bash scripts/fetch-smollm2.sh | tail -n 1)"
export FAMC_SMOLLM2 FAMC_REQUIRE_SMOLLM2=1
cargo test --all-targets -- --test-threads=2
