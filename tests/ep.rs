//! Execution providers (`--ep cpu|cuda|tensorrt`): the plans famc makes (provider options,
//! TensorRT optimisation profiles and engine-cache keys) for the golden export graphs, and the
//! errors for requests that cannot be met. None of it needs a GPU: a CUDA or TensorRT request on
//! this machine must fail clearly, never run on the CPU instead.
//!
//! The cases that run `famc` on ONNX Runtime need a library (ORT_DYLIB_PATH, or found the way
//! `--backend ort` finds it); without one they are skipped with a note, unless
//! `FAMC_REQUIRE_ORT=1` makes that a failure. The library is expected to be a CPU-only build (the
//! `onnxruntime` wheel); with a GPU build those cases are skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use famc::runtime::ep::{
    self, cache_key, decode_trt_version, plan, trt_profile, EpConfig, EpKind, EpPlan, GraphFacts,
    Versions, CUDA_PROVIDER, TENSORRT_PROVIDER,
};
use famc::runtime::{open_graph, BackendKind, Dim, ElemType, IoSpec, RunOptions};
use sha2::{Digest, Sha256};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("graphs/tiny-fam")
        .join(name)
}

fn versions() -> Versions {
    Versions {
        ort: "1.31.1".into(),
        tensorrt: Some("10.13.3".into()),
    }
}

fn trt(max_batch: usize) -> EpConfig {
    EpConfig {
        max_batch,
        ..EpConfig::new(EpKind::TensorRt)
    }
}

/// Parses a TensorRT profile string `name:AxBxC,name:D,…` strictly.
fn parse_shapes(s: &str) -> Vec<(String, Vec<usize>)> {
    assert!(!s.is_empty(), "empty profile string");
    assert!(!s.contains(' '), "spaces in {s:?}");
    s.split(',')
        .map(|item| {
            let (name, dims) = item
                .split_once(':')
                .unwrap_or_else(|| panic!("`{item}` in {s:?} is not name:dims"));
            assert!(!name.is_empty() && !dims.contains(':'), "`{item}` in {s:?}");
            let dims: Vec<usize> = dims
                .split('x')
                .map(|d| {
                    d.parse()
                        .unwrap_or_else(|_| panic!("`{d}` in `{item}` of {s:?} is not a size"))
                })
                .collect();
            (name.to_string(), dims)
        })
        .collect()
}

/// The graph's dynamic inputs (any non-fixed dimension), in input order.
fn dynamic_inputs(facts: &GraphFacts) -> Vec<&IoSpec> {
    facts
        .inputs
        .iter()
        .filter(|s| {
            s.shape
                .as_ref()
                .unwrap()
                .iter()
                .any(|d| !matches!(d, Dim::Fixed(_)))
        })
        .collect()
}

fn option<'a>(plan: &'a EpPlan, kind: EpKind, key: &str) -> Option<&'a str> {
    plan.provider(kind).unwrap().option(key)
}

/// Checks a TensorRT plan's profile strings against the graph: every dynamic input named once,
/// in input order, with its full rank; fixed dimensions as declared; min ≤ opt ≤ max; `batch`
/// over 1 ..= max_batch (opt 1) and `T` over 1 ..= L (opt L).
fn check_profile(plan: &EpPlan, facts: &GraphFacts, max_batch: usize) {
    let get = |key: &str| option(plan, EpKind::TensorRt, key).unwrap().to_string();
    let (min, opt, max) = (
        parse_shapes(&get("trt_profile_min_shapes")),
        parse_shapes(&get("trt_profile_opt_shapes")),
        parse_shapes(&get("trt_profile_max_shapes")),
    );
    let profile = plan.profile.as_ref().unwrap();
    assert_eq!(get("trt_profile_min_shapes"), profile.min_shapes());
    assert_eq!(get("trt_profile_max_shapes"), profile.max_shapes());
    let dynamic = dynamic_inputs(facts);
    assert!(!dynamic.is_empty());
    for list in [&min, &opt, &max] {
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<&str> = dynamic.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, want, "profile inputs");
    }
    let l = facts.block_len.unwrap();
    for (i, spec) in dynamic.iter().enumerate() {
        let dims = spec.shape.as_ref().unwrap();
        let (lo, mid, hi) = (&min[i].1, &opt[i].1, &max[i].1);
        assert_eq!(lo.len(), dims.len(), "rank of `{}`", spec.name);
        assert_eq!(mid.len(), dims.len());
        assert_eq!(hi.len(), dims.len());
        for (axis, d) in dims.iter().enumerate() {
            assert!(
                lo[axis] <= mid[axis] && mid[axis] <= hi[axis] && lo[axis] >= 1,
                "`{}` axis {axis}: {} {} {}",
                spec.name,
                lo[axis],
                mid[axis],
                hi[axis]
            );
            let want = match d {
                Dim::Fixed(n) => (*n, *n, *n),
                Dim::Named(s) if s == "batch" => (1, 1, max_batch),
                Dim::Named(s) if s == "T" => (1, l, l),
                other => panic!("unexpected dimension {other}"),
            };
            assert_eq!(
                (lo[axis], mid[axis], hi[axis]),
                want,
                "`{}` axis {axis}",
                spec.name
            );
        }
    }
}

#[test]
fn golden_graph_facts() {
    let block = GraphFacts::read(&golden("block.onnx")).unwrap();
    assert_eq!(block.file_name, "block.onnx");
    assert_eq!(block.block_len, Some(16));
    let bytes = std::fs::read(golden("block.onnx")).unwrap();
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(block.sha256, sha, "the .onnx bytes' sha256");
    let names: Vec<&str> = block.inputs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "input_ids",
            "block_index",
            "fam.0",
            "mem_k.0",
            "mem_v.0",
            "fam.1",
            "mem_k.1",
            "mem_v.1"
        ]
    );
    assert_eq!(block.inputs[0].elem_type, ElemType::I64);
    assert_eq!(
        block.inputs[0].shape,
        Some(vec![Dim::Named("batch".into()), Dim::Named("T".into())])
    );
    // the same inputs as tract sees them
    let runner = open_graph(
        BackendKind::Tract,
        &golden("block.onnx"),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(runner.input_specs(), block.inputs.as_slice());
}

#[test]
fn cpu_plan_registers_nothing() {
    let facts = GraphFacts::read(&golden("block.onnx")).unwrap();
    let p = plan(&EpConfig::cpu(), &facts, &versions()).unwrap();
    assert_eq!(p.kind, EpKind::Cpu);
    assert!(p.providers.is_empty() && p.profile.is_none() && p.cache_dir.is_none());
    assert!(p.limits.is_empty());
    assert_eq!(RunOptions::default().ep, EpConfig::cpu(), "default: cpu");
}

#[test]
fn cuda_plan_options() {
    let facts = GraphFacts::read(&golden("block.onnx")).unwrap();
    let p = plan(&EpConfig::new(EpKind::Cuda), &facts, &versions()).unwrap();
    assert_eq!(p.providers.len(), 1);
    assert_eq!(p.providers[0].name, CUDA_PROVIDER);
    assert_eq!(
        p.providers[0].options,
        vec![("device_id".to_string(), "0".to_string())]
    );
    assert!(p.profile.is_none() && p.cache_dir.is_none() && p.limits.is_empty());
    let cfg = EpConfig {
        device_id: Some(3),
        ..EpConfig::new(EpKind::Cuda)
    };
    let p = plan(&cfg, &facts, &versions()).unwrap();
    assert_eq!(option(&p, EpKind::Cuda, "device_id"), Some("3"));
    assert!(p
        .to_string()
        .contains("CUDAExecutionProvider [device_id=3]"));
}

#[test]
fn tensorrt_plan_for_the_block_graph() {
    let facts = GraphFacts::read(&golden("block.onnx")).unwrap();
    let cfg = EpConfig {
        device_id: Some(1),
        trt_fp16: true,
        ..trt(4)
    };
    let p = plan(&cfg, &facts, &versions()).unwrap();
    let names: Vec<&str> = p.providers.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [TENSORRT_PROVIDER, CUDA_PROVIDER],
        "TensorRT, then CUDA"
    );
    let keys: Vec<&str> = p.providers[0]
        .options
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "device_id",
            "trt_fp16_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_profile_min_shapes",
            "trt_profile_opt_shapes",
            "trt_profile_max_shapes"
        ],
        "no cache options without --trt-cache-dir"
    );
    assert_eq!(option(&p, EpKind::TensorRt, "device_id"), Some("1"));
    assert_eq!(option(&p, EpKind::Cuda, "device_id"), Some("1"));
    assert_eq!(option(&p, EpKind::TensorRt, "trt_fp16_enable"), Some("1"));
    assert_eq!(
        option(&p, EpKind::TensorRt, "trt_layer_norm_fp32_fallback"),
        Some("1")
    );
    assert_eq!(option(&p, EpKind::TensorRt, "trt_bf16_enable"), None);
    let p32 = plan(&trt(4), &facts, &versions()).unwrap();
    let keys32: Vec<&str> = p32.providers[0]
        .options
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !k.starts_with("trt_profile_"))
        .collect();
    assert_eq!(keys32, ["device_id"], "float32: TensorRT's defaults");
    assert!(p.cache_dir.is_none());
    check_profile(&p, &facts, 4);
    // the exact strings for the tiny model (L = 16, F = 4, d = 32, Hkv = 2, M·L = 32, Dh = 8)
    let mut min = "input_ids:1x1,block_index:1".to_string();
    let mut opt = "input_ids:1x16,block_index:1".to_string();
    let mut max = "input_ids:4x16,block_index:4".to_string();
    for l in 0..2 {
        for (s, b) in [(&mut min, 1), (&mut opt, 1), (&mut max, 4)] {
            s.push_str(&format!(
                ",fam.{l}:{b}x4x32,mem_k.{l}:{b}x2x32x8,mem_v.{l}:{b}x2x32x8"
            ));
        }
    }
    assert_eq!(
        option(&p, EpKind::TensorRt, "trt_profile_min_shapes"),
        Some(min.as_str())
    );
    assert_eq!(
        option(&p, EpKind::TensorRt, "trt_profile_opt_shapes"),
        Some(opt.as_str())
    );
    assert_eq!(
        option(&p, EpKind::TensorRt, "trt_profile_max_shapes"),
        Some(max.as_str())
    );
    let limits: Vec<(&str, usize)> = p
        .limits
        .iter()
        .map(|l| (l.symbol.as_str(), l.max))
        .collect();
    assert_eq!(limits, [("batch", 4), ("T", 16)]);
}

#[test]
fn tensorrt_plan_for_the_decode_and_fam_kv_graphs() {
    let facts = GraphFacts::read(&golden("decode.onnx")).unwrap();
    let p = plan(&trt(2), &facts, &versions()).unwrap();
    check_profile(&p, &facts, 2);
    let min = parse_shapes(option(&p, EpKind::TensorRt, "trt_profile_min_shapes").unwrap());
    let max = parse_shapes(option(&p, EpKind::TensorRt, "trt_profile_max_shapes").unwrap());
    assert_eq!(min[0], ("input_ids".to_string(), vec![1, 1]), "T fixed 1");
    assert_eq!(max[0], ("input_ids".to_string(), vec![2, 1]));
    assert_eq!(max[1], ("position".to_string(), vec![2]));
    assert!(
        max.contains(&("cache_k.1".to_string(), vec![2, 2, 16, 8])),
        "{max:?}"
    );
    assert!(max.contains(&("fam_v.0".to_string(), vec![2, 2, 4, 8])));
    assert_eq!(max.len(), 14, "every decode input is dynamic (batch)");
    let limits: Vec<&str> = p.limits.iter().map(|l| l.symbol.as_str()).collect();
    assert_eq!(limits, ["batch"], "no T in the decode graph");

    let facts = GraphFacts::read(&golden("fam_kv.onnx")).unwrap();
    let p = plan(&trt(1), &facts, &versions()).unwrap();
    check_profile(&p, &facts, 1);
    assert_eq!(
        option(&p, EpKind::TensorRt, "trt_profile_max_shapes"),
        Some("block_index:1,fam.0:1x4x32,fam.1:1x4x32")
    );
}

#[test]
fn tensorrt_plan_for_a_graph_without_inputs_has_no_profile() {
    let facts = GraphFacts::read(&golden("init.onnx")).unwrap();
    assert!(facts.inputs.is_empty());
    let p = plan(&trt(1), &facts, &versions()).unwrap();
    assert!(p.profile.is_none() && p.limits.is_empty());
    assert!(option(&p, EpKind::TensorRt, "trt_profile_min_shapes").is_none());
}

#[test]
fn tensorrt_cache_dir_is_keyed_by_graph_bytes_versions_precision_and_batch() {
    let root = tempfile::tempdir().unwrap();
    let cfg = EpConfig {
        trt_cache_dir: Some(root.path().to_path_buf()),
        trt_bf16: true,
        ..trt(1)
    };
    let block = GraphFacts::read(&golden("block.onnx")).unwrap();
    let p = plan(&cfg, &block, &versions()).unwrap();
    let dir = p.cache_dir.clone().unwrap();
    assert_eq!(
        dir,
        root.path().join(format!(
            "block-{}-ort1.31.1-trt10.13.3-bf16-b1",
            &block.sha256[..16]
        ))
    );
    assert!(!dir.exists(), "planning creates nothing");
    let dir_s = dir.to_string_lossy().into_owned();
    for (k, v) in [
        ("trt_engine_cache_enable", "1"),
        ("trt_engine_cache_path", dir_s.as_str()),
        ("trt_timing_cache_enable", "1"),
        ("trt_timing_cache_path", dir_s.as_str()),
        ("trt_bf16_enable", "1"),
    ] {
        assert_eq!(option(&p, EpKind::TensorRt, k), Some(v), "{k}");
    }
    assert_eq!(option(&p, EpKind::TensorRt, "trt_fp16_enable"), None);
    let key = |cfg: &EpConfig, facts: &GraphFacts, v: &Versions| cache_key(cfg, facts, v);
    let base = key(&cfg, &block, &versions());
    // another graph, other versions, precision or batch: another directory
    let decode = GraphFacts::read(&golden("decode.onnx")).unwrap();
    let mut others = vec![key(&cfg, &decode, &versions())];
    others.push(key(
        &cfg,
        &block,
        &Versions {
            ort: "1.32.0".into(),
            ..versions()
        },
    ));
    others.push(key(
        &cfg,
        &block,
        &Versions {
            tensorrt: Some("10.14.1".into()),
            ..versions()
        },
    ));
    others.push(key(
        &cfg,
        &block,
        &Versions {
            tensorrt: None,
            ..versions()
        },
    ));
    others.push(key(
        &EpConfig {
            trt_bf16: false,
            ..cfg.clone()
        },
        &block,
        &versions(),
    ));
    others.push(key(
        &EpConfig {
            max_batch: 8,
            ..cfg.clone()
        },
        &block,
        &versions(),
    ));
    for o in &others {
        assert_ne!(o, &base);
    }
    assert!(others[3].contains("-trtunknown-"), "{}", others[3]);
    // the same bytes elsewhere (a compiled checkpoint's temporary export): the same directory
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(golden("block.onnx"), copy.path().join("block.onnx")).unwrap();
    let moved = GraphFacts::read(&copy.path().join("block.onnx")).unwrap();
    assert_eq!(moved.block_len, Some(16), "from the graph's metadata");
    assert_eq!(key(&cfg, &moved, &versions()), base);
    // other weights: the graph bytes differ (the checkpoint hash is in its metadata)
    let bswa = Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tiny-bswa/block.onnx");
    let bswa = GraphFacts::read(&bswa).unwrap();
    assert_ne!(bswa.sha256, block.sha256);
}

#[test]
fn impossible_plans_are_errors() {
    let facts = GraphFacts::read(&golden("block.onnx")).unwrap();
    let err = |cfg: EpConfig| plan(&cfg, &facts, &versions()).unwrap_err().to_string();
    let e = err(EpConfig {
        trt_fp16: true,
        ..EpConfig::new(EpKind::Cuda)
    });
    assert!(
        e.contains("--trt-fp16") && e.contains("--ep tensorrt"),
        "{e}"
    );
    let e = err(EpConfig {
        trt_cache_dir: Some("/tmp/x".into()),
        trt_bf16: true,
        ..EpConfig::cpu()
    });
    assert!(
        e.contains("--trt-bf16") && e.contains("--trt-cache-dir"),
        "{e}"
    );
    let e = err(EpConfig {
        device_id: Some(0),
        ..EpConfig::cpu()
    });
    assert!(e.contains("--device-id") && e.contains("--ep cuda"), "{e}");
    let e = err(trt(0));
    assert!(e.contains("--max-batch"), "{e}");

    // a graph with `T` but no block length, and one with a dynamic dimension famc has no range for
    let mut no_l = facts.clone();
    no_l.block_len = None;
    let e = plan(&trt(1), &no_l, &versions()).unwrap_err().to_string();
    assert!(e.contains("`T`") && e.contains("block length"), "{e}");
    let mut odd = facts.clone();
    odd.inputs[2].shape = Some(vec![Dim::Named("batch".into()), Dim::Any, Dim::Fixed(32)]);
    let e = trt_profile(&odd, 1).unwrap_err().to_string();
    assert!(e.contains("fam.0") && e.contains("dimension 1"), "{e}");
}

#[test]
fn ep_names_and_versions() {
    for (s, k) in [
        ("cpu", EpKind::Cpu),
        ("CUDA", EpKind::Cuda),
        ("tensorrt", EpKind::TensorRt),
        ("trt", EpKind::TensorRt),
    ] {
        assert_eq!(s.parse::<EpKind>().unwrap(), k);
    }
    assert!("rocm".parse::<EpKind>().is_err());
    assert_eq!(EpKind::TensorRt.provider_name(), TENSORRT_PROVIDER);
    assert_eq!(decode_trt_version(101303), "10.13.3");
    assert_eq!(decode_trt_version(110400), "11.4.0");
    assert_eq!(decode_trt_version(8601), "8.6.1");
}

#[test]
fn ep_config_as_command_line_flags() {
    assert!(EpConfig::cpu().cli_args().is_empty());
    let cfg = EpConfig {
        device_id: Some(2),
        trt_fp16: true,
        trt_cache_dir: Some("/tmp/c".into()),
        max_batch: 8,
        ..EpConfig::new(EpKind::TensorRt)
    };
    assert_eq!(
        cfg.cli_args(),
        [
            "--ep",
            "tensorrt",
            "--device-id",
            "2",
            "--trt-fp16",
            "--trt-cache-dir",
            "/tmp/c",
            "--max-batch",
            "8"
        ]
    );
}

#[test]
fn missing_cargo_features_are_named_with_the_fix() {
    let cuda = ep::require_features(EpKind::Cuda);
    let trt = ep::require_features(EpKind::TensorRt);
    assert!(ep::require_features(EpKind::Cpu).is_ok());
    if cfg!(feature = "cuda") {
        assert!(cuda.is_ok());
    } else {
        let e = cuda.unwrap_err().to_string();
        assert!(
            e.contains("`cuda`") && e.contains("cargo build --release --features cuda"),
            "{e}"
        );
    }
    if cfg!(all(feature = "cuda", feature = "tensorrt")) {
        assert!(trt.is_ok());
    } else {
        let e = trt.unwrap_err().to_string();
        assert!(e.contains("--features cuda,tensorrt"), "{e}");
    }
}

#[test]
fn tract_refuses_gpu_providers() {
    let opts = RunOptions {
        ep: EpConfig::new(EpKind::Cuda),
        ..RunOptions::default()
    };
    let e = open_graph(BackendKind::Tract, &golden("block.onnx"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--ep cuda") && e.contains("--backend ort"),
        "{e}"
    );
    let opts = RunOptions {
        ep: EpConfig {
            trt_fp16: true,
            ..EpConfig::cpu()
        },
        ..RunOptions::default()
    };
    let e = open_graph(BackendKind::Tract, &golden("block.onnx"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--trt-fp16"), "{e}");
}

// ------------------------------------------------------------------------------------------
// Through the binary and a real (CPU-only) ONNX Runtime
// ------------------------------------------------------------------------------------------

fn famc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_famc"))
        .args(args)
        .output()
        .unwrap()
}

fn failure(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected a failure; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// A CPU-only ONNX Runtime, or `None` (with a note) when there is none (and none is required)
/// or the library has a GPU provider.
fn cpu_only_library(test: &str) -> Option<PathBuf> {
    let lib = match famc::runtime::ort::find_ort_library() {
        Ok(lib) => lib,
        Err(e) => {
            if std::env::var_os("FAMC_REQUIRE_ORT").is_some_and(|v| !v.is_empty() && v != "0") {
                panic!("{test}: ONNX Runtime required (FAMC_REQUIRE_ORT) but unavailable: {e}");
            }
            eprintln!("note: skipping {test}: no ONNX Runtime library: {e}");
            return None;
        }
    };
    let providers = famc::runtime::ort::available_providers().unwrap();
    if providers
        .iter()
        .any(|p| p == CUDA_PROVIDER || p == TENSORRT_PROVIDER)
    {
        eprintln!(
            "note: skipping {test}: {} has GPU providers",
            lib.path.display()
        );
        return None;
    }
    Some(lib.path)
}

fn run_args<'a>(tokens: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "graphs/tiny-fam",
        "--tokens",
        tokens,
        "--logits-out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn famc_run_with_tract_and_a_gpu_provider_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    let tokens = golden("ids.txt");
    let (t, o) = (tokens.to_str().unwrap(), out.to_str().unwrap());
    let cwd_args = run_args(t, o, &["--backend", "tract", "--ep", "cuda"]);
    let o1 = Command::new(env!("CARGO_BIN_EXE_famc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(&cwd_args)
        .output()
        .unwrap();
    let e = failure(&o1);
    assert!(e.contains("--ep cuda needs --backend ort"), "{e}");
    assert!(!out.exists());
    let e = failure(&famc(&[
        "run",
        golden("").to_str().unwrap(),
        "--tokens",
        t,
        "--logits-out",
        o,
        "--trt-fp16",
    ]));
    assert!(
        e.contains("--trt-fp16") && e.contains("--ep tensorrt"),
        "{e}"
    );
}

#[test]
fn famc_run_ort_cuda_fails_clearly_without_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    let tokens = golden("ids.txt");
    let model = golden("");
    let (t, o, m) = (
        tokens.to_str().unwrap(),
        out.to_str().unwrap(),
        model.to_str().unwrap(),
    );
    for ep in ["cuda", "tensorrt"] {
        let args = [
            "run",
            m,
            "--tokens",
            t,
            "--logits-out",
            o,
            "--backend",
            "ort",
            "--ep",
            ep,
        ];
        let kind: EpKind = ep.parse().unwrap();
        if !ep::compiled_with(kind) {
            // built without the feature: said before any library is looked for
            let e = failure(&famc(&args));
            assert!(e.contains("built without"), "{e}");
            assert!(
                e.contains(&format!(
                    "cargo build --release --features {}",
                    kind.required_features().join(",")
                )),
                "{e}"
            );
            assert!(!out.exists());
            continue;
        }
        let Some(lib) = cpu_only_library("famc_run_ort_cuda_fails_clearly_without_a_gpu") else {
            return;
        };
        let o2 = Command::new(env!("CARGO_BIN_EXE_famc"))
            .args(args)
            .env("ORT_DYLIB_PATH", &lib)
            .output()
            .unwrap();
        let e = failure(&o2);
        assert!(
            e.contains(&format!("--ep {ep}"))
                && e.contains("does not offer")
                && e.contains(kind.required_providers()[0])
                && e.contains("does not fall back"),
            "{e}"
        );
        assert!(e.contains("onnxruntime-gpu==1.31.1"), "{e}");
        assert!(!out.exists());
    }
}

/// With the `cuda` feature, registering CUDA on a CPU-only ONNX Runtime (skipping famc's own
/// check of the library's providers) is ONNX Runtime's error, passed on: no CPU fallback.
#[cfg(feature = "cuda")]
#[test]
fn registering_cuda_on_a_cpu_only_library_is_an_error() {
    let Some(_) = cpu_only_library("registering_cuda_on_a_cpu_only_library_is_an_error") else {
        return;
    };
    let e = famc::runtime::ort::try_register(EpKind::Cuda, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot register CUDAExecutionProvider") && e.contains("does not fall back"),
        "{e}"
    );
    let e = famc::runtime::ort::try_register(EpKind::Cuda, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not offer CUDAExecutionProvider"), "{e}");
}

#[test]
fn doctor_reports_gpu_providers_and_features() {
    let Some(lib) = cpu_only_library("doctor_reports_gpu_providers_and_features") else {
        return;
    };
    let o = Command::new(env!("CARGO_BIN_EXE_famc"))
        .args(["doctor", "--json"])
        .env("ORT_DYLIB_PATH", &lib)
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let gpu = v["ort"]["gpu_providers"].as_array().unwrap();
    let eps: Vec<&str> = gpu.iter().map(|g| g["ep"].as_str().unwrap()).collect();
    assert_eq!(eps, ["cuda", "tensorrt"]);
    for g in gpu {
        let kind: EpKind = g["ep"].as_str().unwrap().parse().unwrap();
        assert_eq!(g["in_library"], false, "a CPU-only library");
        assert_eq!(g["compiled"], ep::compiled_with(kind));
        assert!(g["registers"].is_null());
        let problem = g["problem"].as_str().unwrap();
        assert!(problem.contains("onnxruntime-gpu"), "{problem}");
    }
    assert_eq!(
        gpu[1]["providers"],
        serde_json::json!([TENSORRT_PROVIDER, CUDA_PROVIDER])
    );
    let o = Command::new(env!("CARGO_BIN_EXE_famc"))
        .arg("doctor")
        .env("ORT_DYLIB_PATH", &lib)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("--ep cuda"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("CUDAExecutionProvider"), "{line}");
    assert!(line.contains("in the library: no"), "{line}");
    assert!(
        line.contains(&format!(
            "famc built with `cuda`: {}",
            if cfg!(feature = "cuda") { "yes" } else { "no" }
        )),
        "{line}"
    );
    assert!(text.contains("--ep tensorrt"), "{text}");
}
