//! The `famc` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use famc::model::{Checkpoint, FamDefaults};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

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
    /// Compile a checkpoint into ONNX graphs with explicit FAM state (docs/graph-contract.md).
    Export(ExportArgs),
    /// Show the inputs, outputs, ops, weights and FAM parameters of an export or an .onnx file.
    Inspect(InspectArgs),
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
    /// Initializers larger than this many bytes go to `<graph>.onnx.data`.
    #[arg(long, default_value_t = famc::export::DEFAULT_EXTERNAL_THRESHOLD)]
    external_threshold: usize,
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
            let mut model = if is_export {
                FamModel::open_any(&args.model, args.fam.into(), kind, &RunOptions::default())?
            } else {
                let ck = Checkpoint::load(&args.model)?;
                let fam = ck.fam_params(args.fam.into())?;
                note_zero_prompt(&ck, &fam);
                FamModel::compile(&ck, fam, kind, &RunOptions::default())?
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
    let ck = Checkpoint::load(&args.model)?;
    let fam = ck.fam_params(args.fam.into())?;
    note_zero_prompt(&ck, &fam);
    let opts = famc::export::ExportOptions {
        external_threshold: args.external_threshold,
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
        print!("{}", famc::inspect::dump_graph(&args.path)?);
        return Ok(());
    }
    let report = famc::inspect::inspect(&args.path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Export(a) => export(a),
        Command::Inspect(a) => inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
