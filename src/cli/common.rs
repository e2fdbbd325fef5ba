//! The flags that the subcommands running a model share: backend, FAM hyper-parameters and
//! runtime options.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use famc::model::{Checkpoint, FamDefaults, FamParams};
use famc::runtime::{BackendKind, EpConfig, EpKind, OrtOptLevel, RunOptions};

/// What runs the model: a graph backend, or the f64 reference where a subcommand offers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// tract: pure-Rust CPU inference (the embedded default).
    Tract,
    /// ONNX Runtime through its shared library (ORT_DYLIB_PATH or the Python package).
    Ort,
    /// The pure-Rust f64 reference of FAM-SPEC.md (slow, exact; checkpoints only).
    Reference,
}

impl Backend {
    /// The graph backend, or `None` for the reference.
    pub fn graphs(self) -> Option<BackendKind> {
        match self {
            Backend::Tract => Some(BackendKind::Tract),
            Backend::Ort => Some(BackendKind::Ort),
            Backend::Reference => None,
        }
    }
}

/// How the graph backends run (tract and ONNX Runtime); shared by the subcommands that run graphs.
#[derive(Args, Clone, Debug, Default)]
pub struct RuntimeArgs {
    /// Threads inside one operator: tract's thread pool (default: every core the process may
    /// use) and ONNX Runtime's intra-op pool (default: its own, one per physical core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=famc::runtime::MAX_THREADS as i64))]
    pub threads: Option<u32>,
    /// ONNX Runtime threads across operators (above 1 enables its parallel execution mode).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=famc::runtime::MAX_THREADS as i64))]
    pub inter_threads: Option<u32>,
    /// ONNX Runtime's graph optimisation level (default: all).
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub ort_opt_level: Option<OrtOptLevel>,
    /// ONNX Runtime execution provider (--backend ort). cuda and tensorrt need famc built with
    /// `--features cuda` / `--features cuda,tensorrt` and onnxruntime-gpu; one that cannot be
    /// registered is an error, never a silent CPU run.
    #[arg(long, value_enum, value_name = "EP", default_value_t = EpKind::Cpu)]
    pub ep: EpKind,
    /// The GPU to run on (CUDA device ordinal; default 0).
    #[arg(long, value_name = "N")]
    pub device_id: Option<u32>,
    /// TensorRT may use float16 kernels (--ep tensorrt).
    #[arg(long)]
    pub trt_fp16: bool,
    /// TensorRT may use bfloat16 kernels (--ep tensorrt).
    #[arg(long)]
    pub trt_bf16: bool,
    /// Keep TensorRT engines and its timing cache here, one subdirectory per graph, ONNX
    /// Runtime and TensorRT version (--ep tensorrt).
    #[arg(long, value_name = "DIR")]
    pub trt_cache_dir: Option<PathBuf>,
    /// The largest batch (streams per call) a TensorRT engine is built for (--ep tensorrt).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,
    /// Copy the stream state out to host arrays after every block instead of keeping it in the
    /// backend's values (on the GPU for --ep cuda/tensorrt): a diagnostic, slower.
    #[arg(long)]
    pub host_state: bool,
}

impl RuntimeArgs {
    /// The library's options for these flags.
    pub fn to_run_options(&self) -> RunOptions {
        RunOptions {
            ep: EpConfig {
                kind: self.ep,
                device_id: self.device_id,
                trt_fp16: self.trt_fp16,
                trt_bf16: self.trt_bf16,
                trt_cache_dir: self.trt_cache_dir.clone(),
                max_batch: self.max_batch as usize,
            },
            intra_threads: self.threads.map(|n| n as usize),
            inter_threads: self.inter_threads.map(|n| n as usize),
            ort_optimization: self.ort_opt_level,
            host_state: self.host_state,
            ..RunOptions::default()
        }
    }
}

/// FAM hyper-parameters; each overrides `config.json`'s `"fam"` object.
#[derive(Args, Clone, Copy, Debug)]
pub struct FamArgs {
    /// Block length L.
    #[arg(long)]
    pub block_len: Option<usize>,
    /// FAM length F (0 gives plain block sliding-window attention).
    #[arg(long)]
    pub fam_len: Option<usize>,
    /// Memory blocks M: how many previous blocks of keys/values each block sees.
    #[arg(long)]
    pub mem_blocks: Option<usize>,
}

impl From<FamArgs> for FamDefaults {
    fn from(a: FamArgs) -> Self {
        FamDefaults {
            block_len: a.block_len,
            fam_len: a.fam_len,
            mem_blocks: a.mem_blocks,
        }
    }
}

/// A subcommand that runs compiled graphs: its own arguments plus backend, FAM and runtime flags.
#[derive(Args)]
pub struct Compiled<T: Args> {
    #[command(flatten)]
    pub args: T,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    pub backend: Backend,
    #[command(flatten)]
    pub fam: FamArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl<T: Args> Compiled<T> {
    /// Runs `famc <command>` with `f`, refusing the reference backend.
    pub fn run(
        self,
        command: &str,
        f: impl FnOnce(T, FamDefaults, BackendKind, &RunOptions) -> Result<()>,
    ) -> Result<()> {
        let Some(kind) = self.backend.graphs() else {
            bail!("famc {command} runs compiled graphs: use --backend tract or ort");
        };
        f(
            self.args,
            self.fam.into(),
            kind,
            &self.runtime.to_run_options(),
        )
    }
}

/// Tells the user when a checkpoint without a learned FAM prompt runs with zeros instead.
pub fn note_zero_prompt(ck: &Checkpoint, fam: &FamParams) {
    if ck.weights.fam_init.is_none() && fam.fam_len > 0 {
        eprintln!(
            "note: {} has no learned FAM prompt `model.fam_init`; using zeros",
            ck.dir.display()
        );
    }
}
