#!/usr/bin/env python3
"""A bounded load test of a KServe v2 FAM server (`famc serve`, or Triton on a famc repository).

N sequences at once, each sending B requests of T tokens (T = L: one block per request), through
tritonclient.http. Stops after the last request or after --max-seconds, whichever comes first.
Prints one JSON line: requests, tokens/s, latency per request (p50, p99, ms), the server's peak
RSS when --server-pid is given (VmHWM), and the server's batching counters when it has them.

    python export/load_test.py --url 127.0.0.1:8000 --sequences 8 --blocks 4 --tokens 128 --vocab 49152
"""
import argparse
import json
import sys
import threading
import time
import urllib.request

import numpy as np
import tritonclient.http as http


def vmhwm_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--model", default="famc")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, required=True, help="tokens per request")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    deadline = time.monotonic() + args.max_seconds
    latencies, errors = [], []
    lock = threading.Lock()
    go = threading.Barrier(args.sequences)

    def worker(k):
        rng = np.random.default_rng(args.seed + k)
        client = http.InferenceServerClient(url=args.url, connection_timeout=600, network_timeout=600)
        go.wait()
        for b in range(args.blocks):
            if time.monotonic() > deadline:
                break
            ids = rng.integers(0, args.vocab, size=(1, args.tokens), dtype=np.int64)
            x = http.InferInput("input_ids", list(ids.shape), "INT64")
            x.set_data_from_numpy(ids)
            t0 = time.monotonic()
            try:
                client.infer(
                    args.model,
                    [x],
                    outputs=[http.InferRequestedOutput("logits", binary_data=True)],
                    sequence_id=50_000 + k,
                    sequence_start=(b == 0),
                    sequence_end=(b == args.blocks - 1),
                )
            except Exception as e:  # counted and reported
                with lock:
                    errors.append(repr(e))
                break
            with lock:
                latencies.append(time.monotonic() - t0)
        client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.sequences)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    wall = time.monotonic() - t0
    lat = np.asarray(latencies) * 1000
    report = {
        "sequences": args.sequences,
        "requests": len(latencies),
        "tokens_per_request": args.tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(len(latencies) * args.tokens / wall, 1) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "errors": errors[:5],
        "timed_out": time.monotonic() > deadline,
    }
    if args.server_pid:
        report["server_peak_rss_mib"] = vmhwm_mib(args.server_pid)
    try:
        with urllib.request.urlopen(f"http://{args.url}/v2/models/{args.model}/stats", timeout=10) as r:
            s = json.load(r)["model_stats"][0]
            report["server"] = {k: s.get(k) for k in ("execution_count", "blocks_run", "largest_batch")}
    except Exception:
        pass
    print(json.dumps(report))
    return 0 if not errors and len(latencies) == args.sequences * args.blocks else 1


if __name__ == "__main__":
    sys.exit(main())
