//! The FAM keys/values graph (docs/graph-contract.md, `fam_kv.onnx`).

use super::{builder, fixed, names, sym, EmitSpec, Emitter, BATCH};
use crate::builder::{DType, Value};
use crate::error::Result;
use crate::onnx;

/// The FAM keys/values graph: from each layer's FAM state and the block index, the post-RoPE FAM
/// keys and values [B, Hkv, F, Dh] that every token of the block attends to. The decode graph
/// takes them as inputs, so they are computed once per block rather than once per token.
pub fn fam_kv_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let p = spec.fam;
    let (d, hkv, dh, f) = (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, p.fam_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_fam_kv");
    let block_index = b.input(names::BLOCK_INDEX, DType::I64, vec![sym(BATCH)]);
    let fams: Vec<Value> = (0..cfg.num_layers)
        .map(|l| {
            b.input(
                &names::fam(l),
                DType::F32,
                vec![sym(BATCH), fixed(f), fixed(d)],
            )
        })
        .collect();
    let rope = b.scoped("fam", |b| {
        let l_c = b.scalar_i64(p.block_len as i64);
        let start = b.mul(&block_index, &l_c);
        let start = b.unsqueeze(&start, &[1]); // [B, 1]
        let offsets: Vec<i64> = (0..f as i64).map(|i| i - f as i64).collect();
        let offsets = b.const_i64(&offsets, &[1, f as i64]);
        let pos = b.add(&start, &offsets);
        em.rope_tables(b, &pos)
    });
    let shape = vec![sym(BATCH), fixed(hkv), fixed(f), fixed(dh)];
    for (l, lw) in spec.weights.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}.attn"));
        let (_, k, v) = em.project(&mut b, lw, &fams[l], &rope, false)?;
        b.pop_scope();
        b.output_with_shape(&k, &names::fam_k(l), shape.clone());
        b.output_with_shape(&v, &names::fam_v(l), shape.clone());
    }
    Ok(b.finish()?)
}
