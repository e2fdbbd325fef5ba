#!/usr/bin/env python3
"""A KServe v2 client for FAM sequences, written with Triton's own client (tritonclient.http).

The same requests run against `famc serve EXPORT_DIR` and against Triton Inference Server serving
the repository of `famc export --triton REPO`: one sequence per `sequence_id`, the first request
with `sequence_start`, the last with `sequence_end`; the server keeps the FAM state in between.

    # one sequence, in chunks of 5 tokens (famc serve takes any count; Triton one block of L)
    python export/triton_client.py --url 127.0.0.1:8000 --ids ids.txt --chunk 5 --out logits.npy

    # many sequences at once, interleaved, each compared with its expected logits (.npy)
    python export/triton_client.py --url 127.0.0.1:8000 --check CASE_DIR --chunk random

CASE_DIR holds seqNN.txt (whitespace-separated ids) and seqNN.npy ([T, V] float32, e.g. from
`famc run`). `--block L` sends whole blocks of L tokens, the last padded, as Triton needs.
Prints one JSON line with the largest difference; exits 1 if it is over --tol.
"""
import argparse
import glob
import json
import os
import random
import sys
import threading

import numpy as np
import tritonclient.http as http


def chunks(n, how, block, rng):
    """Cuts n tokens into request sizes: fixed, random (1..2L+3), or whole blocks."""
    out, i = [], 0
    while i < n:
        if block:
            k = block
        elif how == "random":
            k = rng.randint(1, 2 * 16 + 3)
        else:
            k = int(how)
        out.append((i, min(n, i + k)))
        i += k
    return out


def run_sequence(url, model, seq_id, ids, how="64", block=0, seed=0, pause=None):
    """Sends a sequence's ids request by request; returns its logits [T, V]."""
    client = http.InferenceServerClient(url=url, connection_timeout=120, network_timeout=600)
    rng = random.Random(seed)
    parts = chunks(len(ids), how, block, rng)
    rows = []
    for r, (a, b) in enumerate(parts):
        piece = np.asarray(ids[a:b], dtype=np.int64)
        if block and len(piece) < block:
            piece = np.concatenate([piece, np.zeros(block - len(piece), dtype=np.int64)])
        x = http.InferInput("input_ids", [1, len(piece)], "INT64")
        x.set_data_from_numpy(piece.reshape(1, -1))
        out = http.InferRequestedOutput("logits", binary_data=True)
        res = client.infer(
            model,
            [x],
            outputs=[out],
            sequence_id=seq_id,
            sequence_start=(r == 0),
            sequence_end=(r == len(parts) - 1),
        )
        logits = res.as_numpy("logits")[0]
        rows.append(logits[: b - a])
        if pause:
            pause()
    client.close()
    return np.concatenate(rows, axis=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--model", default="famc")
    ap.add_argument("--ids", help="one sequence's ids")
    ap.add_argument("--out", help="where to write that sequence's logits (.npy)")
    ap.add_argument("--check", help="a directory of seqNN.txt / seqNN.npy run concurrently")
    ap.add_argument("--chunk", default="64", help="tokens per request, or 'random'")
    ap.add_argument("--block", type=int, default=0, help="send whole blocks of this many tokens (Triton)")
    ap.add_argument("--sequence-id", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    if args.ids:
        with open(args.ids) as f:
            ids = [int(t) for t in f.read().split()]
        logits = run_sequence(args.url, args.model, args.sequence_id, ids, args.chunk, args.block)
        if args.out:
            np.save(args.out, logits.astype(np.float32))
        print(json.dumps({"tokens": len(ids), "shape": list(logits.shape)}))
        return 0

    cases = sorted(glob.glob(os.path.join(args.check, "seq*.txt")))
    if not cases:
        sys.exit(f"{args.check}: no seqNN.txt files")
    results, errors = {}, []
    # a barrier after each request interleaves the sequences' requests on the server
    barrier = threading.Barrier(len(cases), timeout=300)

    def pause():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass

    def worker(k, path):
        try:
            with open(path) as f:
                ids = [int(t) for t in f.read().split()]
            got = run_sequence(args.url, args.model, 1000 + k, ids, args.chunk, args.block, seed=k, pause=pause)
            want = np.load(path[:-4] + ".npy")
            if got.shape != want.shape:
                raise AssertionError(f"{path}: logits {got.shape}, expected {want.shape}")
            results[path] = float(np.max(np.abs(got - want)))
        except Exception as e:  # reported below, with the sequence
            errors.append(f"{path}: {e!r}")
        finally:
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k, p)) for k, p in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worst = max(results.values()) if results else float("inf")
    print(json.dumps({"sequences": len(cases), "ok": len(results), "max_abs_diff": worst, "errors": errors}))
    return 0 if not errors and worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
