//! The graph contract ([`crate::contract`]), produced here once: every graph declares its inputs
//! and outputs from it, so the names, roles, order and shapes famc.json records are those of the
//! graphs by construction.

use super::{names, BATCH, TOKENS};
use crate::builder::{DType, Dim, GraphBuilder, Value};
use crate::contract::{Contract, GraphContract, Io, IoDim, IoType, Role};
use crate::error::{Error, Result};
use crate::model::{FamParams, ModelConfig};
use crate::onnx;

/// The contract of every graph of an export of `cfg` with `fam`.
pub fn contract(cfg: &ModelConfig, fam: FamParams) -> Contract {
    let (d, hkv, dh, v) = (
        cfg.hidden_size,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (f, ml, l_len) = (fam.fam_len, fam.mem_len(), fam.block_len);
    let n = IoDim::Fixed;
    let batch = || IoDim::Sym(BATCH.into());
    let io = |name: &str, role, layer, dtype, shape| Io {
        name: name.into(),
        role,
        layer,
        dtype,
        shape,
    };
    let f32_io =
        |name: &str, role, layer: usize, shape| io(name, role, Some(layer), IoType::Float32, shape);
    // the per-model tensors: token ids, block index, position, targets (int64); logits and
    // log-probabilities (float32)
    let whole = |name: &str, role, shape| {
        let dtype = if matches!(role, Role::Logits | Role::TargetLogprob) {
            IoType::Float32
        } else {
            IoType::Int64
        };
        io(name, role, None, dtype, shape)
    };
    let tokens = || IoDim::Sym(TOKENS.into());
    let kv = |rows: usize| vec![batch(), n(hkv), n(rows), n(dh)];
    let layers = 0..cfg.num_layers;

    let mut block = GraphContract::default();
    block.inputs.push(whole(
        names::INPUT_IDS,
        Role::InputIds,
        vec![batch(), tokens()],
    ));
    block
        .inputs
        .push(whole(names::BLOCK_INDEX, Role::BlockIndex, vec![batch()]));
    block.outputs.push(whole(
        names::LOGITS,
        Role::Logits,
        vec![batch(), tokens(), n(v)],
    ));
    for l in layers.clone() {
        let mut state = Vec::new();
        if f > 0 {
            state.push((names::fam(l), Role::Fam, vec![batch(), n(f), n(d)]));
        }
        if ml > 0 {
            state.push((names::mem_k(l), Role::MemK, kv(ml)));
            state.push((names::mem_v(l), Role::MemV, kv(ml)));
        }
        for (name, role, shape) in state {
            let next = role.next().expect("a state role");
            block
                .outputs
                .push(f32_io(&names::next(&name), next, l, shape.clone()));
            block.inputs.push(f32_io(&name, role, l, shape));
        }
    }

    // the block graph scored: targets in after the block index, log-probabilities out for logits
    let mut score = block.clone();
    let after_index = block
        .input_index(Role::BlockIndex, None)
        .expect("declared above")
        + 1;
    score.inputs.insert(
        after_index,
        whole(names::TARGETS, Role::Targets, vec![batch(), tokens()]),
    );
    let logits_at = block
        .output_index(Role::Logits, None)
        .expect("declared above");
    score.outputs[logits_at] = whole(
        names::TARGET_LOGPROB,
        Role::TargetLogprob,
        vec![batch(), tokens()],
    );

    let init = (f > 0).then(|| GraphContract {
        inputs: Vec::new(),
        outputs: layers
            .clone()
            .map(|l| f32_io(&names::init_fam(l), Role::InitFam, l, vec![n(f), n(d)]))
            .collect(),
    });

    let fam_kv = (f > 0).then(|| {
        let mut c = GraphContract::default();
        c.inputs
            .push(whole(names::BLOCK_INDEX, Role::BlockIndex, vec![batch()]));
        for l in layers.clone() {
            c.inputs.push(f32_io(
                &names::fam(l),
                Role::Fam,
                l,
                vec![batch(), n(f), n(d)],
            ));
            c.outputs
                .push(f32_io(&names::fam_k(l), Role::FamK, l, kv(f)));
            c.outputs
                .push(f32_io(&names::fam_v(l), Role::FamV, l, kv(f)));
        }
        c
    });

    let mut decode = GraphContract::default();
    decode
        .inputs
        .push(whole(names::INPUT_IDS, Role::InputIds, vec![batch(), n(1)]));
    decode
        .inputs
        .push(whole(names::POSITION, Role::Position, vec![batch()]));
    decode.outputs.push(whole(
        names::LOGITS,
        Role::Logits,
        vec![batch(), n(1), n(v)],
    ));
    for l in layers {
        let mut parts = Vec::new();
        if f > 0 {
            parts.extend([
                (names::fam_k(l), Role::FamK, f),
                (names::fam_v(l), Role::FamV, f),
            ]);
        }
        if ml > 0 {
            parts.extend([
                (names::mem_k(l), Role::MemK, ml),
                (names::mem_v(l), Role::MemV, ml),
            ]);
        }
        parts.extend([
            (names::cache_k(l), Role::CacheK, l_len),
            (names::cache_v(l), Role::CacheV, l_len),
        ]);
        for (name, role, rows) in parts {
            decode.inputs.push(f32_io(&name, role, l, kv(rows)));
        }
        for (name, role) in [(names::new_k(l), Role::NewK), (names::new_v(l), Role::NewV)] {
            decode.outputs.push(f32_io(&name, role, l, kv(1)));
        }
    }
    Contract {
        block,
        init,
        decode,
        fam_kv,
        score: Some(score),
    }
}

fn dims(shape: &[IoDim]) -> Vec<Dim> {
    shape
        .iter()
        .map(|d| match d {
            IoDim::Fixed(n) => Dim::Fixed(*n as i64),
            IoDim::Sym(s) => Dim::Sym(s.clone()),
        })
        .collect()
}

/// A graph's inputs, declared from its contract, and its outputs, bound by role while it is built.
pub(super) struct Declared<'c> {
    contract: &'c GraphContract,
    inputs: Vec<Value>,
}

impl<'c> Declared<'c> {
    /// Declares every input of `contract` on `b`, in contract order.
    pub fn new(b: &mut GraphBuilder, contract: &'c GraphContract) -> Self {
        let inputs = contract
            .inputs
            .iter()
            .map(|io| {
                let dtype = match io.dtype {
                    IoType::Float32 => DType::F32,
                    IoType::Int64 => DType::I64,
                };
                b.input(&io.name, dtype, dims(&io.shape))
            })
            .collect();
        Declared { contract, inputs }
    }

    /// The input with `role` and `layer` (`None` when the contract has none, e.g. FAM with F = 0).
    pub fn input(&self, role: Role, layer: Option<usize>) -> Option<Value> {
        let i = self
            .contract
            .inputs
            .iter()
            .position(|io| io.role == role && io.layer == layer)?;
        Some(self.inputs[i].clone())
    }

    /// The key and value inputs with roles `k` and `v` of `layer`, when the contract has both.
    pub fn pair(&self, k: Role, v: Role, layer: usize) -> Option<(Value, Value)> {
        self.input(k, Some(layer)).zip(self.input(v, Some(layer)))
    }

    /// Makes `v` the output with `role` and `layer`, with the contract's name and shape.
    pub fn output(&self, b: &mut GraphBuilder, role: Role, layer: Option<usize>, v: &Value) {
        let io = self
            .contract
            .output(role, layer)
            .unwrap_or_else(|| panic!("the contract has no {role:?} output for layer {layer:?}"));
        b.output_with_shape(v, &io.name, dims(&io.shape));
    }

    /// Puts the finished graph's outputs in contract order, refusing a graph that lacks one.
    pub fn finish(&self, mut m: onnx::ModelProto) -> Result<onnx::ModelProto> {
        if let Some(g) = m.graph.as_mut() {
            let mut outputs = std::mem::take(&mut g.output);
            for io in &self.contract.outputs {
                let i = outputs
                    .iter()
                    .position(|o| o.name == io.name)
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "graph `{}` lacks its contract's output `{}`",
                            g.name, io.name
                        ))
                    })?;
                g.output.push(outputs.remove(i));
            }
            if let Some(extra) = outputs.first() {
                return Err(Error::Input(format!(
                    "graph `{}` has an output its contract lacks: `{}`",
                    g.name, extra.name
                )));
            }
        }
        Ok(m)
    }
}
