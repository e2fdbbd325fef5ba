#!/usr/bin/env bash
# famc against what users would run instead, side by side in one run on SmolLM2-135M
# (scripts/fetch-smollm2.sh), f32, 2 threads: transformers' eager and sdpa full-attention prefill,
# its KV-cache decode and export/fam_torch.py's FAM (export/bench_torch.py, in the torch venv
# .venv-train of export/requirements-train.txt), then `famc bench` on ONNX Runtime (opset23, what
# the in-memory compile picks there) and tract (opset17) at the same FAM configuration and lengths:
# prefill of TOKENS, decode of 32 tokens after it, medians of 3 runs. Release build.
# Usage: scripts/bench-peer.sh [TOKENS BLOCK_LEN FAM_LEN MEM_BLOCKS THREADS]   (default 2048 512 64 2 2)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2048} L=${2:-512} F=${3:-64} M=${4:-2} T=${5:-2}
source scripts/smollm2-env.sh
[ -x .venv-train/bin/python ] || { echo "error: no .venv-train (see export/requirements-train.txt)" >&2; exit 1; }
.venv-train/bin/python export/bench_torch.py "$ckpt" --threads "$T" --tokens "$N" --decode-context "$N" \
  --decode-tokens 32 --reps 3 --block-len "$L" --fam-len "$F" --mem-blocks "$M" >"$work/torch.json"
for target in opset17 opset23; do
  $famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --target "$target" \
    --out "$work/$target" >/dev/null 2>&1
done
for run in ort:opset23 tract:opset17; do
  backend=${run%%:*} target=${run#*:}
  $famc bench "$work/$target" --backend "$backend" --threads "$T" --tokens "$N" --decode-tokens 32 \
    --runs 3 --json "$work/famc-$backend.json" >/dev/null
done
python3 - "$work" "$N" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
torch = {r["name"]: r for r in json.load(open(f"{work}/torch.json"))["results"]}
famc = {b: json.load(open(f"{work}/famc-{b}.json"))["results"][0]["report"] for b in ("ort", "tract")}
eager = torch["eager_prefill"]["tok_per_s"]
kv = torch["kv_decode_eager"]["tok_per_s"]
print(f"| what | prefill tok/s ({n}) | of transformers eager | decode tok/s | of transformers KV decode (eager) |")
print("|---|---|---|---|---|")
for name in ("eager_prefill", "sdpa_prefill", "fam_torch_prefill"):
    r = torch[name]
    print(f"| transformers {name} | {r['tok_per_s']:.0f} | {r['tok_per_s'] / eager:.2f}x | | |")
for name in ("kv_decode_eager", "kv_decode_sdpa"):
    r = torch[name]
    print(f"| transformers {name} | | | {r['tok_per_s']:.1f} | {r['tok_per_s'] / kv:.2f}x |")
for b, label in (("ort", "famc ONNX Runtime (opset23)"), ("tract", "famc tract (opset17)")):
    r = famc[b]
    print(f"| {label} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_tokens_per_s'] / eager:.2f}x | "
          f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / kv:.2f}x |")
print(json.dumps({"torch": list(torch.values()), "famc": famc}), file=sys.stderr)
PY
