//! The `famc` command line.

use std::process::ExitCode;

mod cli;

use clap::{Parser, Subcommand};

use cli::common::Compiled;

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
    Run(cli::run::RunArgs),
    /// Stream input of any length through a model: mean negative log-likelihood and perplexity.
    Score(Compiled<cli::score::ScoreArgs>),
    /// Generate tokens after a prompt, across block boundaries, with the decode graph.
    Generate(Compiled<cli::generate::GenerateArgs>),
    /// Measure prefill and decode throughput, latency per block and peak memory.
    Bench(Compiled<cli::bench::BenchArgs>),
    /// Serve a model over HTTP with the KServe v2 protocol (Triton's), holding each sequence's state.
    Serve(Compiled<cli::serve::ServeArgs>),
    /// Compile a checkpoint into ONNX graphs with explicit FAM state (docs/graph-contract.md).
    Export(cli::export::ExportArgs),
    /// Show the inputs, outputs, ops, weights and FAM parameters of an export or an .onnx file.
    Inspect(cli::inspect::InspectArgs),
    /// Show which backends and execution providers are available, and how to fix what is not.
    Doctor(cli::doctor::DoctorArgs),
    /// Evaluate a model on a task through famc's compiled graphs (docs/passkey.md).
    #[command(subcommand)]
    Eval(cli::eval::EvalCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = famc::signal::install() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(a) => cli::run::run(a),
        Command::Score(c) => c.run("score", cli::score::score),
        Command::Generate(c) => c.run("generate", cli::generate::run),
        Command::Bench(c) => c.run("bench", cli::bench::run),
        Command::Serve(c) => c.run("serve", cli::serve::run),
        Command::Export(a) => cli::export::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Doctor(a) => cli::doctor::run(a),
        Command::Eval(c) => cli::eval::run(c),
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
