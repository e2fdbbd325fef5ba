//! Test fixtures: small random Llama checkpoints written as Hugging Face would.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

/// Deterministic pseudo-random numbers for fixtures (famc's SplitMix64).
pub struct Rng(famc::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(famc::rng::SplitMix64::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
    pub fn tokens(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab)).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    F16,
    BF16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeField {
    TopLevel,
    Parameters,
    Absent,
}

/// What a synthetic checkpoint looks like.
#[derive(Clone, Debug)]
pub struct Spec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub vocab: usize,
    pub tie: bool,
    pub qkv_bias: bool,
    pub fam_init_rows: Option<usize>,
    pub dtype: DiskDtype,
    pub shards: usize,
    pub rope: RopeField,
    pub rope_theta: f64,
    pub seed: u64,
    /// Extra top-level config.json entries.
    pub extra_config: Vec<(String, serde_json::Value)>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            hidden: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            inter: 24,
            vocab: 40,
            tie: false,
            qkv_bias: false,
            fam_init_rows: None,
            dtype: DiskDtype::F32,
            shards: 1,
            rope: RopeField::Parameters,
            rope_theta: 10000.0,
            seed: 7,
            extra_config: Vec::new(),
        }
    }
}

/// The tensors of a synthetic checkpoint, as f32 values exactly as stored (after rounding to
/// the disk dtype).
pub struct Tensors(pub BTreeMap<String, (Vec<usize>, Vec<f32>)>);

impl Tensors {
    pub fn get(&self, name: &str) -> &[f32] {
        &self.0[name].1
    }
    /// Row-major matrix as rows.
    pub fn matrix(&self, name: &str) -> Vec<Vec<f64>> {
        let (shape, v) = &self.0[name];
        v.chunks(shape[1])
            .map(|r| r.iter().map(|&x| x as f64).collect())
            .collect()
    }
    pub fn vector(&self, name: &str) -> Vec<f64> {
        self.get(name).iter().map(|&x| x as f64).collect()
    }
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

fn round(dtype: DiskDtype, x: f32) -> f32 {
    match dtype {
        DiskDtype::F32 => x,
        DiskDtype::F16 => f16::from_f32(x).to_f32(),
        DiskDtype::BF16 => bf16::from_f32(x).to_f32(),
    }
}

/// Generates the tensors of `spec`.
pub fn make_tensors(spec: &Spec) -> Tensors {
    let mut rng = Rng::new(spec.seed);
    let mut t = BTreeMap::new();
    let d = spec.hidden;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| round(spec.dtype, offset + scale * rng.uniform()))
            .collect();
        t.insert(name, (shape, v));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![spec.vocab, d],
        1.0,
        0.0,
        &mut rng,
    );
    if !spec.tie {
        add(
            "lm_head.weight".into(),
            vec![spec.vocab, d],
            0.5,
            0.0,
            &mut rng,
        );
    }
    let q = spec.heads * spec.head_dim;
    let kv = spec.kv_heads * spec.head_dim;
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}.");
        add(
            format!("{p}input_layernorm.weight"),
            vec![d],
            0.3,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}post_attention_layernorm.weight"),
            vec![d],
            0.3,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.q_proj.weight"),
            vec![q, d],
            0.5,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv, d],
            0.5,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv, d],
            0.5,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.o_proj.weight"),
            vec![d, q],
            0.3,
            0.0,
            &mut rng,
        );
        if spec.qkv_bias {
            add(
                format!("{p}self_attn.q_proj.bias"),
                vec![q],
                0.5,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}self_attn.k_proj.bias"),
                vec![kv],
                0.5,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}self_attn.v_proj.bias"),
                vec![kv],
                0.5,
                0.0,
                &mut rng,
            );
        }
        add(
            format!("{p}mlp.gate_proj.weight"),
            vec![spec.inter, d],
            0.4,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}mlp.up_proj.weight"),
            vec![spec.inter, d],
            0.4,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}mlp.down_proj.weight"),
            vec![d, spec.inter],
            0.3,
            0.0,
            &mut rng,
        );
    }
    add("model.norm.weight".into(), vec![d], 0.3, 1.0, &mut rng);
    if let Some(f) = spec.fam_init_rows {
        add("model.fam_init".into(), vec![f, d], 1.0, 0.0, &mut rng);
    }
    Tensors(t)
}

pub fn config_json(spec: &Spec) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.inter,
        "rms_norm_eps": 1e-5,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tie,
        "hidden_act": "silu",
        "attention_bias": spec.qkv_bias,
    });
    let obj = c.as_object_mut().unwrap();
    match spec.rope {
        RopeField::TopLevel => {
            obj.insert("rope_theta".into(), spec.rope_theta.into());
        }
        RopeField::Parameters => {
            obj.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "default", "rope_theta": spec.rope_theta}),
            );
        }
        RopeField::Absent => {}
    }
    for (k, v) in &spec.extra_config {
        obj.insert(k.clone(), v.clone());
    }
    c
}

fn encode(dtype: DiskDtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        DiskDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DiskDtype::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        DiskDtype::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// Writes safetensors files for `tensors` into `dir` (sharded when `shards` > 1).
pub fn write_safetensors(dir: &Path, tensors: &Tensors, dtype: DiskDtype, shards: usize) {
    let st_dtype = match dtype {
        DiskDtype::F32 => safetensors::Dtype::F32,
        DiskDtype::F16 => safetensors::Dtype::F16,
        DiskDtype::BF16 => safetensors::Dtype::BF16,
    };
    let names: Vec<&String> = tensors.0.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (si, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, shards)
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let (shape, v) = &tensors.0[*n];
                ((*n).clone(), shape.clone(), encode(dtype, v))
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(st_dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
}

/// Writes a whole checkpoint for `spec` into `dir`; returns its tensors.
pub fn write_checkpoint(dir: &Path, spec: &Spec) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = make_tensors(spec);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config_json(spec)).unwrap(),
    )
    .unwrap();
    write_safetensors(dir, &tensors, spec.dtype, spec.shards);
    tensors
}

/// A fresh temporary directory holding a checkpoint for `spec`.
pub fn temp_checkpoint(spec: &Spec) -> (tempfile::TempDir, PathBuf, Tensors) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let t = write_checkpoint(&dir, spec);
    (tmp, dir, t)
}

/// The Hugging Face fixture shipped in tests/data.
pub fn hf_tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf-llama-tiny")
}

pub fn hf_tiny_ids() -> Vec<u32> {
    std::fs::read_to_string(hf_tiny_dir().join("ids.txt"))
        .unwrap()
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect()
}

pub fn hf_tiny_logits() -> ndarray::Array2<f32> {
    use ndarray_npy::ReadNpyExt;
    let f = std::fs::File::open(hf_tiny_dir().join("hf_logits.npy")).unwrap();
    ndarray::Array2::<f32>::read_npy(f).unwrap()
}

/// Largest absolute difference of two equally shaped arrays.
pub fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// tract always; ONNX Runtime wherever its library is found. CI installs it and sets
/// FAMC_REQUIRE_ORT, which makes a missing library a failure rather than a skip.
pub fn backends() -> Vec<famc::runtime::BackendKind> {
    let mut v = vec![famc::runtime::BackendKind::Tract];
    match famc::runtime::ort::find_ort_library() {
        Ok(_) => v.push(famc::runtime::BackendKind::Ort),
        Err(e) => {
            let required = ["FAMC_REQUIRE_ORT", "FAMC_REQUIRE_PYTHON"]
                .iter()
                .any(|k| std::env::var_os(k).is_some());
            assert!(!required, "ONNX Runtime required but missing: {e}");
            eprintln!("skipping ONNX Runtime: {e}");
        }
    }
    v
}

/// Every emission target paired with every backend of [`backends`] that runs it.
pub fn every_target_and_backend() -> Vec<(famc::onnx::Target, famc::runtime::BackendKind)> {
    famc::onnx::Target::ALL
        .into_iter()
        .flat_map(|t| {
            backends()
                .into_iter()
                .filter(move |&b| runs(t, b))
                .map(move |b| (t, b))
        })
        .collect()
}

/// Whether `backend` runs `target`'s graphs (tract has no ONNX Runtime contrib fusions).
pub fn runs(target: famc::onnx::Target, backend: famc::runtime::BackendKind) -> bool {
    !target.ort_only() || backend == famc::runtime::BackendKind::Ort
}

/// Runs the `famc` binary.
pub fn famc(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_famc"))
        .args(args)
        .output()
        .unwrap()
}

/// Largest absolute difference of two f32 sequences.
pub fn max_abs_diff_f32<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The standard error of a finished command, as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure (not a panic, not exit status 101) whose message contains `needle`.
pub fn assert_clean_failure(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        o.status.code().is_some_and(|c| c != 101),
        "exit status {:?}: {err}",
        o.status
    );
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

/// The Python of .venv (or FAMC_PYTHON) when it imports `modules` (a comma-separated list);
/// `None` (the test skips) when there is none, unless FAMC_REQUIRE_PYTHON is set.
pub fn python_with(modules: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("FAMC_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")),
    ];
    for p in candidates.into_iter().flatten() {
        let ok = std::process::Command::new(&p)
            .args(["-c", &format!("import {modules}")])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(p);
        }
    }
    assert!(
        std::env::var_os("FAMC_REQUIRE_PYTHON").is_none(),
        "FAMC_REQUIRE_PYTHON is set but no Python with {modules} was found"
    );
    eprintln!("skipping: no Python with {modules} (run scripts/setup-python.sh)");
    None
}

/// A script of `export/`.
pub fn export_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("export")
        .join(name)
}
