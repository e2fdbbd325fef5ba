//! The `famc` command line.

use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use famc::model::{Checkpoint, FamDefaults};
use famc::reference::Reference;
use famc::runtime::{BackendKind, OrtOptLevel, RunOptions};
use famc::session::FamModel;

use cli::out::{out, outln};

#[derive(Parser)]
#[command(
    name = "famc",
    version,
    about = "Graph compiler and runtime for TransformerFAM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model over token ids block by block and write the logits as a float32 .npy [T, V].
    Run(RunArgs),
    /// Stream input of any length through a model: mean negative log-likelihood and perplexity.
    Score(Compiled<cli::score::ScoreArgs>),
    /// Generate tokens after a prompt, across block boundaries, with the decode graph.
    Generate(Compiled<cli::generate::GenerateArgs>),
    /// Measure prefill and decode throughput, latency per block and peak memory.
    Bench(Compiled<cli::bench::BenchArgs>),
    /// Serve a model over HTTP with the KServe v2 protocol (Triton's), holding each sequence's state.
    Serve(Compiled<cli::serve::ServeArgs>),
    /// Compile a checkpoint into ONNX graphs with explicit FAM state (docs/graph-contract.md).
    Export(ExportArgs),
    /// Show the inputs, outputs, ops, weights and FAM parameters of an export or an .onnx file.
    Inspect(InspectArgs),
    /// Show which backends and execution providers are available, and how to fix what is not.
    Doctor(DoctorArgs),
    /// Evaluate a model on a task through famc's compiled graphs (docs/passkey.md).
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint directory (config.json + safetensors).
    model: PathBuf,
    #[command(flatten)]
    fam: FamArgs,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Initializers larger than this many bytes go to the weight store `weights.data`.
    #[arg(long, default_value_t = famc::export::DEFAULT_EXTERNAL_THRESHOLD)]
    external_threshold: usize,
    /// Element type of the stored weight matrices: f32, f16 or bf16 (computation stays f32),
    /// or q8 / q4: blockwise int8 / int4 matrices (ONNX Runtime's MatMulNBits, block 32) with
    /// an int8 embedding (tract runs q4 packed and q8 widened to f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16", "q8", "q4"])]
    dtype: String,
    /// q8/q4: the precision ONNX Runtime computes the quantized products in (MatMulNBits'
    /// accuracy_level): 4 for its int8 kernels (faster), 1 for f32 against the dequantized
    /// weights.
    #[arg(long, default_value_t = famc::export::DEFAULT_ACCURACY_LEVEL)]
    accuracy_level: i64,
    /// The ONNX dialect: opset17 (primitives, any runtime) or opset23 (fused Attention,
    /// RMSNormalization and RotaryEmbedding; ONNX Runtime 1.31, tract ≥ 0.23, TensorRT ≥ 10.15).
    #[arg(long, value_enum, default_value_t = famc::onnx::Target::default())]
    target: famc::onnx::Target,
    #[command(flatten)]
    triton: TritonArgs,
}

/// A Triton Inference Server model repository beside the export (docs/serving.md).
#[derive(Args)]
struct TritonArgs {
    /// Also write a Triton model repository here: the block graph with Triton's sequence
    /// batcher and implicit state (config.pbtxt, initial state, README).
    #[arg(long, value_name = "REPO_DIR")]
    triton: Option<PathBuf>,
    /// The model's name in the repository.
    #[arg(long, default_value = "famc", requires = "triton")]
    triton_model_name: String,
    /// Triton's max_batch_size: sequences batched into one call.
    #[arg(long, default_value_t = 8, requires = "triton")]
    triton_max_batch_size: usize,
    /// The sequence batcher's strategy.
    #[arg(long, value_enum, default_value_t = famc::triton::Strategy::Oldest, requires = "triton")]
    triton_strategy: famc::triton::Strategy,
    /// oldest: sequences considered for a batch at once.
    #[arg(long, default_value_t = 64, requires = "triton")]
    triton_max_candidates: usize,
    /// oldest: batch sizes Triton prefers (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "triton")]
    triton_preferred_batch_size: Vec<usize>,
    /// oldest: microseconds a request may wait for others to join its batch.
    #[arg(long, default_value_t = 1000, requires = "triton")]
    triton_queue_delay_us: u64,
    /// Microseconds after which Triton ends an idle sequence.
    #[arg(long, default_value_t = 60_000_000, requires = "triton")]
    triton_idle_us: u64,
    /// Place the model's instances on the GPU (instance_group KIND_GPU).
    #[arg(long, requires = "triton")]
    triton_gpu: bool,
    /// Model instances.
    #[arg(long, default_value_t = 1, requires = "triton")]
    triton_instances: usize,
    /// Run the graph through TensorRT (ONNX Runtime's accelerator) at this precision.
    #[arg(long, value_enum, requires = "triton")]
    triton_tensorrt: Option<famc::triton::TrtPrecision>,
}

impl TritonArgs {
    fn options(&self) -> famc::triton::TritonOptions {
        famc::triton::TritonOptions {
            model_name: self.triton_model_name.clone(),
            max_batch_size: self.triton_max_batch_size,
            strategy: self.triton_strategy,
            max_candidate_sequences: self.triton_max_candidates,
            preferred_batch_sizes: self.triton_preferred_batch_size.clone(),
            max_queue_delay_us: self.triton_queue_delay_us,
            max_sequence_idle_us: self.triton_idle_us,
            gpu: self.triton_gpu,
            instances: self.triton_instances,
            tensorrt: self.triton_tensorrt,
        }
    }
}

#[derive(Args)]
struct InspectArgs {
    /// An export directory or an .onnx file.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Dump every node of a graph file (inputs, outputs, initializers, nodes) as text.
    #[arg(long, conflicts_with = "json")]
    nodes: bool,
    /// Check every file of an export against the sizes and SHA-256 hashes famc.json records.
    #[arg(long, conflicts_with_all = ["json", "nodes"])]
    verify: bool,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// PassKey recall: a key in the first block, asked for N blocks later (teacher-forced argmax).
    Passkey(PasskeyArgs),
}

#[derive(Args)]
struct PasskeyArgs {
    /// A checkpoint directory (compiled in memory) or an export directory (famc.json).
    model: PathBuf,
    /// Blocks between the key's block and the question's; a comma-separated list gives one
    /// figure per distance.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    distance_blocks: Vec<usize>,
    /// Samples per distance.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Seed of the sample generator (SplitMix64, as export/passkey.py draws them).
    #[arg(long, default_value_t = 12345)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    backend: Backend,
    /// Evaluate the same weights with F = 0: plain block sliding-window attention (checkpoints only).
    #[arg(long)]
    bswa: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// ONNX Runtime's graph optimisation level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OrtOpt {
    /// No graph optimisation.
    Disable,
    /// Constant folding, redundant node removal.
    Basic,
    /// Basic plus node fusions.
    Extended,
    /// Everything, including layout optimisations (ONNX Runtime's default).
    All,
}

/// How the graph backends run (tract and ONNX Runtime); shared by the subcommands that run graphs.
#[derive(Args, Clone, Debug, Default)]
struct RuntimeArgs {
    /// Threads inside one operator: tract's thread pool (default: every core the process may
    /// use) and ONNX Runtime's intra-op pool (default: its own, one per physical core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=famc::runtime::MAX_THREADS as i64))]
    threads: Option<u32>,
    /// ONNX Runtime threads across operators (above 1 enables its parallel execution mode).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=famc::runtime::MAX_THREADS as i64))]
    inter_threads: Option<u32>,
    /// ONNX Runtime's graph optimisation level (default: all).
    #[arg(long, value_enum, value_name = "LEVEL")]
    ort_opt_level: Option<OrtOpt>,
    /// ONNX Runtime execution provider (--backend ort). cuda and tensorrt need famc built with
    /// `--features cuda` / `--features cuda,tensorrt` and onnxruntime-gpu; one that cannot be
    /// registered is an error, never a silent CPU run.
    #[arg(long, value_enum, value_name = "EP", default_value_t = Ep::Cpu)]
    ep: Ep,
    /// The GPU to run on (CUDA device ordinal; default 0).
    #[arg(long, value_name = "N")]
    device_id: Option<u32>,
    /// TensorRT may use float16 kernels (--ep tensorrt).
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT may use bfloat16 kernels (--ep tensorrt).
    #[arg(long)]
    trt_bf16: bool,
    /// Keep TensorRT engines and its timing cache here, one subdirectory per graph, ONNX
    /// Runtime and TensorRT version (--ep tensorrt).
    #[arg(long, value_name = "DIR")]
    trt_cache_dir: Option<PathBuf>,
    /// The largest batch (streams per call) a TensorRT engine is built for (--ep tensorrt).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    max_batch: u32,
    /// Copy the stream state out to host arrays after every block instead of keeping it in the
    /// backend's values (on the GPU for --ep cuda/tensorrt): a diagnostic, slower.
    #[arg(long)]
    host_state: bool,
}

/// ONNX Runtime execution provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Ep {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT (nodes it does not take run on CUDA).
    #[value(alias = "trt")]
    Tensorrt,
}

impl RuntimeArgs {
    fn to_run_options(&self) -> RunOptions {
        RunOptions {
            ep: famc::runtime::EpConfig {
                kind: match self.ep {
                    Ep::Cpu => famc::runtime::EpKind::Cpu,
                    Ep::Cuda => famc::runtime::EpKind::Cuda,
                    Ep::Tensorrt => famc::runtime::EpKind::TensorRt,
                },
                device_id: self.device_id,
                trt_fp16: self.trt_fp16,
                trt_bf16: self.trt_bf16,
                trt_cache_dir: self.trt_cache_dir.clone(),
                max_batch: self.max_batch as usize,
            },
            intra_threads: self.threads.map(|n| n as usize),
            inter_threads: self.inter_threads.map(|n| n as usize),
            ort_optimization: self.ort_opt_level.map(|l| match l {
                OrtOpt::Disable => OrtOptLevel::Disable,
                OrtOpt::Basic => OrtOptLevel::Basic,
                OrtOpt::Extended => OrtOptLevel::Extended,
                OrtOpt::All => OrtOptLevel::All,
            }),
            host_state: self.host_state,
            ..RunOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// tract: pure-Rust CPU inference (the embedded default).
    Tract,
    /// ONNX Runtime through its shared library (ORT_DYLIB_PATH or the Python package).
    Ort,
    /// The pure-Rust f64 reference of FAM-SPEC.md (slow, exact; checkpoints only).
    Reference,
}

/// FAM hyper-parameters; each overrides `config.json`'s `"fam"` object.
#[derive(Args, Clone, Copy, Debug)]
struct FamArgs {
    /// Block length L.
    #[arg(long)]
    block_len: Option<usize>,
    /// FAM length F (0 gives plain block sliding-window attention).
    #[arg(long)]
    fam_len: Option<usize>,
    /// Memory blocks M: how many previous blocks of keys/values each block sees.
    #[arg(long)]
    mem_blocks: Option<usize>,
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
struct Compiled<T: Args> {
    #[command(flatten)]
    args: T,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    backend: Backend,
    #[command(flatten)]
    fam: FamArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl<T: Args> Compiled<T> {
    fn run(
        self,
        command: &str,
        f: impl FnOnce(T, FamDefaults, BackendKind, &RunOptions) -> Result<()>,
    ) -> Result<()> {
        let kind = match self.backend {
            Backend::Tract => BackendKind::Tract,
            Backend::Ort => BackendKind::Ort,
            Backend::Reference => {
                bail!("famc {command} runs compiled graphs: use --backend tract or ort")
            }
        };
        f(
            self.args,
            self.fam.into(),
            kind,
            &self.runtime.to_run_options(),
        )
    }
}

#[derive(Args)]
struct RunArgs {
    /// An export directory (famc.json) or a checkpoint directory (compiled in memory).
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    backend: Backend,
    #[command(flatten)]
    fam: FamArgs,
    /// File of whitespace-separated token ids.
    #[arg(long)]
    tokens: PathBuf,
    /// Where to write the logits (float32 .npy, shape [T, V]).
    #[arg(long)]
    logits_out: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn note_zero_prompt(ck: &Checkpoint, fam: &famc::model::FamParams) {
    if ck.weights.fam_init.is_none() && fam.fam_len > 0 {
        eprintln!(
            "note: {} has no learned FAM prompt `model.fam_init`; using zeros",
            ck.dir.display()
        );
    }
}

fn run(args: RunArgs) -> Result<()> {
    let is_export = args.model.join(famc::export::MANIFEST_FILE).exists();
    let (logits, fam) = match args.backend {
        Backend::Reference => {
            if is_export {
                bail!(
                    "--backend reference needs a checkpoint directory; {} is an export",
                    args.model.display()
                );
            }
            let ck = Checkpoint::load(&args.model)?;
            let fam = ck.fam_params(args.fam.into())?;
            note_zero_prompt(&ck, &fam);
            let ids = famc::io::read_token_ids(&args.tokens, ck.config.vocab_size)?;
            let logits = Reference::new(&ck, fam)?.forward(&ids)?.mapv(|v| v as f32);
            (logits, fam)
        }
        Backend::Tract | Backend::Ort => {
            let kind = if args.backend == Backend::Tract {
                BackendKind::Tract
            } else {
                BackendKind::Ort
            };
            let run_opts = args.runtime.to_run_options();
            let model = if is_export {
                FamModel::open_any(&args.model, args.fam.into(), kind, &run_opts)?
            } else {
                let ck = Checkpoint::load(&args.model)?;
                let fam = ck.fam_params(args.fam.into())?;
                note_zero_prompt(&ck, &fam);
                FamModel::compile(&ck, fam, kind, &run_opts)?
            };
            let ids = famc::io::read_token_ids(&args.tokens, model.manifest().model.vocab_size)?;
            (model.run(&ids)?, model.fam_params())
        }
    };
    famc::io::write_npy_f32(&args.logits_out, logits.view())?;
    eprintln!(
        "wrote logits [{}, {}] to {} (L={}, F={}, M={})",
        logits.nrows(),
        logits.ncols(),
        args.logits_out.display(),
        fam.block_len,
        fam.fam_len,
        fam.mem_blocks
    );
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    if args.triton.triton.is_some() {
        famc::triton::check_options(&args.triton.options())?;
    }
    let ck = Checkpoint::load(&args.model)?;
    let fam = ck.fam_params(args.fam.into())?;
    note_zero_prompt(&ck, &fam);
    let opts = famc::export::ExportOptions {
        external_threshold: args.external_threshold,
        dtype: args.dtype.parse()?,
        accuracy_level: args.accuracy_level,
        target: args.target,
    };
    let m = famc::export::export(&ck, fam, &args.out, &opts)?;
    eprintln!(
        "exported {} to {} (L={}, F={}, M={}, {} state tensors)",
        args.model.display(),
        args.out.display(),
        fam.block_len,
        fam.fam_len,
        fam.mem_blocks,
        m.state.len()
    );
    if let Some(repo) = &args.triton.triton {
        let t = args.triton.options();
        famc::triton::write_repository(&args.out, repo, &t)?;
        eprintln!(
            "wrote the Triton model repository {} (model `{}`, {:?} sequence batching, max_batch_size {})",
            repo.display(),
            t.model_name,
            t.strategy,
            t.max_batch_size
        );
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    if args.nodes {
        if args.path.is_dir() {
            bail!(
                "--nodes dumps one graph: pass an .onnx file, not {}",
                args.path.display()
            );
        }
        out!("{}", famc::inspect::dump_graph(&args.path)?)?;
        return Ok(());
    }
    if args.verify {
        let verified = famc::export::ExportDir::open(&args.path)?.verify()?;
        for (file, bytes) in &verified {
            outln!("ok {file}: {bytes} bytes, sha256 matches famc.json")?;
        }
        return Ok(());
    }
    let report = famc::inspect::inspect(&args.path)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        out!("{report}")?;
    }
    Ok(())
}

fn doctor(args: DoctorArgs) -> Result<()> {
    let report = famc::doctor::doctor();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        out!("{report}")?;
    }
    Ok(())
}

fn eval(cmd: EvalCommand) -> Result<()> {
    use famc::eval::{passkey, Engine};
    let EvalCommand::Passkey(args) = cmd;
    let opts = passkey::PasskeyOptions {
        distances: args.distance_blocks,
        samples: args.samples,
        seed: args.seed,
        bswa: args.bswa,
        engine: match args.backend {
            Backend::Tract => Engine::Graphs(BackendKind::Tract),
            Backend::Ort => Engine::Graphs(BackendKind::Ort),
            Backend::Reference => Engine::Reference,
        },
        run_options: args.runtime.to_run_options(),
        ..passkey::PasskeyOptions::default()
    };
    let report = passkey::evaluate(&args.model, &opts)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let f = report.fam;
    outln!(
        "passkey {} (L={}, F={}{}, M={}) on {}, seed {}, chance {:.4}",
        args.model.display(),
        f.block_len,
        f.fam_len,
        if args.bswa { ": BSWA" } else { "" },
        f.mem_blocks,
        report.engine,
        report.seed,
        report.chance
    )?;
    for r in &report.results {
        outln!(
            "distance {:3} blocks ({:5} tokens): recall {:.4} ({}/{})",
            r.distance_blocks,
            r.tokens,
            r.recall,
            r.correct,
            r.samples
        )?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = famc::signal::install() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Score(c) => c.run("score", cli::score::score),
        Command::Generate(c) => c.run("generate", cli::generate::run),
        Command::Bench(c) => c.run("bench", cli::bench::run),
        Command::Serve(c) => c.run("serve", cli::serve::run),
        Command::Export(a) => export(a),
        Command::Inspect(a) => inspect(a),
        Command::Doctor(a) => doctor(a),
        Command::Eval(c) => eval(c),
    };
    if result.is_err() && famc::signal::interrupted() {
        // the failure may be the handler removing what this was writing: its exit speaks
        famc::signal::wait_for_handler();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // the reader of our output has gone (`famc doctor | head -1`): end quietly, as 128 + SIGPIPE
        Err(e) if cli::out::is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {}", cli::out::render(&e));
            ExitCode::FAILURE
        }
    }
}
