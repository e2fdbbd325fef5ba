//! The decode graph (docs/graph-contract.md, `decode.onnx`).

use super::{builder, fixed, names, reorder_outputs, sym, EmitSpec, Emitter, BATCH};
use crate::builder::{DType, GraphBuilder, Value};
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
    let (hkv, dh, v_size) = (cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
    let (f, ml, l_len) = (p.fam_len, p.mem_len(), p.block_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_decode");
    let ids = b.input(names::INPUT_IDS, DType::I64, vec![sym(BATCH), fixed(1)]);
    let position = b.input(names::POSITION, DType::I64, vec![sym(BATCH)]);
    let kv_shape = |n: usize| vec![sym(BATCH), fixed(hkv), fixed(n), fixed(dh)];
    struct LayerIn {
        fam: Option<(Value, Value)>,
        mem: Option<(Value, Value)>,
        cache: (Value, Value),
    }
    let mut layer_in = Vec::new();
    for l in 0..cfg.num_layers {
        let fam = (f > 0).then(|| {
            (
                b.input(&names::fam_k(l), DType::F32, kv_shape(f)),
                b.input(&names::fam_v(l), DType::F32, kv_shape(f)),
            )
        });
        let mem = (ml > 0).then(|| {
            (
                b.input(&names::mem_k(l), DType::F32, kv_shape(ml)),
                b.input(&names::mem_v(l), DType::F32, kv_shape(ml)),
            )
        });
        let cache = (
            b.input(&names::cache_k(l), DType::F32, kv_shape(l_len)),
            b.input(&names::cache_v(l), DType::F32, kv_shape(l_len)),
        );
        layer_in.push(LayerIn { fam, mem, cache });
    }

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
        b.output_with_shape(&k, &names::new_k(l), kv_shape(1));
        b.output_with_shape(&v, &names::new_v(l), kv_shape(1));
        x = out;
    }
    let logits = em.head(&mut b, &x)?;
    b.output_with_shape(
        &logits,
        names::LOGITS,
        vec![sym(BATCH), fixed(1), fixed(v_size)],
    );
    reorder_outputs(b.finish()?)
}
