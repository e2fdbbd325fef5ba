//! Llama-family checkpoints: configuration and weights.

mod config;
pub mod synthetic;
mod weights;

pub use config::{
    config_path, eos_token_ids, Biases, FamDefaults, FamParams, ModelConfig, RawConfig,
    CONFIG_LIMITS, FAM_LIMITS, MAX_POSITION,
};
pub use weights::{TensorStore, WeightLoader};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array1, Array2};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Weights of one attention block's projections; biases where the checkpoint has them (Qwen2).
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    /// [H·Dh, d]
    pub q_proj: Array2<f32>,
    /// [Hkv·Dh, d]
    pub k_proj: Array2<f32>,
    /// [Hkv·Dh, d]
    pub v_proj: Array2<f32>,
    /// [d, H·Dh]
    pub o_proj: Array2<f32>,
    pub q_bias: Option<Array1<f32>>,
    pub k_bias: Option<Array1<f32>>,
    pub v_bias: Option<Array1<f32>>,
    pub o_bias: Option<Array1<f32>>,
}

/// The gated MLP: down(silu(gate(z)) * up(z)).
#[derive(Debug, Clone)]
pub struct MlpWeights {
    /// [I, d]
    pub gate_proj: Array2<f32>,
    /// [I, d]
    pub up_proj: Array2<f32>,
    /// [d, I]
    pub down_proj: Array2<f32>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Array1<f32>,
    pub post_attention_layernorm: Array1<f32>,
    pub attn: AttentionWeights,
    pub mlp: MlpWeights,
}

/// All weights of a Llama-family causal LM, in f32.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// [V, d]
    pub embed_tokens: Array2<f32>,
    /// [V, d]; `None` when tied to the embedding.
    pub lm_head: Option<Array2<f32>>,
    pub layers: Vec<LayerWeights>,
    /// [d]
    pub norm: Array1<f32>,
    /// The learned FAM prompt `model.fam_init` [F, d], when the checkpoint has one.
    pub fam_init: Option<Array2<f32>>,
}

impl LlamaWeights {
    /// The output projection [V, d]: `lm_head`, or the embedding when tied.
    pub fn output_weight(&self) -> &Array2<f32> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Reads every tensor FAM-SPEC section 1 names, checking shapes against `cfg`.
    pub fn load(root: &WeightLoader, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let v = cfg.vocab_size;
        let q_out = cfg.num_heads * cfg.head_dim;
        let kv_out = cfg.num_kv_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let model = root.pp("model");
        check_layer_count(root, cfg)?;
        let embed_tokens = model.matrix("embed_tokens.weight", v, d)?;
        // as transformers ties them: the embedding serves as the head, a stored lm_head is unused
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(root.matrix("lm_head.weight", v, d)?)
        };
        let mut layers = Vec::new();
        for l in 0..cfg.num_layers {
            let lw = model.pp(format!("layers.{l}"));
            let at = lw.pp("self_attn");
            let mlp = lw.pp("mlp");
            let bias = |name: &str, n: usize, required: bool| match cfg.biases {
                Biases::Ignored => Ok(None),
                Biases::WherePresent => at.optional_vector(name, n),
                Biases::Qkv if required => at.vector(name, n).map(Some),
                Biases::Qkv => Ok(None),
            };
            layers.push(LayerWeights {
                input_layernorm: lw.vector("input_layernorm.weight", d)?,
                post_attention_layernorm: lw.vector("post_attention_layernorm.weight", d)?,
                attn: AttentionWeights {
                    q_proj: at.matrix("q_proj.weight", q_out, d)?,
                    k_proj: at.matrix("k_proj.weight", kv_out, d)?,
                    v_proj: at.matrix("v_proj.weight", kv_out, d)?,
                    o_proj: at.matrix("o_proj.weight", d, q_out)?,
                    q_bias: bias("q_proj.bias", q_out, true)?,
                    k_bias: bias("k_proj.bias", kv_out, true)?,
                    v_bias: bias("v_proj.bias", kv_out, true)?,
                    o_bias: bias("o_proj.bias", d, false)?,
                },
                mlp: MlpWeights {
                    gate_proj: mlp.matrix("gate_proj.weight", i, d)?,
                    up_proj: mlp.matrix("up_proj.weight", i, d)?,
                    down_proj: mlp.matrix("down_proj.weight", d, i)?,
                },
            });
        }
        let norm = model.vector("norm.weight", d)?;
        let fam_init = match model.shape("fam_init") {
            None => None,
            Some(shape) => {
                let rows = match shape.as_slice() {
                    [rows, cols] if *cols == d => *rows,
                    _ => {
                        return Err(Error::TensorShape {
                            name: model.full_name("fam_init"),
                            path: root_dir(root),
                            expected: vec![0, d],
                            found: shape,
                        })
                    }
                };
                Some(model.matrix("fam_init", rows, d)?)
            }
        };
        Ok(LlamaWeights {
            embed_tokens,
            lm_head,
            layers,
            norm,
            fam_init,
        })
    }
}

/// The checkpoint's layers must be exactly those config.json declares: checked on the tensor
/// names, before any layer is read, so a wrong `num_hidden_layers` is an error, not an
/// allocation of the declared size or a silently ignored extra layer.
fn check_layer_count(root: &WeightLoader, cfg: &ModelConfig) -> Result<()> {
    let mut highest: Option<(usize, &str)> = None;
    for name in root.names() {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            continue;
        };
        let Some(ix) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) else {
            continue;
        };
        if highest.is_none_or(|(h, _)| ix > h) {
            highest = Some((ix, name));
        }
    }
    let n = cfg.num_layers;
    let err = |message: String| Error::Checkpoint {
        dir: root_dir(root),
        message,
    };
    match highest {
        Some((h, name)) if h >= n => Err(err(format!(
            "config.json says num_hidden_layers = {n}, but the checkpoint has a layer {h} (tensor `{name}`)"
        ))),
        Some((h, _)) if h + 1 < n => Err(err(format!(
            "config.json says num_hidden_layers = {n}, but the checkpoint's layers end at {h} (no tensor `model.layers.{}.*`)",
            h + 1
        ))),
        None => Err(err(format!(
            "config.json says num_hidden_layers = {n}, but the checkpoint has no `model.layers.*` tensors"
        ))),
        _ => Ok(()),
    }
}

fn root_dir(root: &WeightLoader) -> PathBuf {
    root.store_dir().to_path_buf()
}

/// A loaded checkpoint: its directory, checked configuration and f32 weights.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: LlamaWeights,
    /// SHA-256 of `config.json` and every safetensors file, hex.
    pub hash: String,
}

impl Checkpoint {
    /// Loads `config.json` and the safetensors files of `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        let cfg_path = config_path(dir);
        if !cfg_path.exists() {
            let has = |ext: &str| {
                std::fs::read_dir(dir).is_ok_and(|mut d| {
                    d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == ext)))
                })
            };
            let message = if dir.join("famc.json").exists() {
                "no config.json: this is a famc export (famc.json), not a checkpoint".into()
            } else if has("onnx") {
                "neither config.json (a checkpoint) nor famc.json (a famc export): the .onnx graphs here are not a complete export; re-export it".into()
            } else {
                "no config.json: not a Hugging Face checkpoint".into()
            };
            return Err(Error::Checkpoint {
                dir: dir.to_path_buf(),
                message,
            });
        }
        let config = ModelConfig::from_file(&cfg_path)?;
        let store = Arc::new(TensorStore::open(dir)?);
        let weights = LlamaWeights::load(&store.root(), &config)?;
        let hash = checkpoint_hash(&cfg_path, &store)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weights,
            hash,
        })
    }

    /// Resolves FAM parameters from flags, `config.json` and the learned prompt.
    pub fn fam_params(&self, flags: FamDefaults) -> Result<FamParams> {
        FamParams::resolve(
            flags,
            self.config.fam,
            self.weights.fam_init.as_ref().map(|a| a.nrows()),
            &config_path(&self.dir),
        )
    }
}

fn checkpoint_hash(cfg_path: &Path, store: &TensorStore) -> Result<String> {
    let mut h = Sha256::new();
    h.update(std::fs::read(cfg_path).map_err(|e| Error::io(cfg_path, e))?);
    store.hash_files(&mut h);
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
