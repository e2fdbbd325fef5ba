//! A side-by-side timing of the tract block-graph plans (ignored by default: it measures, it
//! does not check). Run it with
//!
//! ```sh
//! cargo test --test tract_bench -- --ignored --nocapture
//! ```
//!
//! A random checkpoint (d = 256, 4 layers, 8 heads, 4 KV heads, L = 64, F = 8, M = 2) is exported,
//! and its block graph run for one stream on full blocks (T = L) and on a tail block (T = 17):
//! the symbolic plan alone, with a `T = L` plan, and with a `batch = 1, T = L` plan, on 1 and 2
//! threads. With `FAMC_BENCH_ORT=1`, ONNX Runtime too (run after tract: its spinning pool
//! threads would slow whatever runs next). `FAMC_BENCH_RUNS` sets the rounds (default 15).

mod common;

use std::time::Instant;

use common::*;
use famc::export::{self, ExportOptions};
use famc::model::{Checkpoint, FamParams};
use famc::runtime::tract::{PlanKind, TractRunner};
use famc::runtime::{open_graph, BackendKind, Dim, GraphRunner, RunOptions, Tensor};
use ndarray::{ArrayD, IxDyn};

const L: usize = 64;

fn inputs(specs: &[famc::runtime::IoSpec], batch: usize, t: usize, vocab: usize) -> Vec<Tensor> {
    let mut rng = Rng::new(11);
    let mut v = vec![
        Tensor::I64(ArrayD::from_shape_fn(IxDyn(&[batch, t]), |ix| {
            ((ix[0] * 131 + ix[1] * 17) % vocab) as i64
        })),
        Tensor::I64(ArrayD::from_elem(IxDyn(&[batch]), 5)),
    ];
    for spec in &specs[2..] {
        let shape: Vec<usize> = spec
            .shape
            .as_ref()
            .unwrap()
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                _ => batch,
            })
            .collect();
        v.push(Tensor::F32(ArrayD::from_shape_simple_fn(
            IxDyn(&shape),
            || rng.uniform() - 0.5,
        )));
    }
    v
}

fn median(mut d: Vec<f64>) -> f64 {
    d.sort_by(f64::total_cmp);
    d[d.len() / 2]
}

/// The 10th percentile: on a busy machine, closer to the uncontended time than the median.
fn p10(mut d: Vec<f64>) -> f64 {
    d.sort_by(f64::total_cmp);
    d[d.len() / 10]
}

/// The mean: CPU time is accounted in scheduler ticks (often 4 ms), so one run's figure is a
/// sample and only the mean is unbiased.
fn mean(d: Vec<f64>) -> f64 {
    d.iter().sum::<f64>() / d.len() as f64
}

/// This thread's time on a CPU so far, in ns (Linux `/proc/thread-self/schedstat`): unlike the
/// wall clock, it does not count time spent preempted by other processes.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Wall-clock and calling-thread CPU milliseconds of one run (the CPU time covers only the
/// calling thread: meaningful for single-threaded runners).
fn time_run(r: &mut dyn GraphRunner, input: &[Tensor]) -> (f64, f64) {
    let x = input.to_vec();
    let c0 = thread_cpu_ns();
    let t0 = Instant::now();
    r.run(x).unwrap();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let cpu = match (c0, thread_cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => f64::NAN,
    };
    (wall, cpu)
}

#[test]
#[ignore = "a timing, not a check: cargo test --test tract_bench -- --ignored --nocapture"]
fn tract_fixed_t_plan_timing() {
    let spec = Spec {
        hidden: 256,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        head_dim: 32,
        inter: 688,
        vocab: 2048,
        ..Spec::default()
    };
    let (_tmp, ck_dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&ck_dir).unwrap();
    let out = tempfile::tempdir().unwrap();
    let fam = FamParams {
        block_len: L,
        fam_len: 8,
        mem_blocks: 2,
    };
    export::export(&ck, fam, out.path(), &ExportOptions::default()).unwrap();
    let block = out.path().join("block.onnx");
    let n: usize = std::env::var("FAMC_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let batch = 1;

    println!(
        "block graph: d=256, 4 layers, L={L}, F=8, M=2, V=2048, batch {batch}; median of {n} \
         rounds, the runners interleaved within each round"
    );
    let mut runners: Vec<(String, Box<dyn GraphRunner>, f64)> = Vec::new();
    for threads in [1usize, 2] {
        for fixed in [&[][..], &[("T", L)], &[("batch", 1), ("T", L)]] {
            let mut opts = RunOptions {
                intra_threads: Some(threads),
                ..RunOptions::default()
            };
            for &(name, size) in fixed {
                opts = opts.with_fixed_dim(name, size);
            }
            let t0 = Instant::now();
            let r = TractRunner::open(&block, &opts).unwrap();
            let open_ms = t0.elapsed().as_secs_f64() * 1e3;
            let plans = if fixed.is_empty() {
                "symbolic only".to_string()
            } else {
                let dims: Vec<String> = fixed.iter().map(|(n, v)| format!("{n}={v}")).collect();
                format!("{} + symbolic", dims.join(","))
            };
            runners.push((format!("tract {threads}t, {plans}"), Box::new(r), open_ms));
        }
    }
    if std::env::var_os("FAMC_BENCH_ORT").is_some() {
        for threads in [1usize, 2] {
            let opts = RunOptions {
                intra_threads: Some(threads),
                ..RunOptions::default()
            };
            let t0 = Instant::now();
            let r = open_graph(BackendKind::Ort, &block, &opts).unwrap();
            let open_ms = t0.elapsed().as_secs_f64() * 1e3;
            runners.push((format!("ort {threads}t"), r, open_ms));
        }
    }
    let specs = runners[0].1.input_specs().to_vec();
    let full = inputs(&specs, batch, L, spec.vocab);
    let tail = inputs(&specs, batch, 17, spec.vocab);
    // (full wall, full cpu, tail wall, tail cpu) of each runner
    let mut times: Vec<[Vec<f64>; 4]> = vec![Default::default(); runners.len()];
    // tract's runners interleaved, then ONNX Runtime's (whose pool threads spin after a run)
    let n_tract = runners
        .iter()
        .filter(|(_, r, _)| r.backend() == BackendKind::Tract)
        .count();
    for group in [0..n_tract, n_tract..runners.len()] {
        for round in 0..n + 3 {
            for i in group.clone() {
                let r = &mut runners[i].1;
                let (fw, fc) = time_run(r.as_mut(), &full);
                let (tw, tc) = time_run(r.as_mut(), &tail);
                if round >= 3 {
                    for (k, v) in [fw, fc, tw, tc].into_iter().enumerate() {
                        times[i][k].push(v);
                    }
                }
            }
        }
    }
    println!(
        "{:<34} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8}",
        "runner", "open", "T=L p10", "median", "cpu", "T=17 p10", "median", "cpu"
    );
    for ((name, _, open_ms), [fw, fc, tw, tc]) in runners.iter().zip(times) {
        println!(
            "{name:<34} {open_ms:>7.0} | {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2}",
            p10(fw.clone()),
            median(fw),
            mean(fc),
            p10(tw.clone()),
            median(tw),
            mean(tc)
        );
    }
    println!(
        "(ms; p10 and median of the wall clock; cpu: mean time of the calling thread on a CPU, \
         which leaves out the pool threads of multithreaded runners)"
    );
    // The dispatch: a full block on the specialised plan, the tail on the symbolic one.
    let opts = RunOptions::default()
        .with_fixed_dim("batch", 1)
        .with_fixed_dim("T", L);
    let mut r = TractRunner::open(&block, &opts).unwrap();
    r.run(full.clone()).unwrap();
    assert_eq!(r.last_plan(), Some(PlanKind::Fixed));
    r.run(tail.clone()).unwrap();
    assert_eq!(r.last_plan(), Some(PlanKind::Symbolic));
}

/// tract's share of a graph's time per operator family, from node names (famc's name scopes
/// survive tract's optimisation as prefixes): the same families as `export/profile_ort.py`.
fn family(node: &str, op: &str) -> &'static str {
    let parts: Vec<&str> = node.split(['.', '/', '#']).collect();
    let has = |p: &str| parts.contains(&p);
    const COPIES: [&str; 12] = [
        "Concat",
        "Slice",
        "AxisOp",
        "Move",
        "Reshape",
        "Gather",
        "Cast",
        "Iff",
        "Tile",
        "Expand",
        "Broadcast",
        "Identity",
    ];
    let copy = COPIES.iter().any(|c| op.contains(c));
    if has("head") {
        "head"
    } else if has("norm") || has("rope") {
        "norm/rotary"
    } else if has("sdpa") {
        "attention"
    } else if parts.first() == Some(&"layers") && has("mlp") {
        "mlp"
    } else if parts.first() == Some(&"layers") && has("attn") {
        if copy {
            "copies"
        } else {
            "projections"
        }
    } else if matches!(parts.first(), Some(&"block" | &"decode" | &"fam" | &"init")) {
        "masks/positions"
    } else if copy {
        "copies"
    } else {
        "other"
    }
}

/// The per-family profile of tract's block graph (one full block at τ = 3) and decode graph (one
/// token in the middle of block 3) of the SmolLM2 checkpoint that `scripts/fetch-smollm2.sh`
/// converts (FAMC_SMOLLM2), exported at the speed issue's configuration (L = 512, F = 64, M = 2)
/// for both targets, on 2 threads: one warm-up, then 3 profiled runs. Release build:
///
/// ```sh
/// FAMC_SMOLLM2=~/.cache/famc/smollm2/hf cargo test --release --test tract_bench -- --ignored tract_profile --nocapture
/// ```
/// SmolLM2 from `FAMC_SMOLLM2` (scripts/fetch-smollm2.sh) at the speed issue's FAM
/// configuration, L = 512, F = 64, M = 2; `None`, with a note, when it is unset.
fn smollm2() -> Option<(Checkpoint, FamParams)> {
    let Some(ckpt) = std::env::var_os("FAMC_SMOLLM2") else {
        eprintln!(
            "note: FAMC_SMOLLM2 unset: run scripts/fetch-smollm2.sh and point it at its output"
        );
        return None;
    };
    let ck = Checkpoint::load(std::path::Path::new(&ckpt)).unwrap();
    let fam = FamParams {
        block_len: 512,
        fam_len: 64,
        mem_blocks: 2,
    };
    Some((ck, fam))
}

#[test]
#[ignore = "a profile, not a check: cargo test --release --test tract_bench -- --ignored tract_profile --nocapture"]
fn tract_profile_by_family() {
    use famc::contract::{IoDim, IoType, Role};
    use std::collections::BTreeMap;
    let Some((ck, fam)) = smollm2() else {
        return;
    };
    let l = fam.block_len;
    let tmp = tempfile::tempdir().unwrap();
    for target in famc::onnx::Target::ALL
        .into_iter()
        .filter(|t| !t.ort_only())
    {
        let dir = tmp.path().join(target.name());
        let opts = ExportOptions {
            target,
            ..ExportOptions::default()
        };
        let m = export::export(&ck, fam, &dir, &opts).unwrap();
        for (graph, file, contract) in [
            ("block", &m.graphs.block, &m.contract.block),
            (
                "decode",
                m.graphs.decode.as_ref().unwrap(),
                &m.contract.decode,
            ),
        ] {
            let run_opts = RunOptions {
                intra_threads: Some(2),
                ..RunOptions::default()
            }
            .with_fixed_dim("batch", 1)
            .with_fixed_dim("T", l);
            let mut r = TractRunner::open(&dir.join(file), &run_opts).unwrap();
            let mut rng = Rng::new(3);
            let input: Vec<Tensor> = contract
                .inputs
                .iter()
                .map(|io| {
                    let shape: Vec<usize> = io
                        .shape
                        .iter()
                        .map(|d| match d {
                            IoDim::Fixed(n) => *n,
                            IoDim::Sym(s) if s == "T" => l,
                            IoDim::Sym(_) => 1,
                        })
                        .collect();
                    match (io.role, io.dtype) {
                        (Role::InputIds, _) => {
                            Tensor::I64(ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                                ((ix[1] * 7919 + 11) % m.model.vocab_size) as i64
                            }))
                        }
                        (Role::BlockIndex, _) => Tensor::I64(ArrayD::from_elem(IxDyn(&shape), 3)),
                        (Role::Position, _) => {
                            Tensor::I64(ArrayD::from_elem(IxDyn(&shape), (3 * l + l / 2) as i64))
                        }
                        (_, IoType::Float32) => {
                            Tensor::F32(ArrayD::from_shape_simple_fn(IxDyn(&shape), || {
                                (rng.uniform() - 0.5) * 0.2
                            }))
                        }
                        (role, IoType::Int64) => panic!("no int64 input of role {role}"),
                    }
                })
                .collect();
            r.run(input.clone()).unwrap();
            r.set_profiling(true);
            let runs = 3;
            for _ in 0..runs {
                r.run(input.clone()).unwrap();
            }
            let times = r.take_profile();
            let total: f64 = times.iter().map(|t| t.seconds).sum();
            let mut by_family: BTreeMap<&str, f64> = BTreeMap::new();
            let mut other_ops: BTreeMap<String, f64> = BTreeMap::new();
            for t in &times {
                let f = family(&t.node, &t.op);
                *by_family.entry(f).or_default() += t.seconds;
                if f == "other" {
                    *other_ops.entry(t.op.clone()).or_default() += t.seconds;
                }
            }
            let shares: BTreeMap<&str, f64> = by_family
                .iter()
                .map(|(f, s)| (*f, (1000.0 * s / total).round() / 10.0))
                .collect();
            let mut other: Vec<_> = other_ops.into_iter().collect();
            other.sort_by(|a, b| b.1.total_cmp(&a.1));
            other.truncate(5);
            println!(
                "{}",
                serde_json::json!({
                    "graph": graph,
                    "target": target.name(),
                    "ms_per_run": (total * 1000.0 / runs as f64 * 10.0).round() / 10.0,
                    "share_pct": shares,
                    "other_top_ops": other.iter().map(|(op, s)| (op.clone(), (s * 1000.0 / runs as f64 * 10.0).round() / 10.0)).collect::<BTreeMap<_, _>>(),
                })
            );
        }
    }
}

/// Two streams of SmolLM2 (`FAMC_SMOLLM2`) scored one after the other on one model, then at once
/// on two threads (each runner single-threaded), on each backend: what runners of their own
/// (`RunnerPool`) give over one lock around the block graph.
///
/// ```text
/// FAMC_SMOLLM2=... cargo test --release --test tract_bench -- --ignored concurrent --nocapture
/// ```
#[test]
#[ignore = "a timing, not a check: cargo test --release --test tract_bench -- --ignored concurrent --nocapture"]
fn concurrent_streams_timing() {
    use famc::session::FamModel;
    let Some((ck, fam)) = smollm2() else {
        return;
    };
    let tokens = 1024;
    let streams: Vec<Vec<u32>> = (0..2)
        .map(|i| Rng::new(40 + i).tokens(tokens, ck.config.vocab_size as u32))
        .collect();
    for backend in backends() {
        let opts = RunOptions {
            intra_threads: Some(1),
            concurrency: Some(2),
            ..RunOptions::default()
        };
        let m = FamModel::compile(&ck, fam, backend, &opts).unwrap();
        m.run(&streams[0]).unwrap();
        for round in 0..3 {
            let t = Instant::now();
            for ids in &streams {
                m.run(ids).unwrap();
            }
            let one_by_one = t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::thread::scope(|s| {
                for ids in &streams {
                    let m = &m;
                    s.spawn(move || m.run(ids).unwrap());
                }
            });
            let at_once = t.elapsed().as_secs_f64();
            let n = (2 * tokens) as f64;
            println!(
                "{backend} round {round}: one after the other {:.0} tok/s, at once {:.0} tok/s ({:.2}x); runners {}",
                n / one_by_one,
                n / at_once,
                one_by_one / at_once,
                m.block_runners().opened()
            );
        }
    }
}
