//! `famc.json`: what an export holds, for famc and for anyone driving the graphs by hand.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::contract::{Contract, IoDim, Role};
use crate::emit::Activations;
use crate::error::{Error, Result};
use crate::model::FamParams;
use crate::onnx::Target;

/// The export format version this famc writes and reads (2: `files` with sizes and hashes; 3: the
/// decode graph returns each layer's new key/value row instead of the whole cache, and `contract`
/// lists every graph's inputs and outputs).
pub const FORMAT_VERSION: u32 = 3;

/// The manifest file's name inside an export directory.
pub const MANIFEST_FILE: &str = "famc.json";

/// Model dimensions the graphs were built for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDims {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
}

/// One state tensor carried between block calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTensor {
    /// Graph input name (the state before the block).
    pub input: String,
    /// Graph output name (the state after the block).
    pub output: String,
    /// Output name of the init graph that gives its initial value, when not zeros.
    pub init: Option<String>,
    /// Shape without the leading batch dimension.
    pub shape: Vec<usize>,
    pub layer: usize,
    /// The block graph input's role: `fam`, `mem_k` or `mem_v`.
    pub kind: Role,
}

/// The graph files of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFiles {
    /// The block graph: one block of up to L tokens for a batch of streams.
    pub block: String,
    /// The init graph (no inputs) giving the initial FAM state; absent when F = 0.
    pub init: Option<String>,
    /// The decode graph: one token per stream against memory, FAM keys/values and a cache.
    #[serde(default)]
    pub decode: Option<String>,
    /// The FAM keys/values graph: a block's FAM keys and values for the decode graph (F > 0).
    #[serde(default)]
    pub fam_kv: Option<String>,
    /// The score graph: the block graph returning its rows' target log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
}

impl GraphFiles {
    /// Every graph file named, block first.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        [
            Some(&self.block),
            self.init.as_ref(),
            self.decode.as_ref(),
            self.fam_kv.as_ref(),
            self.score.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// The contents of `famc.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub famc_version: String,
    pub fam: FamParams,
    pub model: ModelDims,
    /// Element type of the weights: `f32`, `f16`, `bf16`, `q8` or `q4`.
    pub dtype: String,
    /// What the projection and MLP products compute from (absent: f32).
    #[serde(default, skip_serializing_if = "Activations::is_f32")]
    pub activations: Activations,
    pub opset: i64,
    pub ir_version: i64,
    /// What the graphs were emitted for (absent from exports that predate targets: opset 17).
    #[serde(default)]
    pub target: Target,
    /// SHA-256 of the source checkpoint's config.json and safetensors files.
    pub checkpoint_sha256: String,
    pub graphs: GraphFiles,
    /// State tensors in graph input order.
    pub state: Vec<StateTensor>,
    /// Every input and output of every graph, with its role, layer and shape.
    pub contract: Contract,
    /// Every other file of the export (graphs, their external data, tokenizer files) with its
    /// size and SHA-256, as written. Absent from the copy embedded in each graph, which is
    /// written before the hashes are known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileEntry>,
}

/// Size and hash of one file of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    /// Reads and checks `famc.json` in `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let err = |message: String| Error::Export {
            dir: dir.to_path_buf(),
            message,
        };
        if m.format_version != FORMAT_VERSION {
            return Err(err(format!(
                "famc.json has format_version {}, this famc reads {FORMAT_VERSION}: re-export the checkpoint with this famc",
                m.format_version
            )));
        }
        for name in m.graphs.names().chain(m.files.keys()) {
            if !is_plain_file_name(name) {
                return Err(err(format!(
                    "famc.json names the file `{name}`, which is not a plain file name inside the export directory"
                )));
            }
        }
        if (m.opset, m.ir_version) != (m.target.opset(), m.target.ir_version()) {
            return Err(err(format!(
                "famc.json says target {} with opset {} and ir_version {}; that target's graphs are opset {} and ir_version {}",
                m.target,
                m.opset,
                m.ir_version,
                m.target.opset(),
                m.target.ir_version()
            )));
        }
        m.fam.validate()?;
        m.check_contract().map_err(err)?;
        Ok(m)
    }

    /// The contract agrees with the rest of famc.json: one contract per graph file, the block
    /// graph's state inputs and outputs those of `state`, logits over `vocab_size`.
    fn check_contract(&self) -> std::result::Result<(), String> {
        let c = &self.contract;
        for (graph, file, contract) in [
            ("init", &self.graphs.init, c.init.is_some()),
            ("fam_kv", &self.graphs.fam_kv, c.fam_kv.is_some()),
            ("score", &self.graphs.score, c.score.is_some()),
        ] {
            if file.is_some() != contract {
                return Err(format!(
                    "famc.json {} the {graph} graph but {} a contract for it",
                    if file.is_some() {
                        "names"
                    } else {
                        "does not name"
                    },
                    if contract { "has" } else { "lacks" }
                ));
            }
        }
        let block = &c.block;
        for st in &self.state {
            let input = block.input(st.kind, Some(st.layer));
            let output = st.kind.next().and_then(|r| block.output(r, Some(st.layer)));
            let want: Vec<IoDim> = std::iter::once(IoDim::Sym(crate::emit::BATCH.into()))
                .chain(st.shape.iter().map(|&d| IoDim::Fixed(d)))
                .collect();
            let fits = match (input, output) {
                (Some(i), Some(o)) => {
                    i.name == st.input && o.name == st.output && i.shape == want && o.shape == want
                }
                _ => false,
            };
            if !fits {
                return Err(format!(
                    "state `{}` (layer {}, {}) is not a block-graph input and output of famc.json's contract with that name and shape",
                    st.input, st.layer, st.kind
                ));
            }
            if let Some(init) = &st.init {
                let named = c
                    .init
                    .as_ref()
                    .and_then(|g| g.output(Role::InitFam, Some(st.layer)))
                    .is_some_and(|o| &o.name == init);
                if !named {
                    return Err(format!(
                        "state `{}` starts from init output `{init}`, which famc.json's contract does not list for layer {}",
                        st.input, st.layer
                    ));
                }
            }
        }
        let state_inputs = block
            .inputs
            .iter()
            .filter(|io| io.role.next().is_some())
            .count();
        if state_inputs != self.state.len() {
            return Err(format!(
                "famc.json's contract gives the block graph {state_inputs} state inputs, its state list {}",
                self.state.len()
            ));
        }
        for (graph, g) in [("block", block), ("decode", &c.decode)] {
            let vocab = g
                .output(Role::Logits, None)
                .and_then(|o| o.shape.last().cloned());
            if vocab != Some(IoDim::Fixed(self.model.vocab_size)) {
                return Err(format!(
                    "famc.json's contract gives the {graph} graph no logits over vocab_size {}",
                    self.model.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// The index in `state` of the state tensor with `role` and `layer`.
    pub fn state_index(&self, role: Role, layer: Option<usize>) -> Option<usize> {
        self.state
            .iter()
            .position(|s| s.kind == role && Some(s.layer) == layer)
    }

    /// This manifest as each graph embeds it: without `files`.
    pub fn embedded(&self) -> Manifest {
        Manifest {
            files: BTreeMap::new(),
            ..self.clone()
        }
    }

    /// Writes `famc.json` into `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        crate::io::write_atomic(&dir.join(MANIFEST_FILE), |w| {
            w.write_all(text.as_bytes())?;
            w.write_all(b"\n")
        })
    }
}

pub use crate::io::is_plain_file_name;
