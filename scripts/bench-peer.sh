#!/usr/bin/env bash
# famc against what users would run instead, side by side in one run on SmolLM2-135M
# (scripts/fetch-smollm2.sh), f32: transformers' eager and sdpa full-attention prefill, its
# KV-cache decode and export/fam_torch.py's FAM (export/bench_torch.py, in the torch venv
# .venv-train of export/requirements-train.txt), then `famc bench` on ONNX Runtime and tract with
# the target the in-memory compile picks for each (`ort`, `opset17`) at the same FAM configuration
# and lengths: prefill of TOKENS, decode of 32 tokens after it, medians of REPS runs (default 3).
# Each row carries its process's peak RSS (transformers: getrusage's maxrss after that row).
# ONLY=name,name passes --only to bench_torch.py (e.g. ONLY=sdpa_prefill,fam_torch_prefill at
# lengths where eager attention's [heads, T, T] scores do not fit in memory). Release build.
# Usage: scripts/bench-peer.sh [TOKENS BLOCK_LEN FAM_LEN MEM_BLOCKS THREADS]   (default 2048 512 64 2 2)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2048} L=${2:-512} F=${3:-64} M=${4:-2} T=${5:-2}
REPS=${REPS:-3}
source scripts/smollm2-env.sh
[ -x .venv-train/bin/python ] || { echo "error: no .venv-train (see export/requirements-train.txt)" >&2; exit 1; }
only=()
[ -n "${ONLY:-}" ] && only=(--only "$ONLY")
.venv-train/bin/python export/bench_torch.py "$ckpt" --threads "$T" --tokens "$N" --decode-context "$N" \
  --decode-tokens 32 --reps "$REPS" --block-len "$L" --fam-len "$F" --mem-blocks "$M" "${only[@]}" >"$work/torch.json"
for run in ort:ort tract:opset17; do
  backend=${run%%:*} target=${run#*:}
  $famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --target "$target" \
    --out "$work/$target" >/dev/null 2>&1
  $famc bench "$work/$target" --backend "$backend" --threads "$T" --tokens "$N" --decode-tokens 32 \
    --runs "$REPS" --json "$work/famc-$backend.json" >/dev/null
done
python3 - "$work" "$N" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
torch = {r["name"]: r for r in json.load(open(f"{work}/torch.json"))["results"]}
famc = {b: json.load(open(f"{work}/famc-{b}.json"))["results"][0]["report"] for b in ("ort", "tract")}
eager = torch.get("eager_prefill", {}).get("tok_per_s")
kv = torch.get("kv_decode_eager", {}).get("tok_per_s")
ratio = lambda x, base: f"{x / base:.2f}x" if base else "-"
print(f"| what | prefill tok/s ({n}) | of transformers eager | decode tok/s | of transformers KV decode (eager) | peak RSS (MiB) |")
print("|---|---|---|---|---|---|")
for name in ("eager_prefill", "sdpa_prefill", "fam_torch_prefill"):
    if name in torch:
        r = torch[name]
        print(f"| transformers {name} | {r['tok_per_s']:.0f} | {ratio(r['tok_per_s'], eager)} | | | {r['rss_mib_after']:.0f} |")
for name in ("kv_decode_eager", "kv_decode_sdpa"):
    if name in torch:
        r = torch[name]
        print(f"| transformers {name} | | | {r['tok_per_s']:.1f} | {ratio(r['tok_per_s'], kv)} | {r['rss_mib_after']:.0f} |")
for b, label in (("ort", "famc ONNX Runtime (ort)"), ("tract", "famc tract (opset17)")):
    r = famc[b]
    print(f"| {label} | {r['prefill_tokens_per_s']:.0f} | {ratio(r['prefill_tokens_per_s'], eager)} | "
          f"{r['decode_tokens_per_s']:.1f} | {ratio(r['decode_tokens_per_s'], kv)} | {(r.get('peak_rss_bytes') or 0) / 2**20:.0f} |")
print(json.dumps({"torch": list(torch.values()), "famc": famc}), file=sys.stderr)
PY
