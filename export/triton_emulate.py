#!/usr/bin/env python3
"""Emulates Triton Inference Server's sequence batcher on a `famc export --triton` repository.

This is an emulation with ONNX Runtime, not a Triton server (none can be installed offline here;
scripts/triton-check.sh runs the real one). It does what Triton's ONNX Runtime backend does with
implicit state:

- reads config.pbtxt with Triton's own schema (tritonclient.grpc.model_config_pb2, text_format);
- checks that every graph input is a config input, a control or a state, and every output a config
  output or a state;
- keeps each sequence's state without the batch dimension, starting from `initial_state` (the raw
  data file, or zeros), and concatenates the states of a batch's sequences along the batch axis;
- sends batch-1 requests, one block of L tokens each, START = 1 on a sequence's first;
- `oldest`: a batch holds at most one request per sequence, up to max_batch_size;
  `direct`: each sequence owns a slot for its lifetime and the batch covers the slots in use;
  slots without a request this round run as null requests (READY = 0, garbage inputs), whose
  state must come back unchanged and whose rows are discarded;
- interleaves 4+ sequences out of order (seeded random rounds).

Each sequence's logits are compared with CASE_DIR/seqNN.npy (from `famc run` on that sequence
alone). Prints one JSON line; exits 1 when a difference is over --tol or a check fails.

    python export/triton_emulate.py --repo REPO --case CASE_DIR [--strategy oldest|direct]
"""
import argparse
import glob
import json
import os
import random
import sys

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

NP = {mc.TYPE_FP32: np.float32, mc.TYPE_INT64: np.int64, mc.TYPE_INT32: np.int32}


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.pbtxt")) as f:
        return text_format.Parse(f.read(), mc.ModelConfig())


def initial_states(cfg, model_dir):
    out = {}
    for st in cfg.sequence_batching.state:
        init = st.initial_state[0]
        dtype = NP[init.data_type]
        dims = tuple(init.dims)
        if init.WhichOneof("state_data") == "data_file":
            path = os.path.join(model_dir, "initial_state", init.data_file)
            raw = np.fromfile(path, dtype=dtype)
            if raw.size != int(np.prod(dims)):
                raise SystemExit(f"{path}: {raw.size} values, dims {dims} need {int(np.prod(dims))}")
            out[st.input_name] = raw.reshape(dims)
        else:
            out[st.input_name] = np.zeros(dims, dtype=dtype)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", default="famc")
    ap.add_argument("--case", required=True, help="seqNN.txt ids and seqNN.npy expected logits")
    ap.add_argument("--strategy", choices=["config", "oldest", "direct"], default="config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    model_dir = os.path.join(args.repo, args.model)
    cfg = load_config(model_dir)
    problems = []
    if cfg.platform != "onnxruntime_onnx":
        problems.append(f"platform {cfg.platform!r}")
    sb = cfg.sequence_batching
    strategy = sb.WhichOneof("strategy_choice") if args.strategy == "config" else args.strategy
    max_batch = cfg.max_batch_size
    controls = {c.control[0].kind: c.name for c in sb.control_input}
    start_name = controls[mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START]
    ready_name = controls[mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY]
    states = list(sb.state)
    (inp,) = cfg.input
    (outp,) = cfg.output
    block = int(inp.dims[0])

    model_path = os.path.join(model_dir, "1", "model.onnx")
    try:
        onnx.checker.check_model(model_path, full_check=True)
    except Exception as e:  # reported with the rest
        problems.append(f"onnx.checker: {e}")
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    graph_in = {i.name for i in sess.get_inputs()}
    graph_out = {o.name for o in sess.get_outputs()}
    want_in = {inp.name, start_name, ready_name} | {s.input_name for s in states}
    want_out = {outp.name} | {s.output_name for s in states}
    if graph_in != want_in:
        problems.append(f"graph inputs {sorted(graph_in)} are not the config's {sorted(want_in)}")
    if graph_out != want_out:
        problems.append(f"graph outputs {sorted(graph_out)} are not the config's {sorted(want_out)}")
    # Triton pairs a state's input and output by their sorted positions (server issue #8586)
    ins = sorted(s.input_name for s in states)
    outs = sorted(s.output_name for s in states)
    pairs = {s.input_name: s.output_name for s in states}
    if [pairs[i] for i in ins] != outs:
        problems.append("state input and output names do not sort in the same order")
    for i in sess.get_inputs():
        if i.name in (start_name, ready_name) and list(i.shape)[1:] != [1]:
            problems.append(f"control {i.name} has shape {i.shape}, Triton sends [batch, 1]")
    init = initial_states(cfg, model_dir)
    rng = random.Random(args.seed)

    seqs = []
    for path in sorted(glob.glob(os.path.join(args.case, "seq*.txt"))):
        with open(path) as f:
            ids = [int(t) for t in f.read().split()]
        n_blocks = -(-len(ids) // block)
        padded = ids + [rng.randrange(cfg.output[0].dims[1]) for _ in range(n_blocks * block - len(ids))]
        seqs.append({
            "path": path,
            "ids": ids,
            "blocks": [np.asarray(padded[b * block:(b + 1) * block], dtype=np.int64) for b in range(n_blocks)],
            "next": 0,
            "state": None,
            "rows": [],
            "slot": None,
            "arrives": rng.randrange(3),
        })
    if len(seqs) < 4:
        raise SystemExit(f"{args.case}: the emulation interleaves at least 4 sequences")

    def run(rows):
        """rows: list of (seq or None for a null request). One model execution."""
        feeds = {inp.name: [], start_name: [], ready_name: []}
        for s in states:
            feeds[s.input_name] = []
        for seq in rows:
            if seq is None:
                feeds[inp.name].append(np.asarray([rng.randrange(7) for _ in range(block)], dtype=np.int64))
                feeds[start_name].append([0])
                feeds[ready_name].append([0])
                for s in states:
                    junk = np.full(tuple(s.dims), rng.randrange(1, 9), dtype=NP[s.data_type])
                    feeds[s.input_name].append(junk)
            else:
                first = seq["next"] == 0
                if first:
                    seq["state"] = {k: v.copy() for k, v in init.items()}
                feeds[inp.name].append(seq["blocks"][seq["next"]])
                feeds[start_name].append([1 if first else 0])
                feeds[ready_name].append([1])
                for s in states:
                    feeds[s.input_name].append(seq["state"][s.input_name])
        arrays = {}
        for k, v in feeds.items():
            if k in (start_name, ready_name):
                arrays[k] = np.asarray(v, dtype=np.int32)
            else:
                arrays[k] = np.stack(v)
        names = [o.name for o in sess.get_outputs()]
        result = dict(zip(names, sess.run(names, arrays)))
        for r, seq in enumerate(rows):
            if seq is None:
                for s in states:
                    if not np.array_equal(result[s.output_name][r], arrays[s.input_name][r]):
                        problems.append(f"a null request (READY = 0) changed state {s.output_name}")
                continue
            seq["rows"].append(result[outp.name][r])
            for s in states:
                seq["state"][s.input_name] = result[s.output_name][r]
            seq["next"] += 1
        return len(rows)

    executions, batch_sizes, rounds = 0, [], 0
    slots = [None] * max_batch
    while any(s["next"] < len(s["blocks"]) for s in seqs):
        rounds += 1
        live = [s for s in seqs if s["arrives"] < rounds and s["next"] < len(s["blocks"])]
        # each live sequence has a request this round with probability 0.6: out of order
        ready = [s for s in live if rng.random() < 0.6]
        rng.shuffle(ready)
        if strategy == "oldest":
            for i in range(0, len(ready), max_batch):
                batch_sizes.append(run(ready[i:i + max_batch]))
                executions += 1
        else:
            for s in ready:
                if s["slot"] is None and None in slots:
                    s["slot"] = slots.index(None)
                    slots[s["slot"]] = s
            slotted = [s for s in ready if s["slot"] is not None]
            if slotted:
                used = max(i for i, s in enumerate(slots) if s is not None) + 1
                rows = [slots[i] if slots[i] in slotted else None for i in range(used)]
                batch_sizes.append(run(rows))
                executions += 1
            for i, s in enumerate(slots):
                if s is not None and s["next"] == len(s["blocks"]):
                    slots[i] = None
        if rounds > 10000:
            problems.append("the emulation did not finish")
            break

    worst = 0.0
    for seq in seqs:
        got = np.concatenate(seq["rows"], axis=0)[: len(seq["ids"])]
        want = np.load(seq["path"][:-4] + ".npy")
        if got.shape != want.shape:
            problems.append(f"{seq['path']}: logits {got.shape}, famc run gave {want.shape}")
            continue
        worst = max(worst, float(np.max(np.abs(got - want))))
    print(json.dumps({
        "strategy": strategy,
        "sequences": len(seqs),
        "executions": executions,
        "largest_batch": max(batch_sizes) if batch_sizes else 0,
        "null_rows": strategy == "direct",
        "max_abs_diff": worst,
        "problems": problems,
    }))
    return 0 if not problems and worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
