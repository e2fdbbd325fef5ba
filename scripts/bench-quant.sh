#!/usr/bin/env bash
# f32 against q8 and q4 weights on SmolLM2-135M (scripts/fetch-smollm2.sh), on ONNX Runtime
# (CPU; accuracy levels 4 and 1) and on tract, side by side in one run: export size, mean NLL / perplexity over
# tests/data/smollm2/long.txt (5,174 tokens), score throughput and peak RSS, and `famc bench`
# prefill and decode throughput. Release build.
# Usage: scripts/bench-quant.sh [BLOCK_LEN FAM_LEN MEM_BLOCKS]   (default 128 0 8)
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-128} F=${2:-0} M=${3:-8}
source scripts/smollm2-env.sh
weights=$(stat -c %s "$ckpt/model.safetensors")
for cfg in f32 q8:4 q8:1 q4:4 q4:1 tract:f32 tract:q8 tract:q4; do
  backend=ort
  if [ "${cfg%%:*}" = tract ]; then
    backend=tract
    cfg=${cfg#tract:}
  fi
  dtype=${cfg%%:*}
  level=${cfg#*:}
  [ "$dtype" = "$cfg" ] && level=4
  out="$work/$dtype-$level"
  $famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --dtype "$dtype" \
    --accuracy-level "$level" --out "$out" >/dev/null 2>&1
  bytes=$(du -sb "$out" | cut -f1)
  $famc score "$out" --backend "$backend" --text tests/data/smollm2/long.txt --json --quiet >"$work/score.json"
  $famc bench "$out" --backend "$backend" --tokens 512 --decode-tokens 32 --runs 3 --json "$work/bench.json" >/dev/null
  python3 - "$backend $cfg" "$bytes" "$weights" "$work/score.json" "$work/bench.json" <<'PY'
import json, math, sys
cfg, size, weights, score, bench = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = json.load(open(score))
b = json.load(open(bench))
r = b["results"][0]["report"]
print(json.dumps({
    "config": cfg, "export_bytes": size, "of_f32_checkpoint": round(size / weights, 3),
    "mean_nll": round(s["mean_nll"], 6), "ppl": round(math.exp(s["mean_nll"]), 3),
    "score_tok_s": round(s["tokens_per_s"], 1), "score_peak_rss_mib": round(s["peak_rss_bytes"] / 2**20, 1),
    "prefill_tok_s": round(r["prefill_tokens_per_s"], 1), "ms_per_block": round(r["ms_per_block"], 1),
    "decode_tok_s": round(r["decode_tokens_per_s"], 2), "bench_peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1),
}))
PY
done
