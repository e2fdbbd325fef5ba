#!/usr/bin/env bash
# Serving on loopback with a real pretrained Llama (SmolLM2-135M): `famc serve` under
# export/load_test.py (tritonclient.http), N concurrent sequences of B one-block requests each,
# with batching (--max-batch-size 8) and one block at a time (--max-batch-size 1), each with the
# batching threads of $WORKERS (default "1 2": --batch-workers), side by side in one run, on tract
# and ONNX Runtime: throughput, p50/p99 latency per block, the server's peak RSS (VmHWM).
# Bounded: every run stops after its requests or 300 s. Release build.
# Usage: [WORKERS="1 2"] scripts/bench-serve.sh [SEQUENCES BLOCKS BLOCK_LEN FAM_LEN MEM_BLOCKS]   (default 8 4 128 16 2)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-8} B=${2:-4} L=${3:-128} F=${4:-16} M=${5:-2}
WORKERS=${WORKERS:-1 2}
source scripts/smollm2-env.sh
$famc export "$ckpt" --block-len "$L" --fam-len "$F" --mem-blocks "$M" --out "$work/export" >/dev/null
vocab=$(python3 -c "import json; print(json.load(open('$work/export/famc.json'))['model']['vocab_size'])")
echo "SmolLM2-135M, L=$L F=$F M=$M: $N sequences x $B blocks of $L tokens, $(nproc) cores"
for backend in tract ort; do
  for batch in 8 1; do
  for workers in $WORKERS; do
    $famc serve "$work/export" --backend "$backend" --addr 127.0.0.1:0 --max-batch-size "$batch" \
      --batch-workers "$workers" --batch-delay-us 2000 >"$work/serve.out" 2>"$work/serve.err" &
    pid=$!
    for _ in $(seq 600); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
    addr=$(grep -o '127.0.0.1:[0-9]*' "$work/serve.out" | head -n 1)
    printf '%-5s max-batch-size %s batch-workers %s: ' "$backend" "$batch" "$workers"
    .venv/bin/python export/load_test.py --url "$addr" --sequences "$N" --blocks "$B" --tokens "$L" \
      --vocab "$vocab" --max-seconds 300 --server-pid "$pid" || true
    kill -TERM "$pid"
    wait "$pid" || true
  done
  done
done
