//! `famc.json`: what an export holds, for famc and for anyone driving the graphs by hand.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::FamParams;

/// The export format version this famc writes and reads.
pub const FORMAT_VERSION: u32 = 1;

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
    /// `fam`, `mem_k` or `mem_v`.
    pub kind: String,
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
}

/// The contents of `famc.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub famc_version: String,
    pub fam: FamParams,
    pub model: ModelDims,
    /// Element type of the weights: `f32`, `f16` or `bf16`.
    pub dtype: String,
    pub opset: i64,
    pub ir_version: i64,
    /// SHA-256 of the source checkpoint's config.json and safetensors files.
    pub checkpoint_sha256: String,
    pub graphs: GraphFiles,
    /// State tensors in graph input order.
    pub state: Vec<StateTensor>,
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
        if m.format_version != FORMAT_VERSION {
            return Err(Error::Export {
                dir: dir.to_path_buf(),
                message: format!(
                    "famc.json has format_version {}, this famc reads {FORMAT_VERSION}",
                    m.format_version
                ),
            });
        }
        Ok(m)
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
