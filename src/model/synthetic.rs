//! Random-weight checkpoints of realistic shape, for benchmarks.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The shape of a synthetic Llama-family model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SyntheticSpec {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub seed: u64,
}

impl SyntheticSpec {
    /// Parameters, with the embedding tied to the output head.
    pub fn parameters(&self) -> usize {
        let d = self.hidden_size;
        let dh = d / self.num_heads;
        let attn = 2 * d * d + 2 * d * self.num_kv_heads * dh;
        let mlp = 3 * d * self.intermediate_size;
        self.vocab_size * d + self.num_layers * (attn + mlp + 2 * d) + d
    }
}

/// Writes `config.json` and `model.safetensors` with uniform random weights scaled like an
/// initialised model (so activations stay well-behaved).
pub fn write_checkpoint(dir: &Path, spec: &SyntheticSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let d = spec.hidden_size;
    let dh = d / spec.num_heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": dh,
        "intermediate_size": spec.intermediate_size,
        "rms_norm_eps": 1e-5,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(|e| Error::io(&cfg_path, e))?;
    let mut state = spec.seed ^ 0x5DEE_CE66_D1CE_4E5B;
    let mut next = move || {
        // xorshift64*: fast enough for hundreds of millions of weights
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| (offset + scale * next()).to_le_bytes())
            .collect();
        tensors.insert(name, (shape, bytes));
    };
    let s = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let kv = spec.num_kv_heads * dh;
    add(
        "model.embed_tokens.weight".into(),
        vec![spec.vocab_size, d],
        1.0,
        0.0,
    );
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}.");
        add(format!("{p}input_layernorm.weight"), vec![d], 0.0, 1.0);
        add(
            format!("{p}post_attention_layernorm.weight"),
            vec![d],
            0.0,
            1.0,
        );
        add(format!("{p}self_attn.q_proj.weight"), vec![d, d], s(d), 0.0);
        add(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv, d],
            s(d),
            0.0,
        );
        add(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv, d],
            s(d),
            0.0,
        );
        add(format!("{p}self_attn.o_proj.weight"), vec![d, d], s(d), 0.0);
        add(
            format!("{p}mlp.gate_proj.weight"),
            vec![spec.intermediate_size, d],
            s(d),
            0.0,
        );
        add(
            format!("{p}mlp.up_proj.weight"),
            vec![spec.intermediate_size, d],
            s(d),
            0.0,
        );
        add(
            format!("{p}mlp.down_proj.weight"),
            vec![d, spec.intermediate_size],
            s(spec.intermediate_size),
            0.0,
        );
    }
    add("model.norm.weight".into(), vec![d], 0.0, 1.0);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (shape, b))| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .expect("sized");
            (n.clone(), v)
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Write {
        path: path.clone(),
        message: e.to_string(),
    })
}
