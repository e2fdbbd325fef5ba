//! `famc run`: a model over token ids block by block, the logits to a float32 .npy.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use famc::model::Checkpoint;
use famc::reference::Reference;
use famc::session::FamModel;

use super::common::{note_zero_prompt, Backend, FamArgs, RuntimeArgs};

/// Arguments of `famc run`.
#[derive(Args)]
pub struct RunArgs {
    /// An export directory (famc.json) or a checkpoint directory (compiled in memory).
    pub model: PathBuf,
    #[arg(long, value_enum, default_value_t = Backend::Tract)]
    pub backend: Backend,
    #[command(flatten)]
    pub fam: FamArgs,
    /// File of whitespace-separated token ids.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Where to write the logits (float32 .npy, shape [T, V]).
    #[arg(long)]
    pub logits_out: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Runs `famc run`.
pub fn run(args: RunArgs) -> Result<()> {
    let is_export = args.model.join(famc::export::MANIFEST_FILE).exists();
    let (logits, fam) = match args.backend.graphs() {
        None => {
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
        Some(kind) => {
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
