//! ONNX Runtime execution providers: which one runs a session (`--ep cpu|cuda|tensorrt`) and
//! with what options.
//!
//! The decision is a pure function, [`plan`]: from the user's [`EpConfig`], what famc knows about
//! the graph ([`GraphFacts`]: its inputs, hash and block length) and the library versions
//! ([`Versions`]) to an [`EpPlan`], an explicit list of the providers famc will register and every
//! option key/value it will pass them, TensorRT's optimisation profile and engine-cache directory
//! included. Nothing in it needs a GPU, so it is unit-tested on any machine; [`dispatches`] turns a
//! plan into `ort` providers (behind the `cuda` / `tensorrt` cargo features).
//!
//! A provider that was asked for and cannot be registered is an error: famc never falls back to
//! the CPU silently. Within a session, ONNX Runtime still places the nodes a GPU provider does not
//! take (shape arithmetic, say) on the CPU, as it always does.
//!
//! # TensorRT
//!
//! TensorRT builds an engine per graph for a range of input shapes (an optimisation profile).
//! famc gives it explicit `min`/`opt`/`max` shapes for every dynamic input, from the graph contract
//! (docs/graph-contract.md): the `batch` dimension spans 1 ..= `--max-batch` (optimised for 1),
//! and the block graph's `T` spans 1 ..= L (optimised for L, the full blocks that carry the
//! state); the decode graph's token dimension is fixed at 1. With `--trt-cache-dir DIR` the
//! engines and TensorRT's timing cache go to `DIR/<graph>-<sha256>-ort<v>-trt<v>-<precision>-b<max
//! batch>/`, so an engine is reused only for the same graph bytes (which carry the checkpoint's
//! hash), the same ONNX Runtime and TensorRT, precision and profile: ONNX Runtime's own engine
//! naming looks at node names, not weights.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::{Dim, ElemType, IoSpec};
use crate::{Error, Result};

/// ONNX Runtime's name of the CPU provider.
pub const CPU_PROVIDER: &str = "CPUExecutionProvider";
/// ONNX Runtime's name of the CUDA provider.
pub const CUDA_PROVIDER: &str = "CUDAExecutionProvider";
/// ONNX Runtime's name of the TensorRT provider.
pub const TENSORRT_PROVIDER: &str = "TensorrtExecutionProvider";

/// The ONNX Runtime package with the CUDA and TensorRT providers that this famc works with.
pub const GPU_ORT_HINT: &str = "install `onnxruntime-gpu==1.31.1` (CUDA 13, cuDNN 9; TensorRT \
10 for --ep tensorrt) and set ORT_DYLIB_PATH to its capi/libonnxruntime.so.1.31.1, with the CUDA, \
cuDNN and TensorRT libraries on LD_LIBRARY_PATH (scripts/gpu-check.sh shows how)";

/// Which execution provider runs ONNX Runtime sessions (`--ep`). Each variant's first paragraph
/// is its `--help` text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum EpKind {
    /// ONNX Runtime's CPU provider.
    ///
    /// ONNX Runtime's default: nothing to register.
    #[default]
    Cpu,
    /// NVIDIA CUDA.
    ///
    /// `CUDAExecutionProvider`.
    Cuda,
    /// NVIDIA TensorRT (nodes it does not take run on CUDA).
    ///
    /// `TensorrtExecutionProvider`, with `CUDAExecutionProvider` for the nodes TensorRT does not
    /// take.
    #[value(name = "tensorrt", alias = "trt")]
    TensorRt,
}

impl EpKind {
    /// The `--ep` name: `cpu`, `cuda` or `tensorrt`.
    pub fn name(self) -> &'static str {
        match self {
            EpKind::Cpu => "cpu",
            EpKind::Cuda => "cuda",
            EpKind::TensorRt => "tensorrt",
        }
    }

    /// ONNX Runtime's name of the provider.
    pub fn provider_name(self) -> &'static str {
        match self {
            EpKind::Cpu => CPU_PROVIDER,
            EpKind::Cuda => CUDA_PROVIDER,
            EpKind::TensorRt => TENSORRT_PROVIDER,
        }
    }

    /// The cargo features famc needs for this provider (`cuda`; `cuda` and `tensorrt`).
    pub fn required_features(self) -> &'static [&'static str] {
        match self {
            EpKind::Cpu => &[],
            EpKind::Cuda => &["cuda"],
            EpKind::TensorRt => &["cuda", "tensorrt"],
        }
    }

    /// The providers ONNX Runtime must offer for this choice, in registration order.
    pub fn required_providers(self) -> &'static [&'static str] {
        match self {
            EpKind::Cpu => &[],
            EpKind::Cuda => &[CUDA_PROVIDER],
            EpKind::TensorRt => &[TENSORRT_PROVIDER, CUDA_PROVIDER],
        }
    }
}

impl fmt::Display for EpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EpKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(EpKind::Cpu),
            "cuda" => Ok(EpKind::Cuda),
            "tensorrt" | "trt" => Ok(EpKind::TensorRt),
            _ => Err(Error::Input(format!(
                "unknown execution provider `{s}` (expected cpu, cuda or tensorrt)"
            ))),
        }
    }
}

/// The cargo features this famc was compiled with, among `cuda` and `tensorrt`.
pub fn compiled_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "tensorrt") {
        f.push("tensorrt");
    }
    f
}

/// Whether this famc was compiled with the cargo features `kind` needs.
pub fn compiled_with(kind: EpKind) -> bool {
    let have = compiled_features();
    kind.required_features().iter().all(|f| have.contains(f))
}

/// An error unless this famc was compiled with the cargo features `kind` needs.
pub fn require_features(kind: EpKind) -> Result<()> {
    if compiled_with(kind) {
        return Ok(());
    }
    let have = compiled_features();
    let missing: Vec<String> = kind
        .required_features()
        .iter()
        .filter(|f| !have.contains(f))
        .map(|f| format!("`{f}`"))
        .collect();
    Err(Error::Input(format!(
        "--ep {kind} needs famc built with the cargo feature{} {}, and this famc was built without \
         {}. To fix: rebuild with `cargo build --release --features {}` (and use an ONNX Runtime \
         with the {} provider: {GPU_ORT_HINT})",
        if missing.len() > 1 { "s" } else { "" },
        kind.required_features()
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(" and "),
        missing.join(" and "),
        kind.required_features().join(","),
        kind.provider_name(),
    )))
}

/// The execution provider and its options: what `--ep`, `--device-id`, `--trt-*` and
/// `--max-batch` say. `Default` is the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpConfig {
    pub kind: EpKind,
    /// The GPU (CUDA device ordinal); `None`: device 0.
    pub device_id: Option<u32>,
    /// TensorRT may use float16 kernels (`trt_fp16_enable`).
    pub trt_fp16: bool,
    /// TensorRT may use bfloat16 kernels (`trt_bf16_enable`).
    pub trt_bf16: bool,
    /// Where TensorRT engines and its timing cache are kept (a subdirectory per graph is used).
    pub trt_cache_dir: Option<PathBuf>,
    /// The largest batch a TensorRT engine is built for (at least 1).
    pub max_batch: usize,
}

impl Default for EpConfig {
    fn default() -> Self {
        EpConfig {
            kind: EpKind::Cpu,
            device_id: None,
            trt_fp16: false,
            trt_bf16: false,
            trt_cache_dir: None,
            max_batch: 1,
        }
    }
}

impl EpConfig {
    /// The CPU provider with no options.
    pub fn cpu() -> Self {
        Self::default()
    }

    /// `kind` with default options.
    pub fn new(kind: EpKind) -> Self {
        EpConfig {
            kind,
            ..Self::default()
        }
    }

    /// Checks that every option set applies to the chosen provider (`--trt-fp16` with
    /// `--ep tensorrt`, and so on).
    pub fn check(&self) -> Result<()> {
        let mut wrong: Vec<&str> = Vec::new();
        if self.kind != EpKind::TensorRt {
            if self.trt_fp16 {
                wrong.push("--trt-fp16");
            }
            if self.trt_bf16 {
                wrong.push("--trt-bf16");
            }
            if self.trt_cache_dir.is_some() {
                wrong.push("--trt-cache-dir");
            }
        }
        if self.kind == EpKind::Cpu && self.device_id.is_some() {
            wrong.push("--device-id");
        }
        if !wrong.is_empty() {
            let needs = if wrong.iter().all(|w| w.starts_with("--trt")) {
                "--ep tensorrt"
            } else {
                "--ep cuda or --ep tensorrt"
            };
            return Err(Error::Input(format!(
                "{} appl{} to {needs} only (the execution provider is {})",
                wrong.join(", "),
                if wrong.len() == 1 { "ies" } else { "y" },
                self.kind
            )));
        }
        if self.max_batch == 0 {
            return Err(Error::Input("--max-batch must be at least 1".into()));
        }
        Ok(())
    }

    /// The command-line flags that give this configuration (`--ep tensorrt --trt-fp16 …`; none
    /// for the default), for a famc that starts another famc.
    pub fn cli_args(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if self.kind != EpKind::Cpu {
            v.extend(["--ep".into(), self.kind.name().into()]);
        }
        if let Some(d) = self.device_id {
            v.extend(["--device-id".into(), d.to_string()]);
        }
        if self.trt_fp16 {
            v.push("--trt-fp16".into());
        }
        if self.trt_bf16 {
            v.push("--trt-bf16".into());
        }
        if let Some(dir) = &self.trt_cache_dir {
            v.extend(["--trt-cache-dir".into(), dir.to_string_lossy().into_owned()]);
        }
        if self.max_batch != 1 {
            v.extend(["--max-batch".into(), self.max_batch.to_string()]);
        }
        v
    }

    /// The precision part of a cache key: `fp32`, `fp16`, `bf16` or `fp16-bf16`.
    fn precision(&self) -> &'static str {
        match (self.trt_fp16, self.trt_bf16) {
            (false, false) => "fp32",
            (true, false) => "fp16",
            (false, true) => "bf16",
            (true, true) => "fp16-bf16",
        }
    }
}

/// What a plan needs to know about a graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphFacts {
    /// The graph's file name, e.g. `block.onnx`.
    pub file_name: String,
    /// Its declared inputs (initializers excluded).
    pub inputs: Vec<IoSpec>,
    /// Lower-case hex SHA-256 of the `.onnx` file's bytes (and of its external data files, when
    /// the graph does not carry famc's `famc.checkpoint_sha256` metadata, which already pins the
    /// weights).
    pub sha256: String,
    /// The block length L the graph was exported for (`famc.block_len` metadata, else
    /// `famc.json` beside the file); `None` when neither says.
    pub block_len: Option<usize>,
}

impl GraphFacts {
    /// Reads the facts from a graph file (without loading external data, unless the graph is
    /// not famc's: then its external data files are hashed too).
    pub fn read(path: &Path) -> Result<Self> {
        use crate::onnx;
        use onnx::tensor_shape_proto::dimension::Value as D;
        use onnx::type_proto::Value as T;
        use prost::Message;

        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model = onnx::ModelProto::decode(bytes.as_slice())
            .map_err(|e| Error::Input(format!("{}: not an ONNX model: {e}", path.display())))?;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| Error::Input(format!("{}: no graph", path.display())))?;
        let meta = |key: &str| {
            model
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
        };
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        if meta("famc.checkpoint_sha256").is_none() {
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut locations: Vec<&str> = graph
                .initializer
                .iter()
                .flat_map(|t| t.external_data.iter())
                .filter(|e| e.key == "location")
                .map(|e| e.value.as_str())
                .collect();
            locations.sort_unstable();
            locations.dedup();
            for loc in locations {
                let p = dir.join(loc);
                let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
                hasher.update(loc.as_bytes());
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf).map_err(|e| Error::io(&p, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
            }
        }
        let sha256 = hex(&hasher.finalize());
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = graph
            .input
            .iter()
            .filter(|v| !initializers.contains(&v.name.as_str()))
            .map(|v| match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(T::TensorType(t)) => IoSpec {
                    name: v.name.clone(),
                    elem_type: match t.elem_type {
                        1 => ElemType::F32,
                        7 => ElemType::I64,
                        other => ElemType::Other(format!("onnx type {other}")),
                    },
                    shape: t.shape.as_ref().map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match &d.value {
                                Some(D::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as usize),
                                Some(D::DimParam(p)) if !p.is_empty() => Dim::Named(p.clone()),
                                _ => Dim::Any,
                            })
                            .collect()
                    }),
                },
                _ => IoSpec {
                    name: v.name.clone(),
                    elem_type: ElemType::Other("non-tensor".into()),
                    shape: None,
                },
            })
            .collect();
        let block_len = meta("famc.block_len")
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| {
                let manifest = path.parent()?.join(crate::export::MANIFEST_FILE);
                let text = std::fs::read_to_string(manifest).ok()?;
                let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                v["fam"]["block_len"].as_u64().map(|n| n as usize)
            });
        Ok(GraphFacts {
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "graph.onnx".into()),
            inputs,
            sha256,
            block_len,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The library versions a plan is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// ONNX Runtime's version, e.g. `1.31.1`.
    pub ort: String,
    /// TensorRT's version (`10.13.3`), when known; see [`probe_tensorrt_version`].
    pub tensorrt: Option<String>,
}

/// One dynamic input of a TensorRT optimisation profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileInput {
    pub name: String,
    pub min: Vec<usize>,
    pub opt: Vec<usize>,
    pub max: Vec<usize>,
}

/// A TensorRT optimisation profile: min/opt/max shapes of every dynamic input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtProfile {
    /// In the graph's input order.
    pub inputs: Vec<ProfileInput>,
}

impl TrtProfile {
    fn shapes(&self, pick: fn(&ProfileInput) -> &Vec<usize>) -> String {
        self.inputs
            .iter()
            .map(|i| {
                let dims: Vec<String> = pick(i).iter().map(|d| d.to_string()).collect();
                format!("{}:{}", i.name, dims.join("x"))
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `trt_profile_min_shapes`: `input_ids:1x1,block_index:1,fam.0:1x4x32,…`.
    pub fn min_shapes(&self) -> String {
        self.shapes(|i| &i.min)
    }

    /// `trt_profile_opt_shapes`.
    pub fn opt_shapes(&self) -> String {
        self.shapes(|i| &i.opt)
    }

    /// `trt_profile_max_shapes`.
    pub fn max_shapes(&self) -> String {
        self.shapes(|i| &i.max)
    }
}

/// One provider to register, with every option key/value famc passes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    pub kind: EpKind,
    /// ONNX Runtime's name, e.g. `TensorrtExecutionProvider`.
    pub name: &'static str,
    pub options: Vec<(String, String)>,
}

impl ProviderPlan {
    /// The value of option `key`, when set.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The largest size a symbolic dimension may take in a run, because an engine was built for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimLimit {
    /// The symbol, e.g. `batch`.
    pub symbol: String,
    pub max: usize,
    /// What sets the limit, for error messages (e.g. `--max-batch 1`).
    pub set_by: String,
}

/// What famc will register for one session: providers in order (empty for the CPU, ONNX
/// Runtime's default), TensorRT's profile and cache directory, and the limits they put on runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpPlan {
    pub kind: EpKind,
    pub providers: Vec<ProviderPlan>,
    pub profile: Option<TrtProfile>,
    /// The graph's engine-cache directory (`--trt-cache-dir`/<key>).
    pub cache_dir: Option<PathBuf>,
    pub limits: Vec<DimLimit>,
}

impl EpPlan {
    /// The plan's provider of `kind`, when it registers one.
    pub fn provider(&self, kind: EpKind) -> Option<&ProviderPlan> {
        self.providers.iter().find(|p| p.kind == kind)
    }
}

impl fmt::Display for EpPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.providers.is_empty() {
            return write!(f, "{CPU_PROVIDER} (ONNX Runtime's default)");
        }
        for (i, p) in self.providers.iter().enumerate() {
            if i > 0 {
                f.write_str(", then ")?;
            }
            let opts: Vec<String> = p
                .options
                .iter()
                .filter(|(k, _)| !k.starts_with("trt_profile_"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "{} [{}]", p.name, opts.join(", "))?;
        }
        Ok(())
    }
}

/// The name of a graph's engine-cache subdirectory:
/// `<graph stem>-<first 16 hex digits of its sha256>-ort<version>-trt<version>-<precision>-b<max
/// batch>`, e.g. `block-3bd6d5fb3fce5e30-ort1.31.1-trt10.13.3-fp16-b1`.
pub fn cache_key(cfg: &EpConfig, graph: &GraphFacts, versions: &Versions) -> String {
    let stem = graph
        .file_name
        .strip_suffix(".onnx")
        .unwrap_or(&graph.file_name);
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "{}-{}-ort{}-trt{}-{}-b{}",
        clean(stem),
        &graph.sha256[..graph.sha256.len().min(16)],
        clean(&versions.ort),
        clean(versions.tensorrt.as_deref().unwrap_or("unknown")),
        cfg.precision(),
        cfg.max_batch
    )
}

/// The TensorRT optimisation profile of a graph: every input with a dynamic dimension, `batch`
/// over 1 ..= `max_batch` (opt 1) and `T` over 1 ..= L (opt L). Any other dynamic dimension is an
/// error: famc knows no range for it.
pub fn trt_profile(graph: &GraphFacts, max_batch: usize) -> Result<Option<TrtProfile>> {
    let mut inputs = Vec::new();
    for spec in &graph.inputs {
        let Some(dims) = &spec.shape else {
            return Err(Error::Input(format!(
                "{}: input {spec} has no declared rank, so TensorRT cannot be given an \
                 optimisation profile for it",
                graph.file_name
            )));
        };
        if dims.iter().all(|d| matches!(d, Dim::Fixed(_))) {
            continue;
        }
        if spec.name.contains([':', ',']) {
            return Err(Error::Input(format!(
                "{}: input `{}` has `:` or `,` in its name, which TensorRT's profile strings \
                 cannot express",
                graph.file_name, spec.name
            )));
        }
        let (mut min, mut opt, mut max) = (Vec::new(), Vec::new(), Vec::new());
        for (axis, d) in dims.iter().enumerate() {
            let (lo, mid, hi) = match d {
                Dim::Fixed(n) => (*n, *n, *n),
                Dim::Named(s) if s == "batch" => (1, 1, max_batch),
                Dim::Named(s) if s == "T" => match graph.block_len {
                    Some(l) => (1, l, l),
                    None => {
                        return Err(Error::Input(format!(
                            "{}: input {spec} has the token dimension `T`, but the graph does not \
                             say its block length (no `famc.block_len` metadata, no famc.json \
                             beside it), so TensorRT's profile for `T` is unknown",
                            graph.file_name
                        )))
                    }
                },
                other => {
                    return Err(Error::Input(format!(
                        "{}: input {spec}: dimension {axis} (`{other}`) is dynamic and famc knows \
                         no range for it (only `batch` and `T` are), so TensorRT cannot be given \
                         an optimisation profile",
                        graph.file_name
                    )))
                }
            };
            min.push(lo);
            opt.push(mid);
            max.push(hi);
        }
        inputs.push(ProfileInput {
            name: spec.name.clone(),
            min,
            opt,
            max,
        });
    }
    Ok((!inputs.is_empty()).then_some(TrtProfile { inputs }))
}

/// What famc will register for `graph` under `cfg`: see [`EpPlan`]. Pure: touches no library and
/// no file (the cache directory is named, not created).
pub fn plan(cfg: &EpConfig, graph: &GraphFacts, versions: &Versions) -> Result<EpPlan> {
    cfg.check()?;
    let device = cfg.device_id.unwrap_or(0).to_string();
    let cuda = ProviderPlan {
        kind: EpKind::Cuda,
        name: CUDA_PROVIDER,
        options: vec![("device_id".into(), device.clone())],
    };
    match cfg.kind {
        EpKind::Cpu => Ok(EpPlan {
            kind: EpKind::Cpu,
            providers: Vec::new(),
            profile: None,
            cache_dir: None,
            limits: Vec::new(),
        }),
        EpKind::Cuda => Ok(EpPlan {
            kind: EpKind::Cuda,
            providers: vec![cuda],
            profile: None,
            cache_dir: None,
            limits: Vec::new(),
        }),
        EpKind::TensorRt => {
            let profile = trt_profile(graph, cfg.max_batch)?;
            let mut options: Vec<(String, String)> = vec![("device_id".into(), device)];
            if cfg.trt_fp16 {
                options.push(("trt_fp16_enable".into(), "1".into()));
                // RMSNorm's Pow and ReduceMean stay in float32 (x² overflows float16)
                options.push(("trt_layer_norm_fp32_fallback".into(), "1".into()));
            }
            if cfg.trt_bf16 {
                options.push(("trt_bf16_enable".into(), "1".into()));
            }
            let cache_dir = cfg
                .trt_cache_dir
                .as_ref()
                .map(|d| d.join(cache_key(cfg, graph, versions)));
            if let Some(dir) = &cache_dir {
                let dir = dir.to_string_lossy().into_owned();
                options.push(("trt_engine_cache_enable".into(), "1".into()));
                options.push(("trt_engine_cache_path".into(), dir.clone()));
                options.push(("trt_timing_cache_enable".into(), "1".into()));
                options.push(("trt_timing_cache_path".into(), dir));
            }
            let mut limits = Vec::new();
            if let Some(p) = &profile {
                options.push(("trt_profile_min_shapes".into(), p.min_shapes()));
                options.push(("trt_profile_opt_shapes".into(), p.opt_shapes()));
                options.push(("trt_profile_max_shapes".into(), p.max_shapes()));
                let names = |sym: &str| {
                    graph.inputs.iter().any(|s| {
                        s.shape
                            .iter()
                            .flatten()
                            .any(|d| matches!(d, Dim::Named(n) if n == sym))
                    })
                };
                if names("batch") {
                    limits.push(DimLimit {
                        symbol: "batch".into(),
                        max: cfg.max_batch,
                        set_by: format!("--max-batch {}", cfg.max_batch),
                    });
                }
                if let (true, Some(l)) = (names("T"), graph.block_len) {
                    limits.push(DimLimit {
                        symbol: "T".into(),
                        max: l,
                        set_by: format!("the block length L = {l}"),
                    });
                }
            }
            Ok(EpPlan {
                kind: EpKind::TensorRt,
                providers: vec![
                    ProviderPlan {
                        kind: EpKind::TensorRt,
                        name: TENSORRT_PROVIDER,
                        options,
                    },
                    cuda,
                ],
                profile,
                cache_dir,
                limits,
            })
        }
    }
}

/// TensorRT's version (`major.minor.patch`), asking `getInferLibVersion` of the `libnvinfer`
/// that the TensorRT provider would load (found through `LD_LIBRARY_PATH` and the system paths);
/// `None` when no TensorRT library can be loaded.
pub fn probe_tensorrt_version() -> Option<String> {
    const NAMES: [&str; 3] = ["libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"];
    for name in NAMES {
        // SAFETY: loading TensorRT runs its static initialisers only, as ONNX Runtime's provider
        // would when it loads it; `getInferLibVersion` takes no arguments and returns an int.
        let Ok(lib) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        let v = unsafe {
            lib.get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0")
                .ok()
                .map(|f| f())
        };
        // kept loaded: the provider loads it again anyway, and unloading CUDA libraries is
        // not always safe
        std::mem::forget(lib);
        if let Some(v) = v.filter(|v| *v > 0) {
            return Some(decode_trt_version(v));
        }
    }
    None
}

/// `getInferLibVersion`'s number as `major.minor.patch`: TensorRT 10 and later give
/// major·10000 + minor·100 + patch, earlier ones major·1000 + minor·100 + patch.
pub fn decode_trt_version(v: i32) -> String {
    let v = v.max(0);
    if v >= 100_000 {
        format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
    }
}

/// The `ort` providers of a plan, each set to fail loudly ([`ExecutionProviderDispatch::error_on_failure`]),
/// in registration order. An error when famc was compiled without a feature the plan needs.
///
/// [`ExecutionProviderDispatch::error_on_failure`]: ::ort::ep::ExecutionProviderDispatch::error_on_failure
pub fn dispatches(plan: &EpPlan) -> Result<Vec<::ort::ep::ExecutionProviderDispatch>> {
    require_features(plan.kind)?;
    plan.providers.iter().map(dispatch).collect()
}

fn dispatch(p: &ProviderPlan) -> Result<::ort::ep::ExecutionProviderDispatch> {
    match p.kind {
        #[cfg(feature = "cuda")]
        EpKind::Cuda => {
            use ::ort::ep::ArbitrarilyConfigurableExecutionProvider as _;
            let mut ep = ::ort::ep::CUDA::default();
            for (k, v) in &p.options {
                ep = ep.with_arbitrary_config(k, v);
            }
            Ok(ep.build().error_on_failure())
        }
        #[cfg(feature = "tensorrt")]
        EpKind::TensorRt => {
            use ::ort::ep::ArbitrarilyConfigurableExecutionProvider as _;
            let mut ep = ::ort::ep::TensorRT::default();
            for (k, v) in &p.options {
                ep = ep.with_arbitrary_config(k, v);
            }
            Ok(ep.build().error_on_failure())
        }
        other => require_features(other).and_then(|()| {
            Err(Error::Input(format!(
                "famc registers no `{}` provider object",
                other.provider_name()
            )))
        }),
    }
}
