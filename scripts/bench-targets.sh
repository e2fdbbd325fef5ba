#!/usr/bin/env bash
# The opset17 and opset23 targets side by side on SmolLM2-135M (scripts/fetch-smollm2.sh), on ONNX
# Runtime (CPU) and tract, in one run: `famc bench` prefill over 2,048 tokens and decode of 32
# after it (medians of 3 runs each), at the speed issue's configuration, the targets interleaved
# REPS times so that a busy machine weighs on both alike; the summary is the median over the
# repetitions. Release build.
# Usage: scripts/bench-targets.sh [BLOCK_LEN FAM_LEN MEM_BLOCKS THREADS REPS]   (default 512 64 2 2 3)
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-512} F=${2:-64} M=${3:-2} T=${4:-2} REPS=${5:-3}
source scripts/smollm2-env.sh
for target in opset17 opset23; do
  $famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --target "$target" \
    --out "$work/$target" >/dev/null 2>&1
done
for rep in $(seq "$REPS"); do
  for backend in ort tract; do
    for target in opset17 opset23; do
      $famc bench "$work/$target" --backend "$backend" --threads "$T" --tokens 2048 --decode-tokens 32 \
        --runs 3 --json "$work/bench.json" >/dev/null
      python3 scripts/bench_row.py "$work/bench.json" rep="$rep" target="$target" backend="$backend" | tee -a "$work/runs.jsonl"
    done
  done
done
python3 - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for backend in ("ort", "tract"):
    med = {}
    for target in ("opset17", "opset23"):
        rs = [r for r in runs if r["backend"] == backend and r["target"] == target]
        med[target] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib")}
    print(json.dumps({"backend": backend, "median": med,
        "opset23_over_opset17": {k: round(med["opset23"][k] / med["opset17"][k], 3) for k in ("prefill_tok_s", "decode_tok_s")}}))
PY
