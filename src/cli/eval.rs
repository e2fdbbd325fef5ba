//! `famc eval`: task evaluations through famc's compiled graphs (docs/passkey.md).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use famc::eval::{passkey, Engine};

use super::common::{Backend, RuntimeArgs};

/// The tasks of `famc eval`.
#[derive(Subcommand)]
pub enum EvalCommand {
    /// PassKey recall: a key in the first block, asked for N blocks later (teacher-forced argmax).
    Passkey(PasskeyArgs),
}

/// Arguments of `famc eval passkey`.
#[derive(Args)]
pub struct PasskeyArgs {
    /// A checkpoint directory (compiled in memory) or an export directory (famc.json).
    pub model: PathBuf,
    /// Blocks between the key's block and the question's; a comma-separated list gives one
    /// figure per distance.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub distance_blocks: Vec<usize>,
    /// Samples per distance.
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Seed of the sample generator (SplitMix64, as export/passkey.py draws them).
    #[arg(long, default_value_t = 12345)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    pub backend: Backend,
    /// Evaluate the same weights with F = 0: plain block sliding-window attention (checkpoints only).
    #[arg(long)]
    pub bswa: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `famc eval`.
pub fn run(cmd: EvalCommand) -> Result<()> {
    let EvalCommand::Passkey(args) = cmd;
    let opts = passkey::PasskeyOptions {
        distances: args.distance_blocks,
        samples: args.samples,
        seed: args.seed,
        bswa: args.bswa,
        engine: args
            .backend
            .graphs()
            .map_or(Engine::Reference, Engine::Graphs),
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
