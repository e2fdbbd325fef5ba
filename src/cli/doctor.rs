//! `famc doctor`: which backends and execution providers are available, and how to fix the rest.

use anyhow::Result;
use clap::Args;

/// Arguments of `famc doctor`.
#[derive(Args)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `famc doctor`.
pub fn run(args: DoctorArgs) -> Result<()> {
    let report = famc::doctor::doctor();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        out!("{report}")?;
    }
    Ok(())
}
