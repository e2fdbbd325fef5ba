//! `famc generate`: greedy or sampled generation across block boundaries.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use famc::generate::{generate, FamDecoder, GenerateOptions, Sampling};
use famc::model::FamDefaults;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;
use famc::stream::TextTokenizer;

/// Arguments of `famc generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// An export directory (famc.json) or a checkpoint directory (compiled in memory).
    pub model: PathBuf,
    /// The prompt as whitespace-separated token ids; the new ids go to stdout.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub tokens: Option<PathBuf>,
    /// The prompt as text (needs tokenizer.json); the new text streams to stdout.
    #[arg(long)]
    pub prompt: Option<String>,
    /// How many tokens to generate at most.
    #[arg(long)]
    pub max_new_tokens: usize,
    /// Pick the most likely token each time (the default).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sample from softmax(logits / T).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample within the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this token is generated (not printed); repeatable. Generation also stops at
    /// the model's end-of-sequence ids (`eos_token_id` of generation_config.json, else
    /// config.json) unless --ignore-eos.
    #[arg(long = "stop-token")]
    pub stop_tokens: Vec<u32>,
    /// Do not stop at the model's end-of-sequence ids.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// Runs `famc generate`.
pub fn run(
    args: GenerateArgs,
    fam: FamDefaults,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<()> {
    let sampling = if args.greedy
        || (args.temperature.is_none() && args.top_k.is_none() && args.top_p.is_none())
    {
        Sampling::Greedy
    } else {
        Sampling::Random {
            temperature: args.temperature.unwrap_or(1.0),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        }
    };
    let model = FamModel::open_any(&args.model, fam, backend, opts)?;
    let vocab = model.manifest().model.vocab_size;
    if let Some(&bad) = args.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("--stop-token {bad} is out of range (vocab_size {vocab})");
    }
    let mut stop_tokens = args.stop_tokens.clone();
    if !args.ignore_eos {
        let dir = args.model.as_path();
        let eos = famc::model::eos_token_ids(dir)?;
        if let Some(&bad) = eos.iter().find(|&&t| t as usize >= vocab) {
            bail!(
                "{}: eos_token_id {bad} is outside the model's vocabulary of {vocab} (--ignore-eos to generate regardless)",
                dir.display()
            );
        }
        stop_tokens.extend(eos);
    }
    let tokenizer = match &args.prompt {
        Some(_) => Some(TextTokenizer::from_dir(&args.model)?),
        None => None,
    };
    let prompt = match (&args.tokens, &args.prompt, &tokenizer) {
        (Some(path), _, _) => famc::io::read_token_ids(path, vocab)?,
        (None, Some(text), Some(tok)) => tok.encode(text, true)?,
        _ => unreachable!("clap requires --tokens or --prompt"),
    };
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("the prompt holds id {bad}, outside the model's vocabulary of {vocab}");
    }
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens,
    };
    let mut decoder = FamDecoder::new(&model)?;
    let mut out = std::io::stdout().lock();
    let mut generated = Vec::new();
    let mut printed = String::new();
    for token in generate(&mut decoder, &prompt, &options)? {
        let token = token?;
        generated.push(token);
        match &tokenizer {
            None => {
                let sep = if generated.len() > 1 { " " } else { "" };
                write!(out, "{sep}{token}")?;
            }
            Some(tok) => {
                // decode the whole continuation so that multi-token characters come out whole
                let text = tok.decode(&generated)?;
                if let Some(new) = text.strip_prefix(printed.as_str()) {
                    write!(out, "{new}")?;
                    printed = text;
                }
            }
        }
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}
