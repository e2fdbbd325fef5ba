//! `config.json`: a raw serde view resolved into a checked [`ModelConfig`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// `config.json` as Hugging Face writes it; only the fields famc reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub vocab_size: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub hidden_act: Option<String>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_scaling: Option<serde_json::Value>,
    pub fam: Option<FamDefaults>,
    pub model_type: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
}

/// FAM hyper-parameters a checkpoint may suggest in `config.json` under `"fam"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FamDefaults {
    pub block_len: Option<usize>,
    pub fam_len: Option<usize>,
    pub mem_blocks: Option<usize>,
}

/// A Llama-family configuration whose values have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// d
    pub hidden_size: usize,
    /// n
    pub num_layers: usize,
    /// H
    pub num_heads: usize,
    /// Hkv
    pub num_kv_heads: usize,
    /// Dh
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    /// V
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// FAM defaults from `config.json`, if any.
    pub fam: FamDefaults,
    /// Which attention biases the model has, as transformers builds it for `model_type`.
    pub biases: Biases,
}

/// Which `self_attn.*_proj.bias` tensors the model uses, following transformers' classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Biases {
    /// No `model_type` (or Llama with `attention_bias: true`): every bias the checkpoint has.
    WherePresent,
    /// Llama without `attention_bias`, Mistral: none; bias tensors in the file are not used.
    Ignored,
    /// Qwen2: q, k and v biases, required; no o bias.
    Qkv,
}

/// Upper bounds on configuration values: far above any Llama-family model (24B models have
/// d = 6144, 64 layers, vocabularies of 131,072), and low enough that every size famc derives
/// from them fits its integer types and a failed check comes before any allocation.
pub const CONFIG_LIMITS: [(&str, usize); 7] = [
    ("hidden_size", 1 << 16),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("head_dim", 1 << 12),
    ("intermediate_size", 1 << 20),
    ("vocab_size", 1 << 24),
];

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::resolve(raw, path)
    }

    /// Checks a raw configuration; `path` names the file in errors.
    pub fn resolve(raw: RawConfig, path: &Path) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            let limit = CONFIG_LIMITS
                .iter()
                .find(|(f, _)| *f == field)
                .map_or(usize::MAX, |(_, l)| *l);
            match v {
                None => Err(err(format!("missing field `{field}`"))),
                Some(0) => Err(err(format!("field `{field}` must be positive"))),
                Some(n) if n > limit => Err(err(format!(
                    "field `{field}` = {n} is larger than famc supports (at most {limit})"
                ))),
                Some(n) => Ok(n),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            raw.num_key_value_heads.or(Some(num_heads)),
            "num_key_value_heads",
        )?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let head_dim = match raw.head_dim {
            Some(h) => need(Some(h), "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        if num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(err(format!(
                "rms_norm_eps {rms_norm_eps} is not a finite non-negative number"
            )));
        }
        match raw.hidden_act.as_deref() {
            None | Some("silu") => {}
            Some(other) => {
                return Err(err(format!(
                    "unsupported hidden_act `{other}`: famc supports only `silu`"
                )))
            }
        }
        let rope_theta = resolve_rope(&raw, &err)?;
        let biases = resolve_family(&raw, &err)?;
        Ok(ModelConfig {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            rms_norm_eps,
            vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            rope_theta,
            fam: raw.fam.unwrap_or_default(),
            biases,
        })
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// The model family's corner cases, as transformers' Llama, Mistral and Qwen2 classes read them.
fn resolve_family(raw: &RawConfig, err: &dyn Fn(String) -> Error) -> Result<Biases> {
    if raw.mlp_bias == Some(true) {
        return Err(err(
            "`mlp_bias: true` (biases on the MLP projections) is not supported".into(),
        ));
    }
    let window = raw
        .sliding_window
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| v.to_string());
    let refuse_window = |w: String| {
        Err(err(format!(
            "`sliding_window: {w}`: transformers runs this model with sliding-window attention, \
             which famc does not compile (FAM's block attention replaces it); set it to null for \
             full causal attention"
        )))
    };
    match raw.model_type.as_deref() {
        None => Ok(Biases::WherePresent),
        Some("llama") => Ok(if raw.attention_bias == Some(true) {
            Biases::WherePresent
        } else {
            Biases::Ignored
        }),
        Some("mistral") => match window {
            Some(w) => refuse_window(w),
            None => Ok(Biases::Ignored),
        },
        Some("qwen2") => match window {
            Some(w) if raw.use_sliding_window == Some(true) => refuse_window(w),
            _ => Ok(Biases::Qkv),
        },
        Some(other) => Err(err(format!(
            "unsupported model_type `{other}`: famc compiles llama, mistral and qwen2 checkpoints"
        ))),
    }
}

/// RoPE base from `rope_parameters.rope_theta` (newer files) or top-level `rope_theta`;
/// any scaling type but the default is refused.
fn resolve_rope(raw: &RawConfig, err: &dyn Fn(String) -> Error) -> Result<f64> {
    let mut theta = raw.rope_theta;
    for (field, value) in [
        ("rope_parameters", &raw.rope_parameters),
        ("rope_scaling", &raw.rope_scaling),
    ] {
        let Some(value) = value else { continue };
        if value.is_null() {
            continue;
        }
        let Some(obj) = value.as_object() else {
            return Err(err(format!("`{field}` must be an object")));
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if kind != "default" {
            return Err(err(format!(
                "unsupported RoPE scaling `{field}.rope_type = \"{kind}\"`: famc supports only the default RoPE"
            )));
        }
        if let Some(t) = obj.get("rope_theta") {
            theta = Some(
                t.as_f64()
                    .ok_or_else(|| err(format!("`{field}.rope_theta` is not a number")))?,
            );
        }
    }
    let theta = theta.unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(err(format!("rope_theta {theta} must be a positive number")));
    }
    Ok(theta)
}

/// Upper bounds of the FAM parameters, in [`FamParams::validate`]'s order: L, F, M and M·L.
/// The paper uses L = 1024, F = 64, M = 3; one block's attention scores grow with L·(M·L).
pub const FAM_LIMITS: [(&str, usize); 4] = [
    ("block_len", 1 << 20),
    ("fam_len", 1 << 16),
    ("mem_blocks", 1 << 16),
    ("mem_len", 1 << 24),
];

/// Resolved FAM hyper-parameters: block length L, FAM length F, memory blocks M.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct FamParams {
    pub block_len: usize,
    pub fam_len: usize,
    pub mem_blocks: usize,
}

/// Positions at or past this are refused: the graphs' rotary angles are reduced in int64 fixed
/// point (2^-52 turns) whose products stay below 2^63 only while |p| < 2^37, and at 2^36 the
/// rounding of each frequency to 2^-52 turns is worth 1e-4 rad.
pub const MAX_POSITION: u64 = 1 << 36;

impl FamParams {
    /// The paper's defaults: L = 1024, F = 64, M = 3.
    pub const PAPER: FamParams = FamParams {
        block_len: 1024,
        fam_len: 64,
        mem_blocks: 3,
    };

    /// Memory slots per layer: M·L.
    pub fn mem_len(&self) -> usize {
        self.block_len * self.mem_blocks
    }

    /// Resolves flags over `config.json` defaults over the paper's defaults. When the checkpoint
    /// has a learned FAM prompt of `fam_init_rows` rows, F is that count and another is an error.
    pub fn resolve(
        flags: FamDefaults,
        config: FamDefaults,
        fam_init_rows: Option<usize>,
        config_path: &Path,
    ) -> Result<Self> {
        let block_len = flags
            .block_len
            .or(config.block_len)
            .unwrap_or(Self::PAPER.block_len);
        let mem_blocks = flags
            .mem_blocks
            .or(config.mem_blocks)
            .unwrap_or(Self::PAPER.mem_blocks);
        let fam_len = match fam_init_rows {
            Some(rows) => {
                for (what, f) in [
                    ("--fam-len", flags.fam_len),
                    ("config.json fam.fam_len", config.fam_len),
                ] {
                    if let Some(f) = f {
                        if f != rows {
                            return Err(Error::FamParams(format!(
                                "{what} = {f}, but the checkpoint's learned FAM prompt `model.fam_init` has {rows} rows ({})",
                                config_path.display()
                            )));
                        }
                    }
                }
                rows
            }
            None => flags
                .fam_len
                .or(config.fam_len)
                .unwrap_or(Self::PAPER.fam_len),
        };
        let p = FamParams {
            block_len,
            fam_len,
            mem_blocks,
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks ranges: each parameter within [`FAM_LIMITS`], so that every size and position
    /// derived from them fits the graphs' int64 and the runtimes' allocations are checked first.
    pub fn validate(&self) -> Result<()> {
        if self.block_len == 0 {
            return Err(Error::FamParams("block length L must be at least 1".into()));
        }
        for ((flag, value), (_, limit)) in [
            ("--block-len", self.block_len),
            ("--fam-len", self.fam_len),
            ("--mem-blocks", self.mem_blocks),
            (
                "memory slots M·L (--mem-blocks × --block-len)",
                self.mem_len_checked()?,
            ),
        ]
        .into_iter()
        .zip(FAM_LIMITS)
        {
            if value > limit {
                return Err(Error::FamParams(format!(
                    "{flag} = {value} is larger than famc supports (at most {limit})"
                )));
            }
        }
        Ok(())
    }

    fn mem_len_checked(&self) -> Result<usize> {
        self.block_len.checked_mul(self.mem_blocks).ok_or_else(|| {
            Error::FamParams(format!(
                "--mem-blocks {} × --block-len {} overflows",
                self.mem_blocks, self.block_len
            ))
        })
    }
}

/// Finds `config.json` in a checkpoint directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

/// The end-of-sequence token ids generation stops at, as transformers reads them:
/// `eos_token_id` (an id or a list of ids) of `generation_config.json` in `dir`, else of
/// `config.json`; empty when neither names one. An export carries `generation_config.json`.
pub fn eos_token_ids(dir: &Path) -> Result<Vec<u32>> {
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |message: String| Error::Config {
            path: path.clone(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let id = |v: &serde_json::Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(format!("eos_token_id holds {v}, not a token id")))
        };
        match json.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Array(ids)) => return ids.iter().map(id).collect(),
            Some(v) => return Ok(vec![id(v)?]),
        }
    }
    Ok(Vec::new())
}
