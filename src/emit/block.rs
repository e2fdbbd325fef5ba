//! The block graph (docs/graph-contract.md, `block.onnx`) and the same graph scoring its rows
//! against given targets (`score.onnx`).

use super::io::{contract, Declared};
use super::masks::BlockRows;
use super::{builder, EmitSpec, Emitter};
use crate::builder::{DType, GraphBuilder, Value};
use crate::contract::Role;
use crate::error::Result;
use crate::onnx;

/// The block graph: one block of up to L tokens for a batch of streams, state in and out.
pub fn block_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    emit_block(spec, false)
}

/// The score graph: the block graph with each row's target token in (`targets` [B, T]) and its
/// log-probability out (`target_logprob` [B, T]) instead of the logits, so that scoring brings
/// back T numbers per stream, not T·V.
pub fn score_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    emit_block(spec, true)
}

fn emit_block(spec: &EmitSpec, scored: bool) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let w = spec.weights;
    let p = spec.fam;
    p.validate()?;
    let (f, ml, l_len) = (p.fam_len, p.mem_len(), p.block_len);
    let em = Emitter { spec };
    let mut b = builder(spec, if scored { "famc_score" } else { "famc_block" });
    let contract = contract(cfg, p);
    let graph = if scored {
        contract
            .score
            .as_ref()
            .expect("every emitted contract has a score graph")
    } else {
        &contract.block
    };
    let io = Declared::new(&mut b, graph);
    let ids = io.input(Role::InputIds, None).expect("in every contract");
    let block_index = io.input(Role::BlockIndex, None).expect("in every contract");
    let state_in: Vec<_> = (0..cfg.num_layers)
        .map(|l| {
            let fam = io.input(Role::Fam, Some(l));
            let mem = io.pair(Role::MemK, Role::MemV, l);
            (fam, mem)
        })
        .collect();

    // Positions, masks and the first-update factor, shared by every layer.
    let (rope, mask, first_factor) = b.scoped("block", |b| {
        let shape = b.shape(&ids);
        let one = b.scalar_i64(1);
        let t = b.gather(&shape, &one, 0);
        let f_c = b.scalar_i64(f as i64);
        let q_len = b.add(&t, &f_c);
        let zero = b.scalar_i64(0);
        let rows = b.range(&zero, &q_len, &one); // [Q]
        let l_c = b.scalar_i64(l_len as i64);
        let start = b.mul(&block_index, &l_c);
        let first_pos = b.sub(&start, &f_c);
        let first_pos = b.unsqueeze(&first_pos, &[1]); // [B, 1]
        let pos_i = b.add(&first_pos, &rows); // [B, Q]
        let rope = em.rope_tables(b, &pos_i);

        let mask = em.block_mask(
            b,
            &BlockRows {
                rows: &rows,
                positions: &pos_i,
                count: &q_len,
                start: &start,
                block_index: &block_index,
                fam_len: &f_c,
            },
        );
        let first_factor = (f > 0).then(|| {
            let later = b.greater(&block_index, &zero);
            let later = b.cast(&later, DType::F32);
            b.unsqueeze(&later, &[1, 2]) // [B, 1, 1]
        });
        (rope, mask, first_factor)
    });

    let mut x = em.embed(&mut b, &ids)?; // [B, T, d]
    for (l, lw) in w.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}"));
        let (fam, mem) = &state_in[l];
        let (rows, residual) = match (fam, &first_factor) {
            (Some(fam), Some(factor)) => {
                let rows = b.concat(&[fam, &x], 1);
                let fam_res = b.mul(fam, factor);
                let residual = b.concat(&[&fam_res, &x], 1);
                (rows, residual)
            }
            _ => (x.clone(), x.clone()),
        };
        let with_memory = |b: &mut GraphBuilder, q: &Value, k: &Value, v: &Value| {
            let (keys, values) = match mem {
                Some((mk, mv)) => (b.concat(&[mk, k], 2), b.concat(&[mv, v], 2)),
                None => (k.clone(), v.clone()),
            };
            (em.attention(b, q, &keys, &values, Some(&mask)), Vec::new())
        };
        let (out, k, v, _) = em.layer(&mut b, lw, &rows, &rope, with_memory, &residual)?;
        if fam.is_some() {
            let next_fam = b.slice(&out, &[0], &[f as i64], &[1], None);
            io.output(&mut b, Role::NextFam, Some(l), &next_fam);
            x = b.slice(&out, &[f as i64], &[i64::MAX], &[1], None);
        } else {
            x = out;
        }
        if let Some((mk, mv)) = mem {
            for (memory, new, role) in [(mk, &k, Role::NextMemK), (mv, &v, Role::NextMemV)] {
                let block_part = if f > 0 {
                    b.slice(new, &[f as i64], &[i64::MAX], &[2], None)
                } else {
                    new.clone()
                };
                let all = b.concat(&[memory, &block_part], 2);
                let kept = b.slice(&all, &[-(ml as i64)], &[i64::MAX], &[2], None);
                io.output(&mut b, role, Some(l), &kept);
            }
        }
        b.pop_scope();
    }
    let logits = em.head(&mut b, &x)?;
    match io.input(Role::Targets, None) {
        Some(targets) => {
            let lp = b.scoped("score", |b| em.target_logprob(b, &logits, &targets));
            io.output(&mut b, Role::TargetLogprob, None, &lp);
        }
        None => io.output(&mut b, Role::Logits, None, &logits),
    }
    io.finish(b.finish()?)
}
