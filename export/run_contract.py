#!/usr/bin/env python3
"""Drives a famc export with Python's onnxruntime, written from docs/graph-contract.md alone.

Usage: run_contract.py EXPORT_DIR IDS_FILE OUT.npy
Reads whitespace-separated token ids, runs the block graph block by block with the state looped
between calls exactly as the contract says, binding every tensor by its role in famc.json's
`contract`, and writes the float32 logits [T, V].
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort


NEXT = {"fam": "next_fam", "mem_k": "next_mem_k", "mem_v": "next_mem_v"}


def key(io):
    """What a tensor is, by famc.json's contract: its role and layer (never its name or position)."""
    return io["role"], io.get("layer")


def main(export_dir, ids_file, out_path):
    with open(os.path.join(export_dir, "famc.json")) as f:
        manifest = json.load(f)
    contract = manifest["contract"]
    L = manifest["fam"]["block_len"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    block = ort.InferenceSession(os.path.join(export_dir, manifest["graphs"]["block"]), so, providers=["CPUExecutionProvider"])
    init_values = {}
    if manifest["graphs"].get("init"):
        init = ort.InferenceSession(os.path.join(export_dir, manifest["graphs"]["init"]), so, providers=["CPUExecutionProvider"])
        outs = contract["init"]["outputs"]
        init_values = {key(io): v for io, v in zip(outs, init.run([io["name"] for io in outs], {}))}

    batch = 1
    state = {}
    for io in contract["block"]["inputs"]:
        role, layer = key(io)
        if role not in NEXT:
            continue
        shape = io["shape"][1:]
        value = init_values[("init_fam", layer)] if role == "fam" else np.zeros(shape, dtype=np.float32)
        state[(role, layer)] = np.broadcast_to(value, [batch] + shape).astype(np.float32)

    ids = np.array([int(w) for w in open(ids_file).read().split()], dtype=np.int64)
    outputs = contract["block"]["outputs"]
    tau = 0
    rows = []
    for start in range(0, len(ids), L):
        chunk = ids[start:start + L]
        given = {"input_ids": chunk[None, :], "block_index": np.array([tau] * batch, dtype=np.int64)}
        feeds = {}
        for io in contract["block"]["inputs"]:
            role, layer = key(io)
            feeds[io["name"]] = given[role] if role in given else state[(role, layer)]
        result = {key(io): v for io, v in zip(outputs, block.run([io["name"] for io in outputs], feeds))}
        rows.append(result[("logits", None)][0])
        if len(chunk) == L:
            state = {(role, layer): result[(NEXT[role], layer)] for role, layer in state}
            tau += 1
    logits = np.concatenate(rows, axis=0).astype(np.float32)
    np.save(out_path, logits)
    print(f"wrote {logits.shape} to {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
