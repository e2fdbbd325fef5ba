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
}

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
            match v {
                None => Err(err(format!("missing field `{field}`"))),
                Some(0) => Err(err(format!("field `{field}` must be positive"))),
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
        })
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
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

/// Resolved FAM hyper-parameters: block length L, FAM length F, memory blocks M.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct FamParams {
    pub block_len: usize,
    pub fam_len: usize,
    pub mem_blocks: usize,
}

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

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if self.block_len == 0 {
            return Err(Error::FamParams("block length L must be at least 1".into()));
        }
        Ok(())
    }
}

/// Finds `config.json` in a checkpoint directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
