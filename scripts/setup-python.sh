#!/usr/bin/env bash
# Creates .venv with the Python tooling famc's checks use (onnx, onnxruntime, numpy, gguf, safetensors, tritonclient), once.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import onnx, onnxruntime, numpy, gguf, safetensors.numpy, tritonclient.http, tritonclient.grpc.model_config_pb2; assert onnxruntime.__version__ == '1.31.1'" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -r export/requirements.txt
fi
