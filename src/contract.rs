//! The graph contract (docs/graph-contract.md): every input and output of every graph of an
//! export, with what it carries (its role), its layer and its shape. The emitter produces it once
//! and declares each graph's inputs and outputs from it, famc.json stores it, and the runtime
//! binds tensors by role and layer, never by position or by name.

use serde::{Deserialize, Serialize};

/// What a graph input or output carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Token ids: [batch, T] (block), [batch, 1] (decode).
    InputIds,
    /// Each stream's block index τ [batch].
    BlockIndex,
    /// Each stream's absolute token position [batch] (decode).
    Position,
    /// Logits [batch, T, V].
    Logits,
    /// Each row's target token, the one it is scored on [batch, T] (score graph).
    Targets,
    /// Each row's log-probability of its target, log softmax(logits)[target] [batch, T] (score
    /// graph).
    TargetLogprob,
    /// A layer's FAM state [batch, F, d]: a state input of the block graph, an input of fam_kv.
    Fam,
    /// A layer's memory keys [batch, Hkv, M·L, Dh].
    MemK,
    /// A layer's memory values [batch, Hkv, M·L, Dh].
    MemV,
    /// The next FAM state (block graph).
    NextFam,
    /// The next memory keys (block graph).
    NextMemK,
    /// The next memory values (block graph).
    NextMemV,
    /// A layer's initial FAM state [F, d] (init graph).
    InitFam,
    /// A block's post-RoPE FAM keys [batch, Hkv, F, Dh] (fam_kv output, decode input).
    FamK,
    /// A block's FAM values [batch, Hkv, F, Dh].
    FamV,
    /// The in-block key cache [batch, Hkv, L, Dh] (decode).
    CacheK,
    /// The in-block value cache [batch, Hkv, L, Dh] (decode).
    CacheV,
    /// The decoded token's key [batch, Hkv, 1, Dh], for its cache slot (decode).
    NewK,
    /// The decoded token's value [batch, Hkv, 1, Dh].
    NewV,
}

impl Role {
    /// The role's name in famc.json (`input_ids`, `fam`, `mem_k`, …).
    pub fn name(self) -> &'static str {
        match self {
            Role::InputIds => "input_ids",
            Role::BlockIndex => "block_index",
            Role::Position => "position",
            Role::Logits => "logits",
            Role::Targets => "targets",
            Role::TargetLogprob => "target_logprob",
            Role::Fam => "fam",
            Role::MemK => "mem_k",
            Role::MemV => "mem_v",
            Role::NextFam => "next_fam",
            Role::NextMemK => "next_mem_k",
            Role::NextMemV => "next_mem_v",
            Role::InitFam => "init_fam",
            Role::FamK => "fam_k",
            Role::FamV => "fam_v",
            Role::CacheK => "cache_k",
            Role::CacheV => "cache_v",
            Role::NewK => "new_k",
            Role::NewV => "new_v",
        }
    }

    /// The state output that carries the next value of a state input (`None`: not state).
    pub fn next(self) -> Option<Role> {
        match self {
            Role::Fam => Some(Role::NextFam),
            Role::MemK => Some(Role::NextMemK),
            Role::MemV => Some(Role::NextMemV),
            _ => None,
        }
    }
}

/// Element type of a graph input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoType {
    Float32,
    Int64,
}

/// One dimension: a size, or a symbol (`batch`, `T`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IoDim {
    Fixed(usize),
    Sym(String),
}

impl std::fmt::Display for IoDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoDim::Fixed(n) => write!(f, "{n}"),
            IoDim::Sym(s) => f.write_str(s),
        }
    }
}

/// One input or output of a graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Io {
    pub name: String,
    pub role: Role,
    /// The decoder layer, for per-layer tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    #[serde(rename = "type")]
    pub dtype: IoType,
    pub shape: Vec<IoDim>,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The inputs and outputs of one graph, in graph order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphContract {
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
}

impl GraphContract {
    /// The input with `role` (and `layer`, for per-layer ones).
    pub fn input(&self, role: Role, layer: Option<usize>) -> Option<&Io> {
        self.inputs
            .iter()
            .find(|io| io.role == role && io.layer == layer)
    }

    /// The output with `role` (and `layer`).
    pub fn output(&self, role: Role, layer: Option<usize>) -> Option<&Io> {
        self.outputs
            .iter()
            .find(|io| io.role == role && io.layer == layer)
    }

    /// The position of the input with `role` and `layer`, in graph order.
    pub fn input_index(&self, role: Role, layer: Option<usize>) -> Option<usize> {
        self.inputs
            .iter()
            .position(|io| io.role == role && io.layer == layer)
    }

    /// The position of the output with `role` and `layer`, in graph order.
    pub fn output_index(&self, role: Role, layer: Option<usize>) -> Option<usize> {
        self.outputs
            .iter()
            .position(|io| io.role == role && io.layer == layer)
    }
}

/// The contracts of an export's graphs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    pub block: GraphContract,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<GraphContract>,
    pub decode: GraphContract,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam_kv: Option<GraphContract>,
    /// The block graph scoring its rows against given targets instead of returning logits
    /// (absent from exports that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<GraphContract>,
}
