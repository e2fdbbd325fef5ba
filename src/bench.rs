//! `famc bench`: prefill and decode throughput, per-block latency and peak memory of a model on a
//! backend, with the backend's own f32 matrix-multiply throughput as the yardstick.

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use crate::builder::{DType, Dim, GraphBuilder, TensorData};
use crate::error::Result;
use crate::generate::{FamDecoder, LanguageModel};
use crate::model::synthetic::SyntheticSpec;
use crate::onnx::DEFAULT_OPSET;
use crate::runtime::{open_graph, BackendKind, RunOptions, Tensor};
use crate::session::FamModel;

/// A named model shape with FAM parameters, built with random weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub spec: SyntheticSpec,
    pub block_len: usize,
    pub fam_len: usize,
    pub mem_blocks: usize,
}

/// The presets: Llama shapes of about 2M, 25M, 110M, 350M and 800M (`1b`) parameters.
pub fn presets() -> Vec<Preset> {
    let spec = |hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size| {
        SyntheticSpec {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            intermediate_size,
            vocab_size,
            seed: 1,
        }
    };
    vec![
        Preset {
            name: "tiny",
            spec: spec(128, 2, 4, 2, 384, 2048),
            block_len: 64,
            fam_len: 8,
            mem_blocks: 1,
        },
        Preset {
            name: "25m",
            spec: spec(512, 4, 8, 4, 1408, 16000),
            block_len: 256,
            fam_len: 64,
            mem_blocks: 1,
        },
        Preset {
            name: "110m",
            spec: spec(768, 12, 12, 12, 2048, 32000),
            block_len: 256,
            fam_len: 64,
            mem_blocks: 2,
        },
        Preset {
            name: "350m",
            spec: spec(1024, 24, 16, 16, 2816, 32000),
            block_len: 1024,
            fam_len: 64,
            mem_blocks: 3,
        },
        // ~0.8B parameters (tied embeddings), the shape of a 1B Llama: for GPUs
        Preset {
            name: "1b",
            spec: spec(2048, 16, 32, 8, 5632, 32000),
            block_len: 1024,
            fam_len: 64,
            mem_blocks: 1,
        },
    ]
}

/// Median of samples (sorted copy).
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// f32 matrix-multiply throughput of a backend: a [n, n] · [n, n] MatMul graph, GFLOP/s median.
pub fn matmul_gflops(
    backend: BackendKind,
    opts: &RunOptions,
    n: usize,
    runs: usize,
) -> Result<f64> {
    let mut b = GraphBuilder::new("matmul", DEFAULT_OPSET);
    let x = b.input(
        "x",
        DType::F32,
        vec![Dim::Fixed(n as i64), Dim::Fixed(n as i64)],
    );
    let w: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = b.weight("w", TensorData::from_f32(&w, &[n as i64, n as i64]))?;
    let y = b.matmul(&x, &w);
    b.output(&y, "y");
    let dir = tempfile::tempdir().map_err(|e| crate::Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("matmul.onnx");
    crate::builder::save_model(b.finish()?, &path, None)?;
    let mut runner = open_graph(backend, &path, opts)?;
    let input = ArrayD::from_elem(IxDyn(&[n, n]), 0.5f32);
    runner.run(vec![Tensor::F32(input.clone())])?;
    let mut secs = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        runner.run(vec![Tensor::F32(input.clone())])?;
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / median(&secs) / 1e9)
}

/// One run's figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RunFigures {
    pub prefill_tokens_per_s: f64,
    pub ms_per_block: f64,
    pub decode_tokens_per_s: f64,
}

/// Medians over runs, and the process's peak RSS.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub backend: String,
    /// ONNX Runtime's execution provider (`cpu` for tract).
    pub execution_provider: String,
    pub block_len: usize,
    pub fam_len: usize,
    pub mem_blocks: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub runs: Vec<RunFigures>,
    pub prefill_tokens_per_s: f64,
    pub ms_per_block: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl BenchReport {
    /// Joins reports of the same model and configuration measured in turns (e.g. one run each,
    /// interleaved with another configuration's): all their runs, medians over them, the last
    /// peak RSS.
    pub fn merge(reports: Vec<BenchReport>) -> Option<BenchReport> {
        let mut reports = reports.into_iter();
        let mut all = reports.next()?;
        for r in reports {
            all.runs.extend(r.runs);
            all.peak_rss_bytes = r.peak_rss_bytes;
        }
        let col = |f: fn(&RunFigures) -> f64| median(&all.runs.iter().map(f).collect::<Vec<_>>());
        all.prefill_tokens_per_s = col(|r| r.prefill_tokens_per_s);
        all.ms_per_block = col(|r| r.ms_per_block);
        all.decode_tokens_per_s = col(|r| r.decode_tokens_per_s);
        Some(all)
    }
}

/// Times `runs` prefills of `prefill_tokens` tokens (full blocks through the block graph) and
/// `decode_tokens` decoded tokens after them, on one stream.
pub fn bench_model(
    model: &FamModel,
    prefill_tokens: usize,
    decode_tokens: usize,
    runs: usize,
) -> Result<BenchReport> {
    let p = model.fam_params();
    let vocab = model.manifest().model.vocab_size as u64;
    let ids: Vec<u32> = (0..prefill_tokens as u64)
        .map(|i| ((i * 2_654_435_761) % vocab) as u32)
        .collect();
    let mut figures = Vec::new();
    for _ in 0..runs {
        let mut state = [model.new_state()];
        let mut block_secs = Vec::new();
        let t = Instant::now();
        for block in ids.chunks(p.block_len) {
            let b = Instant::now();
            model.step(&mut state, &[block])?;
            block_secs.push(b.elapsed().as_secs_f64());
        }
        let prefill = t.elapsed().as_secs_f64();
        let decode_rate = if decode_tokens > 0 {
            let mut dec = FamDecoder::new(model)?;
            dec.feed(&ids)?;
            let t = Instant::now();
            let mut token = 1;
            for _ in 0..decode_tokens {
                let logits = dec.feed(&[token])?;
                token = (logits
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
                    .0) as u32;
            }
            decode_tokens as f64 / t.elapsed().as_secs_f64()
        } else {
            f64::NAN
        };
        figures.push(RunFigures {
            prefill_tokens_per_s: prefill_tokens as f64 / prefill,
            ms_per_block: median(&block_secs) * 1e3,
            decode_tokens_per_s: decode_rate,
        });
    }
    let col = |f: fn(&RunFigures) -> f64| median(&figures.iter().map(f).collect::<Vec<_>>());
    Ok(BenchReport {
        backend: model.backend().name().to_string(),
        execution_provider: model.run_options().ep.kind.name().to_string(),
        block_len: p.block_len,
        fam_len: p.fam_len,
        mem_blocks: p.mem_blocks,
        prefill_tokens,
        decode_tokens,
        prefill_tokens_per_s: col(|r| r.prefill_tokens_per_s),
        ms_per_block: col(|r| r.ms_per_block),
        decode_tokens_per_s: col(|r| r.decode_tokens_per_s),
        runs: figures,
        peak_rss_bytes: crate::stream::peak_rss_bytes(),
    })
}

/// Forward FLOPs per token of a model with `params` non-embedding weights attending to `keys`
/// keys: 2 per weight plus QKᵀ and PV.
pub fn flops_per_token(spec: &SyntheticSpec, keys: usize) -> f64 {
    let d = spec.hidden_size as f64;
    let weights = spec.parameters() as f64 - (spec.vocab_size * spec.hidden_size) as f64;
    2.0 * weights
        + 2.0 * spec.vocab_size as f64 * d
        + 4.0 * spec.num_layers as f64 * d * keys as f64
}

/// One point of a length sweep: a configuration at an input length, measured in its own process.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SweepPoint {
    pub backend: String,
    pub config: String,
    pub tokens: usize,
    /// Prefill time per token, microseconds (median of runs).
    pub us_per_token: f64,
    pub peak_rss_mib: f64,
}

/// Plots time per token and peak RSS against input length, one line per backend and
/// configuration, as an SVG file (written atomically).
pub fn plot_sweep(points: &[SweepPoint], title: &str, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let plot_err = |e: String| crate::Error::Write {
        path: path.to_path_buf(),
        message: format!("cannot draw the plot: {e}"),
    };
    let mut series: Vec<(String, Vec<&SweepPoint>)> = Vec::new();
    for p in points {
        let key = format!("{} {}", p.backend, p.config);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(p),
            None => series.push((key, vec![p])),
        }
    }
    let x_max = points.iter().map(|p| p.tokens as f64).fold(1.0, f64::max) * 1.3;
    let x_min = points
        .iter()
        .map(|p| p.tokens as f64)
        .fold(f64::INFINITY, f64::min)
        / 1.3;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        let root = root
            .titled(title, ("sans-serif", 18))
            .map_err(|e| plot_err(e.to_string()))?;
        let (left, right) = root.split_horizontally(500);
        let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        type Pick = fn(&SweepPoint) -> f64;
        let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, Pick); 2] = [
            (&left, "prefill time per token (µs)", |p| p.us_per_token),
            (&right, "peak RSS (MiB)", |p| p.peak_rss_mib),
        ];
        for (area, label, pick) in panels {
            let y_max = points.iter().map(pick).fold(0.0, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max.max(1e-9))
                .map_err(|e| plot_err(e.to_string()))?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .x_labels(6)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .x_desc("input length (tokens)")
                .y_desc(label)
                .draw()
                .map_err(|e| plot_err(e.to_string()))?;
            for (i, (key, pts)) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                let data: Vec<(f64, f64)> =
                    pts.iter().map(|p| (p.tokens as f64, pick(p))).collect();
                chart
                    .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                    .map_err(|e| plot_err(e.to_string()))?
                    .label(key.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        data.into_iter()
                            .map(|xy| Circle::new(xy, 3, color.filled())),
                    )
                    .map_err(|e| plot_err(e.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| plot_err(e.to_string()))?;
        }
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    crate::io::write_atomic(path, |w| w.write_all(svg.as_bytes()))
}
