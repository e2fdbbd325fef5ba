#!/usr/bin/env bash
# Soak: 1,000,000 tokens through `famc score` on tract and ONNX Runtime (release build). Each run
# must succeed (famc refuses non-finite logits, so success means every logit was finite), report a
# finite mean NLL, and peak at most 1.05x the RSS of a 20,000-token run of the same export.
# Usage: scripts/soak.sh [TOKENS]   (default 1000000; prints one line per run, then a verdict)
set -euo pipefail
cd "$(dirname "$0")/.."
long=${1:-1000000}
cargo build -q --release
famc=target/release/famc
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH=$($py -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')
  export ORT_DYLIB_PATH
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$famc export tests/data/hf-llama-tiny --block-len 64 --fam-len 4 --mem-blocks 2 --out "$work/export" 2>/dev/null
for n in 20000 "$long"; do
  $py -c "import random; random.seed($n); print(' '.join(str(random.randrange(256)) for _ in range($n)))" >"$work/ids-$n.txt"
done
fail=0
for backend in tract ort; do
  for n in 20000 "$long"; do
    start=$(date +%s.%N)
    $famc score "$work/export" --backend "$backend" --tokens "$work/ids-$n.txt" --json --quiet >"$work/$backend-$n.json"
    end=$(date +%s.%N)
    $py - "$work/$backend-$n.json" "$backend" "$n" "$start" "$end" <<'PY'
import json, math, sys
j = json.load(open(sys.argv[1]))
assert math.isfinite(j["mean_nll"]), j
print(json.dumps({"backend": sys.argv[2], "tokens": int(sys.argv[3]), "mean_nll": round(j["mean_nll"], 6),
                  "peak_rss_mib": round(j["peak_rss_bytes"] / 2**20, 1), "tokens_per_s": round(j["tokens_per_s"]),
                  "wall_s": round(float(sys.argv[5]) - float(sys.argv[4]), 1)}))
PY
  done
  ratio=$($py -c "import json; a=json.load(open('$work/$backend-20000.json')); b=json.load(open('$work/$backend-$long.json')); print(round(b['peak_rss_bytes']/a['peak_rss_bytes'], 4))")
  verdict=ok
  $py -c "import sys; sys.exit(0 if $ratio <= 1.05 else 1)" || { verdict=FAILED; fail=1; }
  echo "$backend: peak RSS at $long tokens / at 20000 tokens = $ratio (bound 1.05): $verdict"
done
exit $fail
