//! Emission of the FAM graphs (docs/graph-contract.md): what FAM computes, one file per graph
//! (`block`, `init`, `fam_kv`, `decode`), built from shared parts (`embed`, `layer`, `head`,
//! `masks`) and from the spelling of each operation family (`norm`, `rotary`, `attention`,
//! `linear`).
//!
//! Each layer runs the F FAM rows and the T block rows as one sequence of F + T rows at positions
//! s − F … s + T − 1, so the FAM and block projections share one MatMul each. One additive mask
//! gives both attention patterns of FAM-SPEC section 2: FAM rows see every FAM and block key and
//! no memory; block rows see the valid memory, every FAM key and the block keys up to their own.

use crate::builder::GraphBuilder;
use crate::error::Result;
use crate::model::{FamParams, LlamaWeights, ModelConfig};
use crate::onnx::Target;

/// `com.microsoft` (ONNX Runtime's contrib operators), version 1.
const MS_DOMAIN: &str = "com.microsoft";

/// Additive mask value for hidden keys: finite, so no row ever turns into NaN.
const MASKED: f32 = -1e9;

mod attention;
mod block;
mod decode;
mod embed;
mod fam_kv;
mod head;
mod init;
mod io;
mod layer;
mod linear;
mod lowering;
mod masks;
mod norm;
mod rotary;

pub use block::{block_graph, score_graph};
pub use decode::decode_graph;
pub use fam_kv::fam_kv_graph;
pub use init::init_graph;
pub use io::contract;

pub mod quant;
pub mod triton;

/// Names of graph inputs and outputs (docs/graph-contract.md).
pub mod names {
    pub const INPUT_IDS: &str = "input_ids";
    pub const BLOCK_INDEX: &str = "block_index";
    pub const LOGITS: &str = "logits";
    pub const TARGETS: &str = "targets";
    pub const TARGET_LOGPROB: &str = "target_logprob";

    pub fn fam(l: usize) -> String {
        format!("fam.{l}")
    }
    pub fn mem_k(l: usize) -> String {
        format!("mem_k.{l}")
    }
    pub fn mem_v(l: usize) -> String {
        format!("mem_v.{l}")
    }
    /// The output carrying the next value of state input `input`.
    pub fn next(input: &str) -> String {
        format!("next_{input}")
    }
    pub fn init_fam(l: usize) -> String {
        format!("init_fam.{l}")
    }
    pub const POSITION: &str = "position";
    pub fn fam_k(l: usize) -> String {
        format!("fam_k.{l}")
    }
    pub fn fam_v(l: usize) -> String {
        format!("fam_v.{l}")
    }
    pub fn cache_k(l: usize) -> String {
        format!("cache_k.{l}")
    }
    pub fn cache_v(l: usize) -> String {
        format!("cache_v.{l}")
    }
    /// The decode graph's output: this token's key for the cache of layer `l`.
    pub fn new_k(l: usize) -> String {
        format!("new_k.{l}")
    }
    pub fn new_v(l: usize) -> String {
        format!("new_v.{l}")
    }
}

/// Symbolic dimension names.
pub const BATCH: &str = "batch";
/// The block's token count, 1 ≤ T ≤ L.
pub const TOKENS: &str = "T";

/// What the emitter needs to know about the model.
pub struct EmitSpec<'a> {
    pub config: &'a ModelConfig,
    pub weights: &'a LlamaWeights,
    pub fam: FamParams,
    /// How weight matrices are stored; computation is f32 whatever this is.
    pub weight_dtype: WeightDtype,
    /// `MatMulNBits`' `accuracy_level` for q8/q4 (1: f32 compute; 4: int8 compute).
    pub accuracy_level: i64,
    /// What the projection and MLP products take their activations as.
    pub activations: Activations,
    /// Where initializers over the given size go as they are emitted; `None` keeps them in
    /// the graphs.
    pub store: Option<(crate::builder::SharedStore, usize)>,
    /// How the graphs spell norm, rotary and attention.
    pub target: Target,
}

/// A builder for graph `name`, writing large weights into `spec`'s store when it has one.
fn builder(spec: &EmitSpec, name: &str) -> GraphBuilder {
    let mut b = GraphBuilder::new(name, spec.target.opset());
    b.set_ir_version(spec.target.ir_version());
    if let Some((store, threshold)) = &spec.store {
        b.set_store(store.clone(), *threshold);
    }
    b
}

/// Element type of the stored weight matrices (embedding, projections, MLP, output head).
///
/// Half-precision matrices are cast to f32 where they are used, so RMSNorm statistics, softmax,
/// residual sums and logits stay f32; ONNX Runtime folds those casts when it loads the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    BF16,
    /// Blockwise int8 (`com.microsoft.MatMulNBits`, 8 bits); the embedding int8 too.
    Q8,
    /// Blockwise int4 (`com.microsoft.MatMulNBits`, 4 bits, with a per-block offset); the
    /// embedding and a tied head int8.
    Q4,
}

impl WeightDtype {
    /// `f32`, `f16`, `bf16`, `q8` or `q4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Q8 => "q8",
            WeightDtype::Q4 => "q4",
        }
    }

    /// The code width of a quantized dtype (`None` for the float ones).
    pub fn bits(self) -> Option<u32> {
        match self {
            WeightDtype::Q8 => Some(8),
            WeightDtype::Q4 => Some(4),
            _ => None,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::BF16),
            "q8" => Ok(WeightDtype::Q8),
            "q4" => Ok(WeightDtype::Q4),
            other => Err(crate::Error::Input(format!(
                "unknown dtype `{other}` (f32, f16, bf16, q8 or q4)"
            ))),
        }
    }
}

/// What the products of the projection and MLP matrices compute from (docs/graph-contract.md,
/// "Quantized weights").
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f32 activations against the stored weights.
    #[default]
    F32,
    /// q8 only: each activation row quantized to int8 around its own absolute maximum, times
    /// int8 weights with one scale per output channel (`MatMulInteger`): about 3x faster
    /// products in prefill, at a perplexity cost (docs/BENCHMARKS.md).
    Int8,
}

impl Activations {
    /// Whether this is the default, f32 (which famc.json leaves unsaid).
    pub fn is_f32(&self) -> bool {
        *self == Activations::F32
    }
}

struct Emitter<'a> {
    spec: &'a EmitSpec<'a>,
}

impl<'a> Emitter<'a> {
    fn cfg(&self) -> &ModelConfig {
        self.spec.config
    }

    fn lowering(&self) -> lowering::Lowering {
        lowering::Lowering::of(self.spec.target)
    }
}
