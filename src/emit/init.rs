//! The init graph (docs/graph-contract.md, `init.onnx`).

use super::io::{contract, Declared};
use super::{builder, EmitSpec, Emitter};
use crate::builder::{GraphBuilder, TensorData, Value};
use crate::contract::Role;
use crate::error::Result;
use crate::onnx;

/// The init graph: no inputs; outputs `init_fam.{l}` [F, d] for every layer (FAM-SPEC section 3).
pub fn init_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let w = spec.weights;
    let (f, d) = (spec.fam.fam_len, cfg.hidden_size);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_init");
    let contract = contract(cfg, spec.fam);
    let c = contract.init.as_ref().ok_or_else(|| {
        crate::Error::Input("F = 0: an export without FAM has no init graph".into())
    })?;
    let io = Declared::new(&mut b, c);
    let prompt: Vec<f32> = match &w.fam_init {
        Some(a) => a.iter().copied().collect(),
        None => vec![0.0; f * d],
    };
    let mut cur = b.weight(
        "fam_init",
        TensorData::from_f32(&prompt, &[1, f as i64, d as i64]),
    )?;
    let positions: Vec<i64> = (0..f as i64).map(|i| i - f as i64).collect();
    let pos = b.const_i64(&positions, &[1, f as i64]);
    let rope = b.scoped("init", |b| em.rope_tables(b, &pos));
    for (l, lw) in w.layers.iter().enumerate() {
        let out = b.squeeze(&cur, &[0]);
        io.output(&mut b, Role::InitFam, Some(l), &out);
        if l + 1 == w.layers.len() {
            break;
        }
        b.push_scope(&format!("layers.{l}"));
        let own = |b: &mut GraphBuilder, q: &Value, k: &Value, v: &Value| {
            (em.attention(b, q, k, v, None), Vec::new())
        };
        let (next, _, _, _) = em.layer(&mut b, lw, &cur, &rope, own, &cur)?;
        b.pop_scope();
        cur = next;
    }
    io.finish(b.finish()?)
}
