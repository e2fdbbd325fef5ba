#!/usr/bin/env bash
# Peak RSS of `famc score` against input length: FAM's memory must not grow with the stream.
# Usage: scripts/bench-memory.sh [backend]   (prints one JSON line per length)
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-tract}
cargo build -q --release
famc=target/release/famc
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$famc export tests/data/hf-llama-tiny --block-len 64 --fam-len 4 --mem-blocks 2 --out "$work/export" 2>/dev/null
for n in 20000 1000000; do
  python3 -c "import random; random.seed($n); print(' '.join(str(random.randrange(256)) for _ in range($n)))" >"$work/ids.txt"
  for run in 1 2 3; do
    $famc score "$work/export" --backend "$backend" --tokens "$work/ids.txt" --json --quiet |
      python3 -c "import json,sys; j=json.load(sys.stdin); print(json.dumps({'tokens': j['tokens'], 'run': $run, 'peak_rss_mib': round(j['peak_rss_bytes']/2**20, 1), 'tokens_per_s': round(j['tokens_per_s']), 'mean_nll': round(j['mean_nll'], 6)}))"
  done
done
