#!/usr/bin/env python3
"""Drives a famc export with Python's onnxruntime, written from docs/graph-contract.md alone.

Usage: run_contract.py EXPORT_DIR IDS_FILE OUT.npy
Reads whitespace-separated token ids, runs the block graph block by block with the state looped
between calls exactly as the contract says, and writes the float32 logits [T, V].
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def main(export_dir, ids_file, out_path):
    with open(os.path.join(export_dir, "famc.json")) as f:
        manifest = json.load(f)
    L = manifest["fam"]["block_len"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    block = ort.InferenceSession(os.path.join(export_dir, manifest["graphs"]["block"]), so, providers=["CPUExecutionProvider"])
    init_values = {}
    if manifest["graphs"].get("init"):
        init = ort.InferenceSession(os.path.join(export_dir, manifest["graphs"]["init"]), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in init.get_outputs()]
        init_values = dict(zip(names, init.run(None, {})))

    batch = 1
    state = {}
    for st in manifest["state"]:
        if st["init"]:
            value = init_values[st["init"]]
        else:
            value = np.zeros(st["shape"], dtype=np.float32)
        state[st["input"]] = np.broadcast_to(value, [batch] + st["shape"]).astype(np.float32)

    ids = np.array([int(w) for w in open(ids_file).read().split()], dtype=np.int64)
    outputs = [o.name for o in block.get_outputs()]
    tau = 0
    rows = []
    for start in range(0, len(ids), L):
        chunk = ids[start:start + L]
        feeds = {"input_ids": chunk[None, :], "block_index": np.array([tau] * batch, dtype=np.int64)}
        feeds.update(state)
        result = dict(zip(outputs, block.run(None, feeds)))
        rows.append(result["logits"][0])
        if len(chunk) == L:
            state = {st["input"]: result[st["output"]] for st in manifest["state"]}
            tau += 1
    logits = np.concatenate(rows, axis=0).astype(np.float32)
    np.save(out_path, logits)
    print(f"wrote {logits.shape} to {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
