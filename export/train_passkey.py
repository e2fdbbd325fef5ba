#!/usr/bin/env python3
"""Trains a small TransformerFAM Llama on PassKey (export/passkey.py) and saves a checkpoint that
`famc export` / `famc run` / `famc eval passkey` read as it is.

Example (the shipped model, models/passkey-fam; see its README.md):

    .venv-train/bin/python export/train_passkey.py --out models/passkey-fam --seed 1

The loss is the cross-entropy of the key at the QUERY position only (everything else is random
filler). Distances follow a curriculum: the longest distance in a batch grows by `--dist-step`
whenever the running accuracy passes `--promote-acc`, up to `--max-dist` (beyond the evaluation
distance), judged on batches that start from a fresh state (as famc evaluates). Gradients
flow through every block of a sequence.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as Fn
from transformers import LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fam_torch import FamLlama  # noqa: E402
import passkey  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    # model
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    # FAM
    ap.add_argument("--block-len", type=int, default=8)
    ap.add_argument("--fam-len", type=int, default=4)
    ap.add_argument("--mem-blocks", type=int, default=1)
    # curriculum over the distance N (blocks between the key and the question)
    ap.add_argument("--start-dist", type=int, default=2)
    ap.add_argument("--max-dist", type=int, default=32)
    ap.add_argument("--dist-step", type=int, default=2)
    ap.add_argument("--promote-acc", type=float, default=0.9)
    # the paper's training extras
    ap.add_argument("--state-passing", type=float, default=0.25,
                    help="probability that a batch starts from the previous batch's final state (0: off)")
    ap.add_argument("--pos-offset", type=int, default=4096,
                    help="random position offset drawn from [0, this] per fresh stream (0: off)")
    # evaluation during training (SplitMix64 samples, as famc eval passkey draws them)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-dist", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--eval-seed", type=int, default=12345)
    return ap.parse_args()


def log(fh, msg):
    print(msg, flush=True)
    fh.write(msg + "\n")
    fh.flush()


@torch.no_grad()
def recall(model, seed, distance, count, fam_len=None, batch=64):
    """Accuracy of argmax at the QUERY position over famc's SplitMix64 samples."""
    samples = passkey.eval_samples(seed, model.L, distance, count)
    saved_f = model.F
    if fam_len is not None:
        model.F = fam_len
    try:
        hits = 0
        for i in range(0, count, batch):
            chunk = samples[i : i + batch]
            ids = torch.tensor([s[0] for s in chunk])
            ans = torch.tensor([s[1] for s in chunk])
            logits = model.forward_ids(ids)[:, -1]
            hits += int((logits.argmax(-1) == ans).sum())
        return hits / count
    finally:
        model.F = saved_f


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)
    fh = open(os.path.join(a.out, "train.log"), "w")
    log(fh, "command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    log(fh, "args: " + json.dumps(vars(a), sort_keys=True))
    log(fh, f"torch {torch.__version__}")

    config = LlamaConfig(
        vocab_size=passkey.VOCAB,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=1 << 20,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=passkey.BOS,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = FamLlama(config, a.block_len, a.fam_len, a.mem_blocks)
    n_params = sum(p.numel() for p in model.parameters())
    log(fh, f"parameters: {n_params}  (L={a.block_len}, F={a.fam_len}, M={a.mem_blocks})")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "fam_init" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "fam_init" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    ncur = a.start_dist
    prev = None
    run_acc, run_passed, run_loss = [], [], []
    t0 = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        lo = max(2, ncur // 2 + 1)
        blocks = int(rng.integers(lo, ncur + 2))  # the batch asks at distances 1 .. blocks-1
        ids, qpos, key = passkey.train_batch(rng, a.batch, a.block_len, blocks)
        passed = prev is not None and a.state_passing > 0 and rng.random() < a.state_passing
        if passed:
            state = prev
        else:
            off = int(rng.integers(0, a.pos_offset + 1)) if a.pos_offset > 0 else 0
            state = model.initial_state(a.batch, offset=off)
        ids_t = torch.from_numpy(ids)
        last = []
        for b in range(blocks):
            h, state = model.step_hidden(state, ids_t[:, b * a.block_len : (b + 1) * a.block_len])
            last.append(h[:, -1])
        last = torch.stack(last, dim=1)  # [B, blocks, d]; QUERY sits at a block's last position
        dist = torch.from_numpy(qpos // a.block_len)
        logits = model.logits(last[torch.arange(a.batch), dist])
        target = torch.from_numpy(key)
        loss = Fn.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        prev = state.detach()
        acc = float((logits.argmax(-1) == target).float().mean())
        (run_passed if passed else run_acc).append(acc)
        run_loss.append(float(loss))
        for r in (run_acc, run_passed, run_loss):
            if len(r) > 50:
                r.pop(0)
        if step % 50 == 49:
            ra = sum(run_acc) / max(1, len(run_acc))
            rp = f"{sum(run_passed) / len(run_passed):.3f}" if run_passed else "  -  "
            log(fh, f"step {step + 1:5d}  loss {sum(run_loss) / len(run_loss):.4f}  acc {ra:.3f}  "
                    f"acc-after-passed-state {rp}  max-dist {ncur:2d}  lr {lr_at(step):.2e}  "
                    f"{time.time() - t0:7.1f}s")
            # promotion looks at fresh streams, the way famc evaluates
            if len(run_acc) >= 20 and ra >= a.promote_acc and ncur < a.max_dist:
                ncur = min(a.max_dist, ncur + a.dist_step)
                run_acc.clear()
                run_passed.clear()
                run_loss.clear()
                log(fh, f"curriculum: max distance -> {ncur} blocks")
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            model.eval()
            r = recall(model, a.eval_seed, a.eval_dist, a.eval_samples)
            model.train()
            log(fh, f"eval step {step + 1}: recall at {a.eval_dist} blocks = {r:.3f}")
            model.save(a.out)

    model.eval()
    log(fh, f"training done in {time.time() - t0:.1f}s")
    for d in sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, a.eval_dist}):
        rf = recall(model, a.eval_seed, d, 256)
        rb = recall(model, a.eval_seed, d, 256, fam_len=0)
        log(fh, f"final recall (256 samples, seed {a.eval_seed}) at {d:2d} blocks: FAM {rf:.3f}  BSWA (F=0) {rb:.3f}")
    model.save(a.out)
    log(fh, f"saved {a.out}")


if __name__ == "__main__":
    main()
