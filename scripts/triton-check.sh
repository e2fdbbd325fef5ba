#!/usr/bin/env bash
# The real thing, on a machine with Docker and Triton Inference Server's container (not these CI
# machines: none can be installed offline). Exports the shipped tiny Llama with --triton, starts
# Triton on the repository, and runs export/triton_client.py against it: 6 sequences at once,
# whole blocks (the last padded), each compared with `famc run` on it alone (within 1e-4). Then
# the same client against `famc serve` on the same export, so both servers answer one client.
# Usage: scripts/triton-check.sh [STRATEGY]   (oldest or direct; TRITON_IMAGE overrides the image)
set -euo pipefail
cd "$(dirname "$0")/.."
strategy=${1:-oldest}
image=${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:25.10-py3}
bash scripts/setup-python.sh
cargo build -q --release --bin famc
famc=target/release/famc
work=$(mktemp -d)
container=""
trap '[ -n "$container" ] && docker rm -f "$container" >/dev/null; rm -rf "$work"' EXIT
L=8
$famc export tests/data/hf-llama-tiny --block-len $L --fam-len 2 --mem-blocks 2 --out "$work/export" \
  --triton "$work/repo" --triton-strategy "$strategy" --triton-max-batch-size 4
mkdir -p "$work/case"
python3 - "$work/case" <<'PY'
import random, sys
for k in range(6):
    r = random.Random(k)
    ids = [r.randrange(256) for _ in range(r.randint(9, 60))]
    open(f"{sys.argv[1]}/seq{k:02d}.txt", "w").write(" ".join(map(str, ids)))
PY
for f in "$work"/case/seq*.txt; do
  $famc run "$work/export" --tokens "$f" --logits-out "${f%.txt}.npy" 2>/dev/null
done
gpus=()
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi
container=$(docker run -d "${gpus[@]}" -p 18000:8000 -v "$work/repo":/models "$image" \
  tritonserver --model-repository=/models)
for _ in $(seq 300); do
  curl -sf localhost:18000/v2/models/famc/ready >/dev/null && break
  sleep 1
done
curl -sf localhost:18000/v2/models/famc/ready >/dev/null || { docker logs "$container" | tail -n 40; exit 1; }
echo "Triton ($image, $strategy):"
.venv/bin/python export/triton_client.py --url localhost:18000 --check "$work/case" --block $L
$famc serve "$work/export" --addr 127.0.0.1:0 >"$work/serve.out" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
echo "famc serve, the same client and requests:"
.venv/bin/python export/triton_client.py --url "$(grep -o '127.0.0.1:[0-9]*' "$work/serve.out")" \
  --check "$work/case" --block $L
kill -TERM $pid
wait $pid || true
