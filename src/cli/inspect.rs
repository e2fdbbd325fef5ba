//! `famc inspect`: an export's or a graph file's inputs, outputs, ops, weights and FAM parameters.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `famc inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// An export directory or an .onnx file.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Dump every node of a graph file (inputs, outputs, initializers, nodes) as text.
    #[arg(long, conflicts_with = "json")]
    pub nodes: bool,
    /// Check every file of an export against the sizes and SHA-256 hashes famc.json records.
    #[arg(long, conflicts_with_all = ["json", "nodes"])]
    pub verify: bool,
}

/// Runs `famc inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
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
