//! The FAM keys/values graph (docs/graph-contract.md, `fam_kv.onnx`).

use super::io::{contract, Declared};
use super::{builder, EmitSpec, Emitter};
use crate::builder::Value;
use crate::contract::Role;
use crate::error::Result;
use crate::onnx;

/// The FAM keys/values graph: from each layer's FAM state and the block index, the post-RoPE FAM
/// keys and values [B, Hkv, F, Dh] that every token of the block attends to. The decode graph
/// takes them as inputs, so they are computed once per block rather than once per token.
pub fn fam_kv_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let p = spec.fam;
    let f = p.fam_len;
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_fam_kv");
    let contract = contract(cfg, p);
    let c = contract.fam_kv.as_ref().ok_or_else(|| {
        crate::Error::Input("F = 0: an export without FAM has no fam_kv graph".into())
    })?;
    let io = Declared::new(&mut b, c);
    let block_index = io.input(Role::BlockIndex, None).expect("in the contract");
    let fams: Vec<Value> = (0..cfg.num_layers)
        .map(|l| io.input(Role::Fam, Some(l)).expect("F > 0"))
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
    for (l, lw) in spec.weights.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}.attn"));
        let (_, k, v) = em.project(&mut b, lw, &fams[l], &rope, false)?;
        b.pop_scope();
        io.output(&mut b, Role::FamK, Some(l), &k);
        io.output(&mut b, Role::FamV, Some(l), &v);
    }
    io.finish(b.finish()?)
}
