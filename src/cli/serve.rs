//! `famc serve`: the KServe v2 protocol over HTTP, one model, many sequences.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use famc::model::FamDefaults;
use famc::runtime::{BackendKind, RunOptions};
use famc::serve::ServeOptions;
use famc::session::FamModel;
use famc::stream::TextTokenizer;

/// Arguments of `famc serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// An export directory (famc.json) or a checkpoint directory (compiled in memory).
    pub model: PathBuf,
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// The model's name in the URLs (/v2/models/NAME/infer).
    #[arg(long, default_value = "famc")]
    pub model_name: String,
    /// Live sequences at most; a start beyond that gets 429.
    #[arg(long, default_value_t = 256)]
    pub max_sequences: usize,
    /// Seconds without a request after which a sequence is ended and its state freed.
    #[arg(long, default_value_t = 600.0)]
    pub idle_timeout: f64,
    /// Blocks of concurrent sequences run together in one call, at most this many (default: 8
    /// on ONNX Runtime; 1 on tract, whose batched plan is slower than its single-stream one).
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Microseconds the first waiting block waits for others to join its batch.
    #[arg(long, default_value_t = 500)]
    pub batch_delay_us: u64,
    /// Threads that gather and run batches at once, each on a block-graph runner of its own
    /// sharing the weights (default: tract one per core; ONNX Runtime one per `--threads` share
    /// of the cores, so one unless --threads is lower; one on a GPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch_workers: Option<u64>,
    /// Tokens per request at most.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Request bodies over this many bytes get 413.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
}

pub fn run(
    args: ServeArgs,
    fam: FamDefaults,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<()> {
    if !(args.idle_timeout.is_finite() && args.idle_timeout > 0.0) {
        bail!(
            "--idle-timeout must be a positive number of seconds, got {}",
            args.idle_timeout
        );
    }
    let max_batch = args.max_batch_size.unwrap_or(match backend {
        BackendKind::Tract => 1,
        BackendKind::Ort => 8,
    });
    let mut opts = opts.clone();
    // a TensorRT engine must take the largest batch the server forms
    opts.ep.max_batch = opts.ep.max_batch.max(max_batch);
    let model = FamModel::open_any(&args.model, fam, backend, &opts)?;
    let vocab = model.manifest().model.vocab_size;
    let eos = famc::model::eos_token_ids(&args.model)?;
    if let Some(&bad) = eos.iter().find(|&&t| t as usize >= vocab) {
        bail!(
            "{}: eos_token_id {bad} is outside the model's vocabulary of {vocab}",
            args.model.display()
        );
    }
    let tokenizer = if args.model.join("tokenizer.json").exists() {
        Some(TextTokenizer::from_dir(&args.model)?)
    } else {
        None
    };
    let serve_opts = ServeOptions {
        addr: args.addr,
        model_name: args.model_name.clone(),
        max_sequences: args.max_sequences,
        idle_timeout: Duration::from_secs_f64(args.idle_timeout),
        max_batch,
        batch_delay: Duration::from_micros(args.batch_delay_us),
        batch_workers: args.batch_workers.map(|n| n as usize),
        max_tokens: args.max_tokens,
        max_body_bytes: args.max_body_bytes,
    };
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let notify = shutdown.clone();
    famc::signal::on_next_signal(move || notify.notify_one());
    let p = model.fam_params();
    let name = args.model_name.clone();
    let with_text = tokenizer.is_some();
    famc::serve::serve(
        model,
        tokenizer,
        eos,
        serve_opts,
        |addr| {
            // tests and scripts read the port from this line
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "famc serve: listening on http://{addr} (model `{name}` on {}, L={}, F={}, M={}{})",
                backend.name(),
                p.block_len,
                p.fam_len,
                p.mem_blocks,
                if with_text { ", tokenizer" } else { "" }
            );
            let _ = out.flush();
        },
        shutdown,
    )?;
    eprintln!("famc serve: stopped");
    Ok(())
}
