#!/usr/bin/env python3
"""One JSON line from a `famc bench --json` file: the given labels, then prefill and decode tokens/s
and peak RSS. Usage: bench_row.py BENCH.json [KEY=VALUE ...] (integer values stay integers)."""
import json
import sys

r = json.load(open(sys.argv[1]))["results"][0]["report"]
row = {}
for arg in sys.argv[2:]:
    key, value = arg.split("=", 1)
    row[key] = int(value) if value.isdigit() else value
row.update({
    "prefill_tok_s": round(r["prefill_tokens_per_s"], 1),
    "decode_tok_s": round(r["decode_tokens_per_s"], 2),
    "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1),
})
print(json.dumps(row))
