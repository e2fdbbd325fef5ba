#!/usr/bin/env python3
"""PyTorch peer benchmark: how fast Hugging Face transformers (and export/fam_torch.py's FAM)
run a Llama checkpoint on the CPU, to set famc's own numbers against.

Runs only in the training venv (export/requirements-train.txt), never in CI:

    .venv-train/bin/python export/bench_torch.py [CKPT_DIR] [--threads 2] [--tokens 2048 8192] \
        [--only eager_prefill,kv_decode] > bench-torch.json

CKPT_DIR is a Hugging Face Llama checkpoint directory (config.json, model.safetensors and, for
--text, tokenizer.json); default $FAMC_SMOLLM2 or ~/.cache/famc/smollm2/hf (SmolLM2-135M).
Everything is float32, eval mode, under torch.inference_mode(), batch 1, torch.set_num_threads.

Measurements (names for --only; default all):
- eager_prefill:     LlamaForCausalLM (attn_implementation="eager"), one forward over N tokens,
                     use_cache=False; tokens/s = N / time. One result per --tokens value.
- sdpa_prefill:      the same with attn_implementation="sdpa" (transformers' default).
- kv_decode:         KV-cache decode, with eager and with sdpa attention (results kv_decode_eager
                     and kv_decode_sdpa; either name also works in --only): a prompt of
                     --decode-context tokens is prefilled once with use_cache=True (untimed; its
                     time is reported as prefill_s), then --decode-tokens greedy single-token
                     steps feeding the cache (past_key_values) are timed, each repetition from a copy of the
                     prefilled cache; tokens/s counts the steps only.
- fam_torch_prefill: export/fam_torch.py's FamLlama (block recurrence in Python, its own masked
                     matmul attention) with --block-len/--fam-len/--mem-blocks over N tokens from a
                     fresh state, init FAM included; tokens/s = N / time. A checkpoint without a
                     learned prompt `model.fam_init` gets a zero prompt, as famc uses.

Token ids are numpy RandomState(0) integers in [0, vocab), or, with --text FILE, the file's
tokens (tokenizer.json), repeated cyclically if the file is shorter than needed. Every measurement
is one untimed warm-up and --reps timed repetitions; the median is reported with all the reps.

Output: one JSON object on stdout
    {"threads", "tokens", "decode_context", "decode_tokens", "fam": {...}, "checkpoint",
     "results": [{"name", "tokens", "median_s", "tok_per_s", "reps_s", ...}],
     "peak_rss_mib", "torch", "transformers"}
and a short table on stderr. peak_rss_mib is getrusage's maxrss at the end (the whole run);
each result's rss_mib_after is maxrss right after that measurement (cumulative).
"""
import argparse
import copy
import inspect
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fam_torch import FamLlama  # noqa: E402

ALL = ["eager_prefill", "sdpa_prefill", "kv_decode_eager", "kv_decode_sdpa", "fam_torch_prefill"]
ALIASES = {"kv_decode": ["kv_decode_eager", "kv_decode_sdpa"]}


def default_ckpt():
    return os.environ.get("FAMC_SMOLLM2") or os.path.expanduser("~/.cache/famc/smollm2/hf")


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="?", default=default_ckpt(), help="Hugging Face Llama checkpoint directory")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048], help="prefill lengths (one result each)")
    ap.add_argument("--decode-context", type=int, default=2048, help="prompt length before the decode steps")
    ap.add_argument("--decode-tokens", type=int, default=64, help="timed single-token decode steps")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--block-len", type=int, default=512)
    ap.add_argument("--fam-len", type=int, default=64)
    ap.add_argument("--mem-blocks", type=int, default=2)
    ap.add_argument("--text", help="take token ids from this text file (via the checkpoint's tokenizer.json)")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(ALL + list(ALIASES)))
    args = ap.parse_args()
    if args.only:
        picked = []
        for name in (n.strip() for n in args.only.split(",") if n.strip()):
            if name not in ALL and name not in ALIASES:
                ap.error(f"--only: unknown measurement {name!r} (known: {', '.join(ALL + list(ALIASES))})")
            picked += ALIASES.get(name, [name])
        args.only = [n for n in ALL if n in picked]
    else:
        args.only = list(ALL)
    if args.reps < 1 or args.threads < 1 or min(args.tokens) < 1 or args.decode_context < 1 or args.decode_tokens < 1:
        ap.error("--reps, --threads, --tokens, --decode-context and --decode-tokens must be >= 1")
    return args


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def token_ids(args, vocab, count):
    """[count] int64 token ids: RandomState(0) in [0, vocab), or --text tokenized and tiled."""
    if args.text:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(args.ckpt, "tokenizer.json"))
        with open(args.text, encoding="utf-8") as fh:
            ids = np.array(tok.encode(fh.read()).ids, dtype=np.int64)
        if len(ids) == 0:
            raise SystemExit(f"{args.text}: no tokens")
        if len(ids) < count:
            log(f"note: {args.text} has {len(ids)} tokens; repeating it to {count}")
            ids = np.resize(ids, count)
        return ids[:count]
    return np.random.RandomState(0).randint(0, vocab, size=count).astype(np.int64)


def timed(fn, reps, setup=None):
    """One warm-up, then `reps` timings of fn(setup()) (setup untimed). Returns the times."""
    times = []
    for i in range(reps + 1):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
    return times


def result(name, tokens, times, **extra):
    med = statistics.median(times)
    r = {"name": name, "tokens": tokens, "median_s": med, "tok_per_s": tokens / med, "reps_s": times}
    r.update(extra)
    r["rss_mib_after"] = round(rss_mib(), 1)
    log(f"  {name:<18} {tokens:>6} tok  {med:9.3f} s  {tokens / med:10.1f} tok/s  (reps {', '.join(f'{t:.3f}' for t in times)})")
    return r


def load_hf(ckpt, attn):
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def load_fam(ckpt, L, F, M):
    """FamLlama over the checkpoint with explicit (L, F, M); whether it has a learned prompt."""
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        learned = "model.fam_init" in f.keys()
    try:
        m = FamLlama.load(ckpt, torch.float32, block_len=L, fam_len=F, mem_blocks=M)
    except ValueError as e:
        raise SystemExit(str(e))
    return m.eval(), learned


def bench_prefill(model, name, ids, tokens, reps):
    out = []
    for n in tokens:
        x = torch.from_numpy(ids[:n])[None]
        times = timed(lambda _: model(input_ids=x, use_cache=False), reps)
        out.append(result(name, n, times))
    return out


def cache_kw():
    """The KV-cache argument's name: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def bench_decode(model, name, ids, ctx, steps, reps):
    kw = cache_kw()
    prompt = torch.from_numpy(ids[:ctx])[None]
    t0 = time.perf_counter()
    pre = model(input_ids=prompt, use_cache=True)
    prefill_s = time.perf_counter() - t0
    first = pre.logits[:, -1].argmax(-1, keepdim=True)
    cache = getattr(pre, kw)
    del pre

    def run(past):
        tok = first
        for _ in range(steps):
            o = model(input_ids=tok, use_cache=True, **{kw: past})
            past = getattr(o, kw)
            tok = o.logits[:, -1].argmax(-1, keepdim=True)

    times = timed(run, reps, setup=lambda: copy.deepcopy(cache))
    return [result(name, steps, times, decode_context=ctx, prefill_s=prefill_s)]


def bench_fam(model, ids, tokens, reps):
    out = []
    for n in tokens:
        x = torch.from_numpy(ids[:n])[None]
        times = timed(lambda _: model.forward_ids(x), reps)
        out.append(result("fam_torch_prefill", n, times))
    return out


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    config = LlamaConfig.from_pretrained(args.ckpt)
    need = max(args.tokens + [args.decode_context])
    mpe = getattr(config, "max_position_embeddings", None)
    if mpe and max(args.tokens + [args.decode_context + args.decode_tokens]) > mpe:
        log(f"note: lengths beyond the checkpoint's max_position_embeddings ({mpe})")
    ids = token_ids(args, config.vocab_size, need)
    log(f"bench_torch: {args.ckpt}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} thread(s), reps {args.reps}")
    results = []
    fam_info = {"block_len": args.block_len, "fam_len": args.fam_len, "mem_blocks": args.mem_blocks}
    with torch.inference_mode():
        for attn in ("eager", "sdpa"):
            wanted = [n for n in (f"{attn}_prefill", f"kv_decode_{attn}") if n in args.only]
            if not wanted:
                continue
            model = load_hf(args.ckpt, attn)
            if f"{attn}_prefill" in wanted:
                results += bench_prefill(model, f"{attn}_prefill", ids, args.tokens, args.reps)
            if f"kv_decode_{attn}" in wanted:
                results += bench_decode(model, f"kv_decode_{attn}", ids, args.decode_context,
                                        args.decode_tokens, args.reps)
            del model
        if "fam_torch_prefill" in args.only:
            model, learned = load_fam(args.ckpt, args.block_len, args.fam_len, args.mem_blocks)
            fam_info["prompt"] = "model.fam_init" if learned else "zeros"
            if not learned and args.fam_len > 0:
                log(f"note: {args.ckpt} has no learned FAM prompt `model.fam_init`; using zeros")
            results += bench_fam(model, ids, args.tokens, args.reps)
            del model
    report = {
        "threads": args.threads,
        "tokens": args.tokens,
        "decode_context": args.decode_context,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "fam": fam_info,
        "checkpoint": os.path.abspath(args.ckpt),
        "text": args.text,
        "results": results,
        "peak_rss_mib": round(rss_mib(), 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    log(f"peak RSS {report['peak_rss_mib']:.0f} MiB")
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
