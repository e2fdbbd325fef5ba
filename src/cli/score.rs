//! `famc score`: streaming mean negative log-likelihood and perplexity over input of any length.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use famc::model::FamDefaults;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;
use famc::snapshot::Snapshot;
use famc::stream::{Scorer, TextChunks, TextTokenizer, TokenReader};

/// Arguments of `famc score`.
#[derive(Args)]
pub struct ScoreArgs {
    /// An export directory (famc.json) or a checkpoint directory (compiled in memory).
    pub model: PathBuf,
    /// Whitespace-separated token ids; `-` reads stdin.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    pub tokens: Option<PathBuf>,
    /// UTF-8 text, tokenized with the model's tokenizer.json; `-` reads stdin.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write the stream's state after the input (its last full block and the tokens since) here.
    #[arg(long)]
    pub save_state: Option<PathBuf>,
    /// Continue the stream saved by --save-state: the input is what follows the saved part.
    #[arg(long)]
    pub resume_state: Option<PathBuf>,
}

fn open_input(path: &PathBuf) -> Result<(Box<dyn BufRead>, String, Option<u64>)> {
    if path.as_os_str() == "-" {
        return Ok((
            Box::new(BufReader::new(std::io::stdin())),
            "stdin".into(),
            None,
        ));
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata().ok().map(|m| m.len());
    Ok((Box::new(BufReader::new(f)), path.display().to_string(), len))
}

fn progress(quiet: bool, total_bytes: Option<u64>) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total_bytes {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg} ETA {eta}")
                .expect("static template"),
        ),
        None => ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {msg}").expect("static template")),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

/// Runs `famc score`.
pub fn score(
    args: ScoreArgs,
    fam: FamDefaults,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<()> {
    let model = FamModel::open_any(&args.model, fam, backend, opts)?;
    let manifest = model.manifest().clone();
    let mut scorer = match &args.resume_state {
        Some(p) => Scorer::resume(&model, Snapshot::load(p, &manifest)?),
        None => Scorer::new(&model),
    };
    let start = Instant::now();
    let mut read = 0u64;
    let input = args
        .tokens
        .as_ref()
        .or(args.text.as_ref())
        .expect("clap requires one");
    let (reader, source, total) = open_input(input)?;
    let bar = progress(args.quiet, total);
    let report = |bar: &ProgressBar, bytes: u64, tokens: u64| {
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(bytes);
        bar.set_message(format!(
            "{tokens} tokens, {:.0} tokens/s",
            tokens as f64 / secs
        ));
    };
    if args.tokens.is_some() {
        let mut tokens = TokenReader::new(reader, source, manifest.model.vocab_size);
        loop {
            let chunk = tokens.next_chunk()?;
            if chunk.is_empty() {
                break;
            }
            read += chunk.len() as u64;
            scorer.push(&chunk)?;
            report(&bar, tokens.bytes_read(), read);
        }
    } else {
        let dir = if args.model.is_dir() {
            args.model.clone()
        } else {
            bail!("{} is not a directory", args.model.display())
        };
        let tok = TextTokenizer::from_dir(&dir)?;
        let mut pieces = TextChunks::new(reader, source);
        let mut bytes = 0u64;
        let mut first = args.resume_state.is_none();
        while let Some(piece) = pieces.next_piece()? {
            bytes += piece.len() as u64;
            let ids = tok.encode(&piece, first)?;
            first = false;
            if let Some(&bad) = ids
                .iter()
                .find(|&&t| t as usize >= manifest.model.vocab_size)
            {
                bail!(
                    "the tokenizer produced id {bad}, outside the model's vocabulary of {}",
                    manifest.model.vocab_size
                );
            }
            read += ids.len() as u64;
            scorer.push(&ids)?;
            report(&bar, bytes, read);
        }
    }
    bar.finish_and_clear();
    let stats = scorer.totals()?;
    let secs = start.elapsed().as_secs_f64();
    if stats.scored == 0 {
        bail!("nothing to score: at least two tokens are needed (token i predicts token i + 1)");
    }
    if let Some(p) = &args.save_state {
        scorer.snapshot()?.save(p, &manifest)?;
    }
    let tokens_per_s = read as f64 / secs.max(1e-9);
    if args.json {
        let j = serde_json::json!({
            "tokens": stats.tokens,
            "scored": stats.scored,
            "mean_nll": stats.mean_nll(),
            "ppl": stats.ppl(),
            "tokens_per_s": tokens_per_s,
            "seconds": secs,
            "backend": backend.name(),
            "state_location": scorer.state().location(),
            "peak_rss_bytes": famc::stream::peak_rss_bytes(),
            "block_len": manifest.fam.block_len,
            "fam_len": manifest.fam.fam_len,
            "mem_blocks": manifest.fam.mem_blocks,
        });
        outln!("{j}")?;
    } else {
        outln!(
            "tokens {}  scored {}  mean_nll {:.6}  ppl {:.4}  ({:.0} tokens/s on {})",
            stats.tokens,
            stats.scored,
            stats.mean_nll(),
            stats.ppl(),
            tokens_per_s,
            backend.name()
        )?;
    }
    Ok(())
}
