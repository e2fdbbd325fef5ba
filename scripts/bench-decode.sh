#!/usr/bin/env bash
# Decode of two famc builds side by side on SmolLM2-135M (scripts/fetch-smollm2.sh): BEFORE (a
# release famc of an earlier commit) against this checkout's release build, f32 and q4 weights on
# ONNX Runtime (CPU) and f32 on tract (tract's q4 took over 11 minutes for one `famc bench` at
# this configuration), at the speed issue's FAM configuration. Each build exports its
# own graphs; `famc bench` prefills TOKENS (memory full from the third block on) and decodes 32
# tokens after them, 3 runs each; the builds are interleaved REPS times so that a busy machine
# weighs on both alike, and the summary is the median over the repetitions. Release builds.
# Usage: BEFORE=/path/to/famc scripts/bench-decode.sh [BLOCK_LEN FAM_LEN MEM_BLOCKS THREADS REPS TOKENS]
#        (default 512 64 2 2 2 1536)
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-512} F=${2:-64} M=${3:-2} T=${4:-2} REPS=${5:-2} N=${6:-1536}
before=${BEFORE:?set BEFORE to the famc binary to compare with}
source scripts/smollm2-env.sh
for who in before after; do
  bin=$famc
  [ "$who" = before ] && bin=$before
  for dtype in f32 q4; do
    $bin export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --dtype "$dtype" \
      --out "$work/$who-$dtype" >/dev/null 2>&1
  done
done
for rep in $(seq "$REPS"); do
  for config in ort:f32 ort:q4 tract:f32; do
    backend=${config%%:*} dtype=${config#*:}
    for who in before after; do
      bin=$famc
      [ "$who" = before ] && bin=$before
      $bin bench "$work/$who-$dtype" --backend "$backend" --threads "$T" --tokens "$N" \
        --decode-tokens 32 --runs 3 --json "$work/bench.json" >/dev/null
      python3 scripts/bench_row.py "$work/bench.json" rep="$rep" build="$who" backend="$backend" dtype="$dtype" | tee -a "$work/runs.jsonl"
    done
  done
done
python3 - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print("| backend | weights | decode tok/s before | decode tok/s after | ratio | prefill tok/s before | after |")
print("|---|---|---|---|---|---|---|")
for backend, dtype in (("ort", "f32"), ("ort", "q4"), ("tract", "f32")):
        med = {}
        for who in ("before", "after"):
            rs = [r for r in runs if (r["backend"], r["dtype"], r["build"]) == (backend, dtype, who)]
            med[who] = {k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "prefill_tok_s")}
        b, a = med["before"], med["after"]
        print(f"| {backend} | {dtype} | {b['decode_tok_s']:.1f} | {a['decode_tok_s']:.1f} | "
              f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x | {b['prefill_tok_s']:.0f} | {a['prefill_tok_s']:.0f} |")
PY
