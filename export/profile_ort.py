#!/usr/bin/env python3
"""Where ONNX Runtime spends a famc export's block and decode time, per operator family.

Usage: profile_ort.py EXPORT_DIR [RUNS] [THREADS]
Runs the block graph on one full block (block index 3, so memory and FAM are live) and the decode
graph on one token, RUNS times each after a warm-up, with ONNX Runtime's profiler on, and prints
for each graph the share of kernel time per family (attention, projections, MLP, head, norm and
rotary, masks and positions, copies, other) as one JSON line. Nodes are assigned to families by
the weights they read and by famc's name scopes (layers.N.attn.norm, .rope, .sdpa, head, …); nodes
ONNX Runtime fused keep the name of one of theirs. "top_ops" lists the costliest (family, operator)
pairs: ms per run, nodes per run, µs per node.
"""
import collections
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


COPIES = {"Concat", "Slice", "Transpose", "Reshape", "Where", "Expand", "Tile", "Gather", "Squeeze", "Unsqueeze", "Identity", "Cast", "Shape"}
PROJ = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


def weights_of(model):
    """Node name -> the names of the initializers it reads (projection and MLP matrices)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: [i for i in n.input if i in inits] for n in model.graph.node}


def family(node, op, weights):
    parts = node.split(".")
    w = " ".join(weights.get(node, []))
    if "head" in parts or "lm_head" in w:
        return "head"
    if any(p in w for p in PROJ):
        return "projections"
    if any(p in w for p in MLP):
        return "mlp"
    if "norm" in parts or "rope" in parts or op in ("RMSNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding"):
        return "norm/rotary"
    if "sdpa" in parts or op in ("Attention", "Softmax"):
        return "attention"
    if parts[0] in ("block", "decode"):
        return "masks/positions"
    if "mlp" in parts:
        return "mlp"
    if op in COPIES:
        return "copies"
    return "other"


def feeds_for(session, manifest, which):
    L = manifest["fam"]["block_len"]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        if i.name == "input_ids":
            n = L if which == "block" else 1
            feeds[i.name] = rng.integers(0, manifest["model"]["vocab_size"], size=(1, n), dtype=np.int64)
        elif i.name == "block_index":
            feeds[i.name] = np.array([3], dtype=np.int64)
        elif i.name == "position":
            feeds[i.name] = np.array([3 * L + L // 2], dtype=np.int64)
        else:
            feeds[i.name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return feeds


def profile(path, manifest, which, runs, threads):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"famc-profile-{which}")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(s, manifest, which)
    s.run(None, feeds)
    for _ in range(runs):
        s.run(None, feeds)
    trace = s.end_profiling()
    weights = weights_of(onnx.load(path, load_external_data=False))
    events = json.load(open(trace))
    os.remove(trace)
    per = collections.Counter()
    per_op = collections.Counter()
    nodes = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e["args"].get("op_name", "")
        fam = family(node, op, weights)
        key = f"{fam}/{op}"
        per[fam] += e["dur"]
        per_op[key] += e["dur"]
        nodes[key] += 1
    total = sum(per.values())
    return {
        "graph": which,
        "target": manifest.get("target", "opset17"),
        "ms_per_run": round(total / 1000 / (runs + 1), 2),
        "share": {k: round(v / total, 3) for k, v in per.most_common()},
        "top_ops": {
            k: [round(v / 1000 / (runs + 1), 3), nodes[k] // (runs + 1), round(v / nodes[k], 1)]
            for k, v in per_op.most_common(12)
        },
    }


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    export_dir = argv[1]
    runs = int(argv[2]) if len(argv) > 2 else 5
    threads = int(argv[3]) if len(argv) > 3 else 2
    manifest = json.load(open(os.path.join(export_dir, "famc.json")))
    for which in ("block", "decode"):
        f = manifest["graphs"].get(which)
        if f:
            print(json.dumps(profile(os.path.join(export_dir, f), manifest, which, runs, threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
