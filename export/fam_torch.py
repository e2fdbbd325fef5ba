"""A training-time TransformerFAM over a Hugging Face `LlamaForCausalLM`, exactly as FAM-SPEC.md.

The Llama modules (embeddings, q/k/v/o projections, MLPs, RMSNorms, lm_head) are Hugging Face's;
the block recurrence is written here, so gradients flow through every block (backpropagation
through the recurrence). The only new weight is `fam_init` [F, d], saved as `model.fam_init`.

Per layer the F FAM rows and the T block rows go through the layer together: they share the
projections, and one attention call with a mask gives both FAM-SPEC section 2 attentions
(block queries: memory + FAM + causal block; FAM queries: FAM + whole block, no memory).
Their positions s-F ... s+T-1 are contiguous, so one RoPE table serves both.

Training extras of the paper, both off unless asked for:
- random position offset: every position of a sequence is shifted by one random integer (RoPE
  is relative, so this changes only rounding; it exercises large positions as long streams do);
- random state passing: a sequence may start from the state the previous one ended with
  (FAM, memory, block index and offset, detached), so FAM learns to overwrite what it holds.
"""
import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class FamState:
    """One batch's state between blocks: FAM-SPEC section 2's fam[l] and mem[l]."""

    block_index: int
    fam: List[torch.Tensor]  # per layer [B, F, d]
    mem_k: List[torch.Tensor]  # per layer [B, Hkv, n, Dh], post-RoPE, n = min(tau*L, M*L)
    mem_v: List[torch.Tensor]
    offset: int = 0  # position offset (training only; famc streams start at 0)

    def detach(self):
        return FamState(
            self.block_index,
            [f.detach() for f in self.fam],
            [k.detach() for k in self.mem_k],
            [v.detach() for v in self.mem_v],
            self.offset,
        )


class FamLlama(nn.Module):
    """TransformerFAM over `LlamaForCausalLM` with block length L, FAM length F, memory blocks M."""

    def __init__(self, config: LlamaConfig, block_len: int, fam_len: int, mem_blocks: int):
        super().__init__()
        self.llama = LlamaForCausalLM(config)
        self.cfg = config
        self.L, self.F, self.M = block_len, fam_len, mem_blocks
        d = config.hidden_size
        self.H = config.num_attention_heads
        self.Hkv = getattr(config, "num_key_value_heads", None) or self.H
        self.Dh = getattr(config, "head_dim", None) or d // self.H
        self.eps = config.rms_norm_eps
        theta = rope_theta(config)
        j = torch.arange(self.Dh // 2, dtype=torch.float64)
        self.register_buffer("inv_freq", theta ** (-2.0 * j / self.Dh), persistent=False)
        self.fam_init = nn.Parameter(torch.randn(fam_len, d) * config.initializer_range)

    # ---- building blocks -------------------------------------------------------------------

    def _rope(self, x, positions):
        """x [B, heads, T, Dh]; positions [T] integers (may be negative). rotate_half layout."""
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        half = self.Dh // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _qkv(self, layer, rows, positions):
        """rows [B, T, d] -> q [B, H, T, Dh], k, v [B, Hkv, T, Dh]; RoPE on q and k."""
        b, t, _ = rows.shape
        h = layer.input_layernorm(rows)
        at = layer.self_attn
        q = at.q_proj(h).view(b, t, self.H, self.Dh).transpose(1, 2)
        k = at.k_proj(h).view(b, t, self.Hkv, self.Dh).transpose(1, 2)
        v = at.v_proj(h).view(b, t, self.Hkv, self.Dh).transpose(1, 2)
        return self._rope(q, positions), self._rope(k, positions), v

    def _attend(self, layer, q, k, v, mask):
        """GQA attention; mask [Tq, Tk] bool (True = visible); returns o_proj output [B, Tq, d]."""
        g = self.H // self.Hkv
        if g > 1:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.Dh)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        b, _, tq, _ = out.shape
        return layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, tq, self.H * self.Dh))

    @staticmethod
    def _mlp_residual(layer, a):
        return a + layer.mlp(layer.post_attention_layernorm(a))

    @property
    def layers(self):
        return self.llama.model.layers

    # ---- FAM-SPEC sections 2 and 3 ---------------------------------------------------------

    def initial_fam(self):
        """F_{-1}^l for every layer (FAM-SPEC section 3), [F, d] each."""
        cur = self.fam_init
        out = []
        f = self.F
        pos = torch.arange(-f, 0, device=cur.device)
        full = torch.ones(f, f, dtype=torch.bool, device=cur.device)
        for i, layer in enumerate(self.layers):
            out.append(cur)
            if i + 1 == len(self.layers):
                break
            q, k, v = self._qkv(layer, cur[None], pos)
            a = self._attend(layer, q, k, v, full)[0] + cur
            cur = self._mlp_residual(layer, a)
        return out

    def initial_state(self, batch: int, offset: int = 0) -> FamState:
        d = self.cfg.hidden_size
        p = self.llama.lm_head.weight
        fam = [f[None].expand(batch, self.F, d) for f in self.initial_fam()] if self.F > 0 else [
            p.new_zeros(batch, 0, d) for _ in self.layers
        ]
        empty = p.new_zeros(batch, self.Hkv, 0, self.Dh)
        return FamState(0, fam, [empty] * len(self.layers), [empty] * len(self.layers), offset)

    def step_hidden(self, state: FamState, ids: torch.Tensor):
        """One block ids [B, T], 1 <= T <= L. Returns (last-layer output before the final norm
        [B, T, d], next state or None for a short block)."""
        b, t = ids.shape
        f, L = self.F, self.L
        tau = state.block_index
        s = tau * L + state.offset
        dev = ids.device
        positions = torch.arange(s - f, s + t, device=dev)
        x = self.llama.model.embed_tokens(ids)
        n_mem = state.mem_k[0].shape[2]
        # mask over keys [mem (n_mem) ; FAM (f) ; block (t)] for queries [FAM (f) ; block (t)]
        mask = torch.ones(f + t, n_mem + f + t, dtype=torch.bool, device=dev)
        mask[:f, :n_mem] = False
        mask[f:, n_mem + f :] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev))
        fam_next, mk_next, mv_next = [], [], []
        keep = self.M * L
        for l, layer in enumerate(self.layers):
            rows = torch.cat([state.fam[l], x], dim=1)
            q, k, v = self._qkv(layer, rows, positions)
            kk = torch.cat([state.mem_k[l], k], dim=2)
            vv = torch.cat([state.mem_v[l], v], dim=2)
            a = self._attend(layer, q, kk, vv, mask)
            if tau == 0:  # zero residual on the first FAM update
                resid = torch.cat([torch.zeros_like(state.fam[l]), x], dim=1)
            else:
                resid = rows
            out = self._mlp_residual(layer, a + resid)
            fam_next.append(out[:, :f])
            blk_k, blk_v = k[:, :, f:], v[:, :, f:]
            mk = torch.cat([state.mem_k[l], blk_k], dim=2)
            mv = torch.cat([state.mem_v[l], blk_v], dim=2)
            mk_next.append(mk[:, :, mk.shape[2] - min(keep, mk.shape[2]) :])
            mv_next.append(mv[:, :, mv.shape[2] - min(keep, mv.shape[2]) :])
            x = out[:, f:]
        nxt = None
        if t == L:
            if f == 0:
                fam_next = state.fam
            nxt = FamState(tau + 1, fam_next, mk_next, mv_next, state.offset)
        return x, nxt

    def logits(self, hidden):
        return self.llama.lm_head(self.llama.model.norm(hidden))

    def forward_ids(self, ids: torch.Tensor, state: Optional[FamState] = None):
        """Whole sequences [B, len] from a new state (or `state`); logits [B, len, V]."""
        state = state if state is not None else self.initial_state(ids.shape[0])
        outs = []
        for start in range(0, ids.shape[1], self.L):
            h, nxt = self.step_hidden(state, ids[:, start : start + self.L])
            outs.append(self.logits(h))
            if nxt is not None:
                state = nxt
        return torch.cat(outs, dim=1)

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, out_dir: str):
        """`save_pretrained` plus `model.fam_init` in the same safetensors file and the FAM
        parameters in config.json's "fam" object, as `famc export` reads them."""
        from safetensors.torch import load_file, save_file

        os.makedirs(out_dir, exist_ok=True)
        self.llama.save_pretrained(out_dir, safe_serialization=True)
        st_path = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(st_path)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if self.F > 0:
            tensors["model.fam_init"] = self.fam_init.detach().to(torch.float32).contiguous()
        save_file(tensors, st_path, metadata={"format": "pt"})
        cfg_path = os.path.join(out_dir, "config.json")
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        cfg["fam"] = {"block_len": self.L, "fam_len": self.F, "mem_blocks": self.M}
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, ckpt_dir: str, dtype=torch.float32, block_len=None, fam_len=None, mem_blocks=None):
        """Reads a checkpoint written by `save` (or any Llama checkpoint with a "fam" object); the
        keyword FAM parameters override config.json's (a plain Llama checkpoint has none). The
        prompt is `model.fam_init` when present (its rows must be F) and zeros otherwise, as famc
        does."""
        from safetensors.torch import load_file

        with open(os.path.join(ckpt_dir, "config.json")) as fh:
            raw = json.load(fh)
        fam = raw.get("fam", {})
        tensors = load_file(os.path.join(ckpt_dir, "model.safetensors"))
        init = tensors.pop("model.fam_init", None)
        F = fam_len if fam_len is not None else (init.shape[0] if init is not None else fam.get("fam_len", 0))
        if init is not None and init.shape[0] != F:
            raise ValueError(f"fam_len {F}, but {ckpt_dir}'s model.fam_init has {init.shape[0]} rows")
        L = block_len if block_len is not None else fam["block_len"]
        M = mem_blocks if mem_blocks is not None else fam["mem_blocks"]
        config = LlamaConfig.from_pretrained(ckpt_dir)
        m = cls(config, L, F, M)
        missing, unexpected = m.llama.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {ckpt_dir}: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            m.llama.tie_weights()
        with torch.no_grad():
            m.fam_init.copy_(init if init is not None else torch.zeros(F, config.hidden_size))
        return m.to(dtype)


@contextlib.contextmanager
def exact_norms():
    """Hugging Face's LlamaRMSNorm always computes in float32; inside this context it computes in
    its input's dtype, so a float64 model is float64 throughout, like famc's reference."""
    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaRMSNorm
    original = cls.forward

    def forward(self, x):
        return self.weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0) or 10000.0)
