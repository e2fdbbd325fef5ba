#!/usr/bin/env python3
"""Writes tests/data/passkey/: token ids and the PyTorch FAM's logits on the shipped model.

Usage: make_passkey_fixture.py [MODEL_DIR] [OUT_DIR]
       (defaults models/passkey-fam and tests/data/passkey)

Also writes MODEL_DIR/ids.txt, the main job's input: one PassKey sample at distance 16 blocks
(seed 1), ending with QUERY; the argmax of its last logits row is the key.

ids.txt is a PassKey sample at distance 6 blocks (seed 2024) followed by its answer and a few
fillers, so 7 full blocks and a short tail. torch_logits.npy holds float32 logits [T, V] of
export/fam_torch.py run in float64 throughout (so it is the exact FAM-SPEC computation, rounded
once); tests/passkey.rs checks famc's graphs and reference against it without any Python.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import passkey  # noqa: E402
from fam_torch import FamLlama, exact_norms  # noqa: E402


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/passkey-fam"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/data/passkey"
    torch.set_num_threads(1)
    m64 = FamLlama.load(model_dir, dtype=torch.float64).eval()
    (ids, answer), = passkey.eval_samples(2024, m64.L, 6, 1)
    ids = ids + [answer, passkey.FILLER0, passkey.FILLER0 + 5, passkey.FILLER0 + 2]
    x = torch.tensor([ids])
    with torch.no_grad(), exact_norms():
        logits64 = m64.forward_ids(x)[0]
    m32 = FamLlama.load(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits32 = m32.forward_ids(x)[0].double()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ids.txt"), "w") as fh:
        fh.write(" ".join(str(i) for i in ids) + "\n")
    np.save(os.path.join(out_dir, "torch_logits.npy"), logits64.numpy().astype(np.float32))
    (demo, demo_key), = passkey.eval_samples(1, m64.L, 16, 1)
    with open(os.path.join(model_dir, "ids.txt"), "w") as fh:
        fh.write(" ".join(str(i) for i in demo) + "\n")
    with torch.no_grad():
        demo_pred = int(m32.forward_ids(torch.tensor([demo]))[0, -1].argmax())
    print(f"wrote {model_dir}/ids.txt: {len(demo)} ids, key {demo_key}, torch predicts {demo_pred}")
    q = len(ids) - 5  # the QUERY position
    print(f"wrote {len(ids)} ids ({len(ids) // m64.L} blocks of {m64.L} + {len(ids) % m64.L}) and logits "
          f"{tuple(logits64.shape)} to {out_dir}; |logits| <= {float(logits64.abs().max()):.2f}")
    print(f"float32 torch vs float64 torch: max abs diff {float((logits32 - logits64).abs().max()):.2e}")
    print(f"prediction at the QUERY position: {int(logits64[q].argmax())} (answer {answer})")


if __name__ == "__main__":
    main()
