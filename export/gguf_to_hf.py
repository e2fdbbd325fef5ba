#!/usr/bin/env python3
"""Converts a llama.cpp GGUF Llama checkpoint into a float32 Hugging Face checkpoint.

Usage: gguf_to_hf.py GGUF_FILE OUT_DIR [--pretokenizer {gguf,transformers}]

Needs only the `gguf` and `safetensors` packages and numpy (no torch); runs in the CI venv .venv
(export/requirements.txt). Writes into OUT_DIR:

- config.json             LlamaForCausalLM; every value read from the GGUF metadata
- model.safetensors       float32, Hugging Face tensor names; no lm_head.weight when the GGUF has no
                          output.weight (tied embeddings)
- tokenizer.json          a `tokenizers` byte-level BPE built from tokenizer.ggml.*
- tokenizer_config.json   special tokens, add_bos/add_eos, chat template
- generation_config.json  bos/eos ids

Quantized tensors are dequantized with gguf.quants.dequantize (so the float32 weights are exactly the
values llama.cpp computes with). llama.cpp's converter permutes the rows of attn_q/attn_k from
Hugging Face's rotate_half RoPE layout into GGUF's interleaved-pairs layout; this undoes it the way
transformers' own GGUF loader does (LlamaTensorProcessor._reverse_permute_weights in
transformers/modeling_gguf_pytorch_utils.py).

Pre-tokenizer: with --pretokenizer gguf (the default) it follows tokenizer.ggml.pre the way llama.cpp
does: "smollm" (like "starcoder", "refact", "command-r", ...) first splits every digit on its own and
then applies the GPT-2 regex, which is Hugging Face's Digits(individual_digits) + ByteLevel, the
pre-tokenizer of the original SmolLM2 tokenizer.json. transformers' GGUF loader (5.24) knows no split
for "smollm" and uses plain GPT-2 ByteLevel; the two differ only where a run of two or more
whitespace characters comes right before a digit. --pretokenizer transformers reproduces transformers.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.numpy import save_file

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# tokenizer.ggml.pre values whose llama.cpp split is "\p{N}" then the GPT-2 regex.
DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# tokenizer.ggml.pre values that use the plain GPT-2 regex.
GPT2_PRES = {None, "default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def f32_decimal(x):
    """The shortest decimal that reads back as the same float32 (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (as in transformers.convert_slow_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_config(reader):
    arch = field(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"general.architecture is {arch!r}; only 'llama' is supported")
    p = lambda k, d=None: field(reader, f"llama.{k}", d)  # noqa: E731
    hidden = int(p("embedding_length"))
    heads = int(p("attention.head_count"))
    kv_heads = int(p("attention.head_count_kv", heads))
    head_dim = int(p("attention.key_length", hidden // heads))
    if int(p("attention.value_length", head_dim)) != head_dim:
        sys.exit("attention.value_length differs from key_length: not a Llama layout")
    rot = int(p("rope.dimension_count", head_dim))
    if rot != head_dim:
        sys.exit(f"rope.dimension_count {rot} != head_dim {head_dim}: partial RoPE is not supported")
    scaling = p("rope.scaling.type")
    if scaling not in (None, "none"):
        sys.exit(f"RoPE scaling {scaling!r} is not supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = int(p("vocab_size", len(tokens) if tokens is not None else 0))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    theta = f32_decimal(p("rope.freq_base", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(p("feed_forward_length")),
        "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f32_decimal(p("attention.layer_norm_rms_epsilon")),
        "vocab_size": vocab,
        "max_position_embeddings": int(p("context_length")),
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    return cfg


def hf_name(name):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[3] == "weight":
        sub = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }.get(parts[2])
        if sub is not None:
            return f"model.layers.{int(parts[1])}.{sub}.weight"
    return None


def reverse_permute(w, n_head):
    """Inverse of llama.cpp convert_hf_to_gguf.py's permute(): interleaved pairs -> rotate_half rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_tensors(reader, cfg):
    out, kinds = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            sys.exit(f"unexpected GGUF tensor {t.name!r}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (the inner dim) first
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = np.asarray(t.data)
        else:  # quantized, and BF16 (stored as raw uint16)
            w = dequantize(np.asarray(t.data), t.tensor_type)
        w = np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(shape))
        if t.name.endswith(".attn_q.weight"):
            w = np.ascontiguousarray(reverse_permute(w, cfg["num_attention_heads"]))
        elif t.name.endswith(".attn_k.weight"):
            w = np.ascontiguousarray(reverse_permute(w, cfg["num_key_value_heads"]))
        out[name] = w
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return out, kinds


def check_shapes(cfg, tensors):
    d, v, dh = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    want = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        want["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        want.update({
            pre + "input_layernorm.weight": (d,),
            pre + "post_attention_layernorm.weight": (d,),
            pre + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * dh, d),
            pre + "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * dh, d),
            pre + "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * dh, d),
            pre + "self_attn.o_proj.weight": (d, cfg["num_attention_heads"] * dh),
            pre + "mlp.gate_proj.weight": (cfg["intermediate_size"], d),
            pre + "mlp.up_proj.weight": (cfg["intermediate_size"], d),
            pre + "mlp.down_proj.weight": (d, cfg["intermediate_size"]),
        })
    if set(want) != set(tensors):
        sys.exit(f"tensor set mismatch: missing {sorted(set(want) - set(tensors))[:5]}, "
                 f"extra {sorted(set(tensors) - set(want))[:5]}")
    for k, s in want.items():
        if tensors[k].shape != s:
            sys.exit(f"{k}: shape {tensors[k].shape}, expected {s}")


def build_tokenizer(reader, pretokenizer):
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = field(reader, "tokenizer.ggml.pre")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = field(reader, "tokenizer.ggml.merges")
    if merges is None:
        sys.exit("the GGUF has no tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Same re-spelling as transformers' GGUF loader: a token not written in the byte alphabet is
    # spelled byte by byte.
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL and set(tok) <= alphabet:
            special = True
        elif ty == TOKEN_USER_DEFINED:
            special = False
        else:
            continue
        added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": special})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pretokenizer == "transformers" or pre in GPT2_PRES:
        pre_tok = byte_level
    elif pre in DIGIT_SPLIT_PRES:
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        sys.exit(f"tokenizer.ggml.pre {pre!r} is not supported (use --pretokenizer transformers for plain GPT-2)")

    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    # [BOS] $A [EOS] as the GGUF's add_bos_token / add_eos_token say (pairs: the same, then $B).
    single, specials = [], {}
    for flag, tid in ((add_bos, bos), (add_eos, eos)):
        if flag and tid is not None:
            specials[tokens[tid]] = {"id": tokens[tid], "ids": [int(tid)], "tokens": [tokens[tid]]}
    if add_bos and bos is not None:
        single.append({"SpecialToken": {"id": tokens[bos], "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": tokens[eos], "type_id": 0}})
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in merges],
        },
    }
    name = lambda k: None if field(reader, k) is None else tokens[field(reader, k)]  # noqa: E731
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
    }
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_cfg["chat_template"] = template
    return tok_json, tok_cfg, pre


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf_file")
    ap.add_argument("out_dir")
    ap.add_argument("--pretokenizer", choices=("gguf", "transformers"), default="gguf",
                    help="gguf: follow tokenizer.ggml.pre as llama.cpp does (default); "
                         "transformers: plain GPT-2 ByteLevel as transformers' GGUF loader builds it")
    args = ap.parse_args()
    t0 = time.time()
    reader = GGUFReader(args.gguf_file)
    cfg = read_config(reader)
    tensors, kinds = read_tensors(reader, cfg)
    if tensors["model.embed_tokens.weight"].shape[0] != cfg["vocab_size"]:
        sys.exit(f"token_embd has {tensors['model.embed_tokens.weight'].shape[0]} rows, vocab_size is {cfg['vocab_size']}")
    check_shapes(cfg, tensors)
    tok_json, tok_cfg, pre = build_tokenizer(reader, args.pretokenizer)
    if len(tok_json["model"]["vocab"]) != cfg["vocab_size"]:
        sys.exit(f"tokenizer has {len(tok_json['model']['vocab'])} distinct tokens, vocab_size is {cfg['vocab_size']}")

    os.makedirs(args.out_dir, exist_ok=True)
    written = []

    def dump(name, obj):
        path = os.path.join(args.out_dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        written.append(path)

    dump("config.json", cfg)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    if cfg["pad_token_id"] is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    dump("generation_config.json", gen)
    dump("tokenizer_config.json", tok_cfg)
    path = os.path.join(args.out_dir, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(tok_json, fh, ensure_ascii=False)
    written.append(path)
    path = os.path.join(args.out_dir, "model.safetensors")
    save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it owner-only
    written.append(path)

    n_params = sum(w.size for w in tensors.values())
    print(f"{args.gguf_file}: llama, {cfg['num_hidden_layers']} layers, d={cfg['hidden_size']}, "
          f"heads={cfg['num_attention_heads']}/{cfg['num_key_value_heads']}, head_dim={cfg['head_dim']}, "
          f"ffn={cfg['intermediate_size']}, vocab={cfg['vocab_size']}, rope_theta={cfg['rope_theta']}, "
          f"tied={cfg['tie_word_embeddings']}, tensor types {kinds}, pre-tokenizer {pre!r} "
          f"({json.dumps(tok_json['pre_tokenizer']['type'])})")
    for p in written:
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    print(f"{n_params} float32 parameters in {len(tensors)} tensors, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
