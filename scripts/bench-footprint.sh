#!/usr/bin/env bash
# Disk and memory footprint on a real pretrained Llama (SmolLM2-135M, scripts/fetch-smollm2.sh):
# the checkpoint's safetensors size, the export directory's size, and the peak RSS (VmHWM, from
# /usr/bin/time -v) of `famc score` on tests/data/smollm2/long.txt, from the export and compiling
# the checkpoint in memory, on tract and ONNX Runtime. Release build.
# Usage: scripts/bench-footprint.sh [BLOCK_LEN FAM_LEN MEM_BLOCKS]   (default 128 0 8, the configuration of the issue that measured it first)
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-128} F=${2:-0} M=${3:-8}
source scripts/smollm2-env.sh
fam=(--block-len "$L" --fam-len "$F" --mem-blocks "$M")
weights=$(stat -c %s "$ckpt/model.safetensors")
echo "checkpoint model.safetensors: $weights bytes"
$famc export "$ckpt" "${fam[@]}" --out "$work/export" >/dev/null
echo "export: $(du -sb "$work/export" | cut -f1) bytes"
ls -l "$work/export" | awk 'NR > 1 { print "  " $5 "\t" $9 }'
peak() { # label, then the command
  local label=$1
  shift
  /usr/bin/time -v "$@" >"$work/out.json" 2>"$work/time.txt"
  local kib
  kib=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$work/time.txt")
  python3 - "$label" "$kib" "$weights" "$work/out.json" <<'EOF'
import json, sys
label, kib, weights, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
j = json.load(open(out))
print(f"{label}: peak RSS {kib / 1024:.1f} MiB = {kib * 1024 / weights:.2f}x the f32 weights; "
      f"{j['tokens']} tokens, mean NLL {j['mean_nll']:.6f}, {j['tokens_per_s']:.0f} tok/s")
EOF
}
for backend in tract ort; do
  peak "score from the export, $backend" \
    $famc score "$work/export" --backend "$backend" --text tests/data/smollm2/long.txt --json --quiet
  peak "score compiling the checkpoint, $backend" \
    $famc score "$ckpt" "${fam[@]}" --backend "$backend" --text tests/data/smollm2/long.txt --json --quiet
done
