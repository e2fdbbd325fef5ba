#!/usr/bin/env bash
# Targets side by side on SmolLM2-135M (scripts/fetch-smollm2.sh), on ONNX Runtime (CPU) and tract,
# in one run: `famc bench` prefill over 2,048 tokens and decode of 32 after it (medians of 3 runs
# each), at the speed issue's configuration, the targets interleaved REPS times so that a busy
# machine weighs on all alike; the summary is the median over the repetitions, and each target's
# ratio to the first one. tract skips the targets it refuses (ort). Release build.
# Usage: scripts/bench-targets.sh [BLOCK_LEN FAM_LEN MEM_BLOCKS THREADS REPS]   (default 512 64 2 2 3)
# Environment: TARGETS (default "opset17 opset23 ort"), DTYPE (default f32), BACKENDS (default "ort tract").
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-512} F=${2:-64} M=${3:-2} T=${4:-2} REPS=${5:-3}
TARGETS=${TARGETS:-opset17 opset23 ort} DTYPE=${DTYPE:-f32} BACKENDS=${BACKENDS:-ort tract}
source scripts/smollm2-env.sh
for target in $TARGETS; do
  $famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --target "$target" \
    --dtype "$DTYPE" --out "$work/$target" >/dev/null 2>&1
done
for rep in $(seq "$REPS"); do
  for backend in $BACKENDS; do
    for target in $TARGETS; do
      [ "$backend" = tract ] && [ "$target" = ort ] && continue
      $famc bench "$work/$target" --backend "$backend" --threads "$T" --tokens 2048 --decode-tokens 32 \
        --runs 3 --json "$work/bench.json" >/dev/null
      python3 scripts/bench_row.py "$work/bench.json" rep="$rep" target="$target" backend="$backend" dtype="$DTYPE" | tee -a "$work/runs.jsonl"
    done
  done
done
python3 - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
keys = ("prefill_tok_s", "decode_tok_s", "peak_rss_mib")
for backend in dict.fromkeys(r["backend"] for r in runs):
    med = {}
    for target in dict.fromkeys(r["target"] for r in runs if r["backend"] == backend):
        rs = [r for r in runs if r["backend"] == backend and r["target"] == target]
        med[target] = {k: statistics.median(r[k] for r in rs) for k in keys}
    base = next(iter(med))
    print(json.dumps({"backend": backend, "median": med, f"over_{base}": {
        t: {k: round(m[k] / med[base][k], 3) for k in keys[:2]} for t, m in med.items() if t != base}}))
PY
