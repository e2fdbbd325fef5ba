//! The decode graph (docs/graph-contract.md, `decode.onnx`).

use super::io::{contract, Declared};
use super::{builder, EmitSpec, Emitter};
use crate::builder::{GraphBuilder, Value};
use crate::contract::Role;
use crate::error::Result;
use crate::onnx;

/// The decode graph: one token per stream at absolute position `position`, attending to the
/// valid memory, the block's FAM keys/values and the in-block key/value cache.
///
/// Inputs: `input_ids` [B, 1], `position` [B], then per layer `fam_k.{l}`, `fam_v.{l}`
/// [B, Hkv, F, Dh] (F > 0), `mem_k.{l}`, `mem_v.{l}` [B, Hkv, M·L, Dh] (M > 0), `cache_k.{l}`,
/// `cache_v.{l}` [B, Hkv, L, Dh] (slots before `position mod L` read). Outputs: `logits`
/// [B, 1, V] and per layer `new_k.{l}`, `new_v.{l}` [B, Hkv, 1, Dh]: this token's key and value,
/// which the caller writes into slot `position mod L` of its cache. No key or value is copied in
/// the graph: the caches stay where the caller keeps them, and only one row per layer comes out.
pub fn decode_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let p = spec.fam;
    p.validate()?;
    let (f, ml, l_len) = (p.fam_len, p.mem_len(), p.block_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_decode");
    let contract = contract(cfg, p);
    let io = Declared::new(&mut b, &contract.decode);
    let ids = io.input(Role::InputIds, None).expect("in the contract");
    let position = io.input(Role::Position, None).expect("in the contract");
    struct LayerIn {
        fam: Option<(Value, Value)>,
        mem: Option<(Value, Value)>,
        cache: (Value, Value),
    }
    let layer_in: Vec<LayerIn> = (0..cfg.num_layers)
        .map(|l| LayerIn {
            fam: io.pair(Role::FamK, Role::FamV, l),
            mem: io.pair(Role::MemK, Role::MemV, l),
            cache: io
                .pair(Role::CacheK, Role::CacheV, l)
                .expect("every layer has a cache"),
        })
        .collect();

    let (rope, mask) = b.scoped("decode", |b| {
        let l_c = b.scalar_i64(l_len as i64);
        let tau = b.div(&position, &l_c); // [B]
        let start = b.mul(&tau, &l_c);
        let in_block = b.sub(&position, &start); // [B]
        let pos = b.unsqueeze(&position, &[1]); // [B, 1]
        let rope = em.rope_tables(b, &pos);
        let mask = em.decode_mask(b, &position, &start, &in_block);
        (rope, mask)
    });

    let mut x = em.embed(&mut b, &ids)?; // [B, 1, d]
    for (l, lw) in spec.weights.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}"));
        let li = &layer_in[l];
        let attend = |b: &mut GraphBuilder, q: &Value, k: &Value, v: &Value| {
            let mut parts = Vec::new();
            if let Some((mk, mv)) = &li.mem {
                parts.push((mk, mv, ml));
            }
            if let Some((fk, fv)) = &li.fam {
                parts.push((fk, fv, f));
            }
            parts.push((&li.cache.0, &li.cache.1, l_len));
            (em.split_attention(b, q, &parts, (k, v), &mask), Vec::new())
        };
        let (out, k, v, _) = em.layer(&mut b, lw, &x, &rope, attend, &x)?;
        b.pop_scope();
        io.output(&mut b, Role::NewK, Some(l), &k);
        io.output(&mut b, Role::NewV, Some(l), &v);
        x = out;
    }
    let logits = em.head(&mut b, &x)?;
    io.output(&mut b, Role::Logits, None, &logits);
    io.finish(b.finish()?)
}
