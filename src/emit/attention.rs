//! Scaled dot-product attention with an additive mask, grouped-query: opset-17
//! MatMul/Softmax/MatMul, or opset 23's `Attention`; and the decode row's attention over key/value
//! parts kept apart.

use super::Emitter;
use crate::builder::{Attr, DType, GraphBuilder, Value};

impl Emitter<'_> {
    /// softmax(q·kᵀ + mask)·v for q [B, H, Q, Dh] (already scaled by 1/√Dh), keys and values
    /// [B, Hkv, N, Dh] and `mask` [B or 1, 1, G·Q, N] (opset 17, see [`Emitter::block_mask`]) or
    /// [B or 1, 1, Q, N]; returns [B, Q, H·Dh].
    pub(super) fn attention(
        &self,
        b: &mut GraphBuilder,
        q: &Value,
        keys: &Value,
        values: &Value,
        mask: Option<&Value>,
    ) -> Value {
        b.scoped("sdpa", |b| {
            let cfg = self.cfg();
            let (h, hkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            if self.lowering().fused_attention {
                let mut inputs = vec![Some(q), Some(keys), Some(values)];
                inputs.extend(mask.map(Some));
                let attrs = vec![
                    Attr::int("q_num_heads", h as i64),
                    Attr::int("kv_num_heads", hkv as i64),
                    Attr::float("scale", 1.0),
                ];
                let o = b.op_opt("Attention", &inputs, attrs, DType::F32); // [B, H, Q, Dh]
                let o = b.transpose(&o, &[0, 2, 1, 3]);
                return b.reshape(&o, &[0, 0, (h * dh) as i64]);
            }
            // GQA without repeating keys: a key/value head's G query heads are one run of G·Q
            // rows, so every MatMul is rank 4.
            let qg = b.reshape(q, &[0, hkv as i64, -1, dh as i64]); // [B, Hkv, G·Q, Dh]
            let kt = b.transpose(keys, &[0, 1, 3, 2]);
            let scores = b.matmul(&qg, &kt); // [B, Hkv, G·Q, N]
            let scores = match mask {
                Some(m) => b.add(&scores, m),
                None => scores,
            };
            let p = b.softmax(&scores, -1);
            let o = b.matmul(&p, values); // [B, Hkv, G·Q, Dh]
            let o = b.reshape(&o, &[0, h as i64, -1, dh as i64]);
            let o = b.transpose(&o, &[0, 2, 1, 3]);
            b.reshape(&o, &[0, 0, (h * dh) as i64])
        })
    }

    /// Attention of one row per stream (q [B, H, 1, Dh], scaled) over key/value `parts`
    /// [B, Hkv, Nᵢ, Dh] (with their Nᵢ) and the row's own key and value [B, Hkv, 1, Dh], without concatenating
    /// keys or values: one softmax over every part's scores, then Σ pᵢ·vᵢ. The same standard ops
    /// on every target (a fused `Attention` would need the parts in one tensor, a copy of every
    /// key and value per token). `mask` [B, 1, 1, ΣNᵢ + 1] (the own key last); returns
    /// [B, 1, H·Dh].
    pub(super) fn split_attention(
        &self,
        b: &mut GraphBuilder,
        q: &Value,
        parts: &[(&Value, &Value, usize)],
        own: (&Value, &Value),
        mask: &Value,
    ) -> Value {
        b.scoped("sdpa", |b| {
            let cfg = self.cfg();
            let (h, hkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            let qg = b.reshape(q, &[0, hkv as i64, -1, dh as i64]); // [B, Hkv, G, Dh]
            let mut scores = Vec::new();
            for (k, _, _) in parts {
                let kt = b.transpose(k, &[0, 1, 3, 2]);
                scores.push(b.matmul(&qg, &kt)); // [B, Hkv, G, Nᵢ]
            }
            let own_q_k = b.mul(&qg, own.0);
            scores.push(b.reduce_sum(&own_q_k, &[-1], true)); // [B, Hkv, G, 1]
            let refs: Vec<&Value> = scores.iter().collect();
            let scores = b.concat(&refs, 3);
            let scores = b.add(&scores, mask);
            let p = b.softmax(&scores, -1);
            let mut start = 0i64;
            let mut o: Option<Value> = None;
            let mut accumulate = |b: &mut GraphBuilder, term: Value| {
                o = Some(match o.take() {
                    Some(acc) => b.add(&acc, &term),
                    None => term,
                });
            };
            for &(_, v, n) in parts {
                let n = n as i64;
                let pi = b.slice(&p, &[start], &[start + n], &[3], None);
                let term = b.matmul(&pi, v); // [B, Hkv, G, Dh]
                accumulate(b, term);
                start += n;
            }
            let p_own = b.slice(&p, &[start], &[start + 1], &[3], None); // [B, Hkv, G, 1]
            let term = b.mul(&p_own, own.1);
            accumulate(b, term);
            let o = o.expect("the own term");
            let o = b.reshape(&o, &[0, h as i64, -1, dh as i64]); // [B, H, 1, Dh]
            let o = b.transpose(&o, &[0, 2, 1, 3]);
            b.reshape(&o, &[0, 0, (h * dh) as i64])
        })
    }
}
