#!/usr/bin/env python3
"""Checks the PyTorch FAM (export/fam_torch.py) against famc's f64 reference and Hugging Face.

Usage: check_fam_torch.py [FAMC_BINARY]   (default target/debug/famc)

1. A small random checkpoint (GQA, random norms and FAM prompt) is saved with `FamLlama.save`;
   `famc run --backend reference` and the PyTorch FAM (in float64) must agree to 1e-5 over
   several blocks and a short tail, for a few (L, F, M), F = 0 included.
2. With F = 0 and M·L covering the whole sequence, the PyTorch FAM must equal Hugging Face's own
   `LlamaForCausalLM` forward (FAM-SPEC section 5).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fam_torch import FamLlama, exact_norms  # noqa: E402


def random_model(L, F, M, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_theta=500.0, max_position_embeddings=4096)
    m = FamLlama(cfg, L, F, M)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return m


def main():
    famc = sys.argv[1] if len(sys.argv) > 1 else "target/debug/famc"
    torch.set_num_threads(1)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for (L, F, M, n) in [(4, 3, 2, 23), (5, 2, 1, 17), (4, 0, 1, 14), (3, 4, 0, 11)]:
            m = random_model(L, F, M, seed=L * 100 + F * 10 + M)
            ck = os.path.join(tmp, f"ck{L}{F}{M}")
            m.save(ck)
            ids = torch.randint(0, 40, (n,))
            ids_path = os.path.join(ck, "ids.txt")
            with open(ids_path, "w") as fh:
                fh.write(" ".join(str(int(i)) for i in ids) + "\n")
            out = os.path.join(ck, "ref.npy")
            subprocess.run([famc, "run", ck, "--backend", "reference", "--tokens", ids_path,
                            "--logits-out", out], check=True)
            ref = np.load(out)
            m64 = FamLlama.load(ck, dtype=torch.float64)
            with torch.no_grad(), exact_norms():
                got = m64.forward_ids(ids[None])[0].numpy()
            # famc writes the f64 reference's logits as float32: compare at float32 rounding
            diff = float(np.abs(got.astype(np.float32) - ref).max())
            scale = float(np.abs(ref).max())
            print(f"L={L} F={F} M={M} T={n}: max |torch f64 - famc reference| = {diff:.2e} (logits up to {scale:.1f})")
            worst = max(worst, diff / max(1.0, scale))

        # F = 0 with memory over the whole sequence is the plain causal model.
        m = random_model(4, 0, 8, seed=7).to(torch.float64)
        ids = torch.randint(0, 40, (1, 29))
        with torch.no_grad(), exact_norms():
            ours = m.forward_ids(ids)
            hf = m.llama(input_ids=ids).logits  # HF's RoPE tables are float32
        d_hf = float((ours - hf).abs().max())
        print(f"F=0, M*L >= T: max |torch FAM - LlamaForCausalLM| = {d_hf:.2e}")
        worst = max(worst, d_hf)
    ok = worst < 1e-5
    print("OK" if ok else "MISMATCH", f"(worst relative difference {worst:.2e})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
