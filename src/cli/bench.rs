//! `famc bench`: throughput, latency and memory of a model, against the backend's matmul speed.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use famc::bench::{
    bench_model, flops_per_token, matmul_gflops, plot_sweep, presets, BenchReport, SweepPoint,
};
use famc::model::{Checkpoint, FamDefaults, FamParams};
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

/// Arguments of `famc bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// An export or checkpoint directory (or use --preset).
    #[arg(required_unless_present_any = ["preset", "replot"], conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A random-weight model of realistic shape: tiny, 25m, 110m, 350m or 1b.
    #[arg(long)]
    pub preset: Option<String>,
    /// Prefill length in tokens (default: 4 blocks).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Tokens decoded after the prefill.
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Timed runs; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Run the same weights as FAM, as BSWA (F = 0) and as plain causal attention (F = 0 with
    /// memory covering the input).
    #[arg(long)]
    pub compare: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run each configuration with its state copied out to host arrays after every block
    /// and token (`--host-state`), right after the normal runs on the same loaded model: what
    /// keeping the state in the backend's values saves.
    #[arg(long, conflicts_with = "sweep")]
    pub compare_state: bool,
    /// Only this configuration of --compare: fam, bswa or causal.
    #[arg(long, value_parser = ["fam", "bswa", "causal"])]
    pub only: Option<String>,
    /// Input lengths for a sweep: each configuration (fam, bswa, causal) at each length runs in a
    /// process of its own, so that each peak RSS is its own.
    #[arg(long, value_delimiter = ',', requires = "svg")]
    pub sweep: Vec<usize>,
    /// Where the sweep's plot goes (SVG: time per token and peak RSS against input length).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Redraw the plot from the points a sweep wrote with --json (no measuring).
    #[arg(long, requires = "svg")]
    pub replot: Option<PathBuf>,
}

fn sweep(
    args: &BenchArgs,
    fam: FamDefaults,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let mut points = Vec::new();
    outln!("| backend | config | tokens | µs/token | peak RSS MiB |\n|---|---|---|---|---|")?;
    for &n in &args.sweep {
        for config in ["fam", "bswa", "causal"] {
            let out = tmp.path().join(format!("{config}-{n}.json"));
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("bench");
            match (&args.preset, &args.model) {
                (Some(p), _) => cmd.args(["--preset", p]),
                (None, Some(m)) => cmd.arg(m),
                (None, None) => bail!("a sweep needs a model or a preset"),
            };
            cmd.args([
                "--backend",
                backend.name(),
                "--only",
                config,
                "--decode-tokens",
                "0",
            ]);
            cmd.args(["--tokens", &n.to_string(), "--runs", &args.runs.to_string()]);
            for (flag, v) in [
                ("--block-len", fam.block_len),
                ("--fam-len", fam.fam_len),
                ("--mem-blocks", fam.mem_blocks),
            ] {
                if let Some(v) = v {
                    cmd.args([flag, &v.to_string()]);
                }
            }
            if let Some(t) = opts.intra_threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            if let Some(t) = opts.inter_threads {
                cmd.args(["--inter-threads", &t.to_string()]);
            }
            if let Some(level) = opts.ort_optimization {
                cmd.args(["--ort-opt-level", level.name()]);
            }
            cmd.args(opts.ep.cli_args());
            if opts.host_state {
                cmd.arg("--host-state");
            }
            cmd.arg("--json").arg(&out);
            let status = cmd.stdout(std::process::Stdio::null()).status()?;
            if !status.success() {
                bail!("the sweep's run of {config} at {n} tokens failed");
            }
            let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
            let r = &j["results"][0]["report"];
            let tps = r["prefill_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            let point = SweepPoint {
                backend: backend.name().into(),
                config: config.into(),
                tokens: n,
                us_per_token: 1e6 / tps,
                peak_rss_mib: r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            };
            outln!(
                "| {} | {config} | {n} | {:.1} | {:.1} |",
                backend.name(),
                point.us_per_token,
                point.peak_rss_mib
            )?;
            points.push(point);
        }
    }
    let title = format!(
        "famc bench: FAM vs BSWA vs causal attention, {}",
        backend.name()
    );
    let svg = args.svg.as_ref().expect("clap requires --svg with --sweep");
    plot_sweep(&points, &title, svg)?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&points)?;
        famc::io::write_atomic(path, |w| w.write_all(text.as_bytes()))?;
    }
    Ok(())
}

/// Runs `famc bench`.
pub fn run(
    args: BenchArgs,
    fam: FamDefaults,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(points) = &args.replot {
        let points: Vec<SweepPoint> = serde_json::from_str(&std::fs::read_to_string(points)?)?;
        let title = format!(
            "famc bench: FAM vs BSWA vs causal attention, {}",
            points.first().map_or("", |p| p.backend.as_str())
        );
        plot_sweep(
            &points,
            &title,
            args.svg.as_ref().expect("clap requires --svg"),
        )?;
        return Ok(());
    }
    if !args.sweep.is_empty() {
        return sweep(&args, fam, backend, opts);
    }
    let _tmp;
    let (ck_dir, preset_spec, preset_fam) = match &args.preset {
        Some(name) => {
            let Some(p) = presets().into_iter().find(|p| p.name == name.as_str()) else {
                bail!("unknown preset `{name}` (tiny, 25m, 110m, 350m, 1b)");
            };
            let dir = tempfile::tempdir()?;
            famc::model::synthetic::write_checkpoint(dir.path(), &p.spec)?;
            let path = dir.path().to_path_buf();
            _tmp = dir;
            let fp = FamParams {
                block_len: p.block_len,
                fam_len: p.fam_len,
                mem_blocks: p.mem_blocks,
            };
            (Some(path), Some(p.spec), Some(fp))
        }
        None => {
            let m = args.model.clone().expect("clap requires one");
            if m.join(famc::export::MANIFEST_FILE).exists() {
                (None, None, None)
            } else {
                (Some(m), None, None)
            }
        }
    };
    let mut configs: Vec<(String, FamModel)> = Vec::new();
    let state_modes: &[bool] = if args.compare_state {
        &[false, true]
    } else {
        &[opts.host_state]
    };
    match &ck_dir {
        Some(dir) => {
            let ck = Checkpoint::load(dir)?;
            let base = match preset_fam {
                Some(p) => FamParams {
                    block_len: fam.block_len.unwrap_or(p.block_len),
                    fam_len: fam.fam_len.unwrap_or(p.fam_len),
                    mem_blocks: fam.mem_blocks.unwrap_or(p.mem_blocks),
                },
                None => ck.fam_params(fam)?,
            };
            let tokens = args.tokens.unwrap_or(4 * base.block_len);
            let bswa = FamParams { fam_len: 0, ..base };
            let causal = FamParams {
                fam_len: 0,
                mem_blocks: tokens.div_ceil(base.block_len),
                ..base
            };
            let all = [("fam", base), ("bswa", bswa), ("causal", causal)];
            let wanted: Vec<(&str, FamParams)> = match (&args.only, args.compare) {
                (Some(only), _) => all.into_iter().filter(|(n, _)| n == only).collect(),
                (None, true) => all.to_vec(),
                (None, false) => vec![all[0]],
            };
            for (name, p) in wanted {
                let mut ck = ck.clone();
                if p.fam_len == 0 {
                    // the same weights without FAM: the learned prompt has no place then
                    ck.weights.fam_init = None;
                }
                configs.push((name.into(), FamModel::compile(&ck, p, backend, opts)?));
            }
        }
        None => {
            if args.compare {
                bail!("--compare needs a checkpoint or a preset: an export's FAM parameters are fixed");
            }
            let m = FamModel::open(args.model.as_ref().expect("checked"), backend, opts)?;
            configs.push(("fam".into(), m));
        }
    }
    let gflops = matmul_gflops(backend, opts, 512, args.runs.max(5))?;
    eprintln!(
        "{} ({}) f32 matmul 512x512x512: {gflops:.1} GFLOP/s (median)",
        backend.name(),
        opts.ep.kind.name()
    );
    let mut results = Vec::new();
    for (name, model) in &mut configs {
        let tokens = args.tokens.unwrap_or(4 * model.fam_params().block_len);
        // each state mode in turn, run by run, after one untimed run of each: neither mode gets
        // the warm-up or a quieter stretch of the machine to itself
        let mut per_mode: Vec<Vec<BenchReport>> = vec![Vec::new(); state_modes.len()];
        if state_modes.len() > 1 {
            for &host_state in state_modes {
                model.set_host_state(host_state);
                bench_model(model, tokens, args.decode_tokens, 1)?;
            }
        }
        for _ in 0..args.runs {
            for (m, &host_state) in state_modes.iter().enumerate() {
                model.set_host_state(host_state);
                per_mode[m].push(bench_model(model, tokens, args.decode_tokens, 1)?);
            }
        }
        for (&host_state, reports) in state_modes.iter().zip(per_mode) {
            let r = BenchReport::merge(reports).expect("at least one run");
            let name = if host_state && args.compare_state {
                format!("{name}/host-state")
            } else {
                name.clone()
            };
            let p = model.fam_params();
            let fraction = preset_spec.as_ref().map(|s| {
                let keys = p.mem_len() + p.fam_len + p.block_len / 2;
                r.prefill_tokens_per_s * flops_per_token(s, keys) / 1e9 / gflops
            });
            outln!(
            "{name:<7} L={:<5} F={:<3} M={:<3} prefill {:>9.1} tok/s  {:>8.2} ms/block  decode {:>8.1} tok/s  peak RSS {:>7.1} MiB{}",
            p.block_len,
            p.fam_len,
            p.mem_blocks,
            r.prefill_tokens_per_s,
            r.ms_per_block,
            r.decode_tokens_per_s,
            r.peak_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
            fraction.map_or(String::new(), |f| format!("  {:.1}% of matmul peak", 100.0 * f)),
        )?;
            results.push(
                serde_json::json!({"config": name, "report": r, "fraction_of_matmul": fraction}),
            );
        }
    }
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "preset": args.preset,
            "parameters": preset_spec.as_ref().map(|s| s.parameters()),
            "matmul_gflops": gflops,
            "results": results,
        });
        let text = serde_json::to_string_pretty(&j)?;
        famc::io::write_atomic(path, |w| w.write_all(text.as_bytes()))?;
    }
    Ok(())
}
