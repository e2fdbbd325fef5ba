//! The runtime backends (tract, ONNX Runtime) against golden cases made by
//! `tests/data/onnx/make.py`, whose expected outputs numpy computed.
//!
//! The ONNX Runtime tests are skipped, with a note, only when no ONNX Runtime library can be
//! found; set `FAMC_REQUIRE_ORT=1` to make that a failure instead.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use famc::runtime::ort::{
    check_ort_version, find_ort_library, find_ort_library_with, init_ort, probe_ort_library,
};
use famc::runtime::tract::{PlanKind, TractRunner};
use famc::runtime::{open_graph, BackendKind, GraphRunner, OrtOptLevel, RunOptions, Tensor};
use famc::Error;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

const TOL: f32 = 1e-5;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/onnx")
        .join(name)
}

fn model(name: &str) -> PathBuf {
    case_dir(name).join("model.onnx")
}

struct Run {
    inputs: Vec<(String, Tensor)>,
    outputs: Vec<(String, ArrayD<f32>)>,
}

fn shape_of(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn f32_array(v: &Value) -> ArrayD<f32> {
    let data: Vec<f32> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape_of(v)), data).unwrap()
}

fn tensor(v: &Value) -> Tensor {
    match v["dtype"].as_str().unwrap() {
        "f32" => Tensor::F32(f32_array(v)),
        "i64" => {
            let data: Vec<i64> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&shape_of(v)), data).unwrap())
        }
        other => panic!("unknown dtype {other}"),
    }
}

fn load_runs(case: &str) -> Vec<Run> {
    let path = case_dir(case).join("io.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let io: Value = serde_json::from_str(&text).unwrap();
    io["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Run {
            inputs: r["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["name"].as_str().unwrap().to_string(), tensor(t)))
                .collect(),
            outputs: r["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["name"].as_str().unwrap().to_string(), f32_array(t)))
                .collect(),
        })
        .collect()
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let worst = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= TOL, "{what}: max abs error {worst} > {TOL}");
}

/// Runs every golden run of `case` through one runner (so batch and T change within a session).
fn check_case(runner: &mut dyn GraphRunner, case: &str) {
    let runs = load_runs(case);
    let want_inputs: Vec<&str> = runs[0].inputs.iter().map(|(n, _)| n.as_str()).collect();
    let want_outputs: Vec<&str> = runs[0].outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        runner.input_names(),
        want_inputs.as_slice(),
        "{case}: input names"
    );
    assert_eq!(
        runner.output_names(),
        want_outputs.as_slice(),
        "{case}: output names"
    );
    assert_eq!(runner.input_specs().len(), want_inputs.len());
    for (i, run) in runs.iter().enumerate() {
        let inputs = run.inputs.iter().map(|(_, t)| t.clone()).collect();
        let outputs = runner
            .run(inputs)
            .unwrap_or_else(|e| panic!("{case} run {i} ({}): {e}", runner.backend()));
        assert_eq!(outputs.len(), run.outputs.len());
        for ((name, want), got) in run.outputs.iter().zip(&outputs) {
            assert_close(
                &format!("{} {case} run {i} `{name}`", runner.backend()),
                got,
                want,
            );
        }
    }
}

/// Whether ONNX Runtime is usable; prints why not (and fails under FAMC_REQUIRE_ORT=1).
fn ort_available(test: &str) -> bool {
    match init_ort() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("FAMC_REQUIRE_ORT").is_some_and(|v| !v.is_empty() && v != "0") {
                panic!("{test}: ONNX Runtime required (FAMC_REQUIRE_ORT) but unavailable: {e}");
            }
            eprintln!("note: skipping {test}: no ONNX Runtime library: {e}");
            false
        }
    }
}

fn backend_message(e: Error, backend: &str) -> String {
    match &e {
        Error::Backend {
            backend: b,
            message,
        } => {
            assert_eq!(*b, backend, "wrong backend in {e}");
            message.clone()
        }
        other => panic!("expected a {backend} backend error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// tract
// ------------------------------------------------------------------------------------------------

#[test]
fn tract_tiny_mlp_matches_numpy_across_batch_and_t() {
    let mut r = open_graph(
        BackendKind::Tract,
        &model("tiny_mlp"),
        &RunOptions::default(),
    )
    .unwrap();
    check_case(r.as_mut(), "tiny_mlp");
    // Once more, the same runner, after every other size: nothing sticks from run to run.
    check_case(r.as_mut(), "tiny_mlp");
}

#[test]
fn tract_external_data() {
    let mut r = open_graph(
        BackendKind::Tract,
        &model("ext_data"),
        &RunOptions::default(),
    )
    .unwrap();
    check_case(r.as_mut(), "ext_data");
}

#[test]
fn tract_graph_without_inputs() {
    let mut r = open_graph(
        BackendKind::Tract,
        &model("no_inputs"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(r.input_names().is_empty());
    check_case(r.as_mut(), "no_inputs");
}

/// tiny_mlp's runs have T = 3, 5, 1, 7: with `T = 3` fixed, the first run goes to the
/// specialised plan and the others to the symbolic one, all matching numpy.
#[test]
fn tract_fixed_dims_dispatch_by_input_shape() {
    let opts = RunOptions::default().with_fixed_dim("T", 3);
    let mut r = TractRunner::open(&model("tiny_mlp"), &opts).unwrap();
    assert_eq!(r.fixed_dims(), vec![("T".to_string(), 3)]);
    assert_eq!(r.last_plan(), None);
    let runs = load_runs("tiny_mlp");
    for _ in 0..2 {
        for (i, run) in runs.iter().enumerate() {
            let inputs: Vec<Tensor> = run.inputs.iter().map(|(_, t)| t.clone()).collect();
            let t = inputs[0].shape()[1];
            let got = r.run(inputs).unwrap();
            let want = if t == 3 {
                PlanKind::Fixed
            } else {
                PlanKind::Symbolic
            };
            assert_eq!(r.last_plan(), Some(want), "run {i} (T = {t})");
            for ((name, want), got) in run.outputs.iter().zip(&got) {
                assert_close(&format!("fixed T=3, run {i} `{name}`"), got, want);
            }
        }
    }
    // Both symbols fixed: batch 2 and T 3 together, else symbolic.
    let opts = opts.with_fixed_dim("batch", 2);
    let mut r = TractRunner::open(&model("tiny_mlp"), &opts).unwrap();
    assert_eq!(r.fixed_dims().len(), 2);
    let mut run_once = |batch: usize, t: usize| {
        let ids = Tensor::I64(ArrayD::zeros(IxDyn(&[batch, t])));
        let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[batch, t, 4]), 0.5));
        r.run(vec![ids, x]).unwrap();
        r.last_plan().unwrap()
    };
    assert_eq!(run_once(2, 3), PlanKind::Fixed);
    assert_eq!(run_once(1, 3), PlanKind::Symbolic);
    assert_eq!(run_once(2, 4), PlanKind::Symbolic);
    assert_eq!(run_once(2, 3), PlanKind::Fixed);
}

/// A tied head: the embedding feeds the Gather and, transposed, the head's one-row product.
/// tract packs a constant into the plan only when it has one consumer, so the runner gives the
/// head a consumer of its own; its product must then read no packing done at run time, and its
/// logits must still be the embedding's own rows against the input (computed here by hand).
#[test]
fn tract_tied_head_packs_its_weights_once() {
    use famc::builder::{save_model, Attr, DType, Dim, GraphBuilder, TensorData};
    // 5.2 MB: above the 4 MiB up to which tract folds a shared constant's packing anyway
    let (vocab, d) = (4096usize, 320usize);
    let e: Vec<f32> = (0..vocab * d)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let mut b = GraphBuilder::new("tied", famc::onnx::DEFAULT_OPSET);
    let ids = b.input(
        "ids",
        DType::I64,
        vec![Dim::Sym("batch".into()), Dim::Fixed(1)],
    );
    let w = b
        .weight("embed", TensorData::from_f32(&e, &[vocab as i64, d as i64]))
        .unwrap();
    let x = b.op(
        "Gather",
        &[&w, &ids],
        vec![Attr::int("axis", 0)],
        DType::F32,
    );
    let h = b.mul(&x, &x);
    let rows = b.reshape(&h, &[-1, d as i64]);
    let logits = b.op(
        "Gemm",
        &[&rows, &w],
        vec![Attr::int("transB", 1)],
        DType::F32,
    );
    b.output(&logits, "logits");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tied.onnx");
    save_model(b.finish().unwrap(), &path, None).unwrap();

    let opts = RunOptions::default().with_fixed_dim("batch", 1);
    let mut r = TractRunner::open(&path, &opts).unwrap();
    let id = 37usize;
    r.set_profiling(true);
    let got = r
        .run(vec![Tensor::I64(ArrayD::from_elem(
            IxDyn(&[1, 1]),
            id as i64,
        ))])
        .unwrap();
    assert_eq!(r.last_plan(), Some(PlanKind::Fixed));
    let packed_per_run: Vec<String> = r
        .take_profile()
        .into_iter()
        .filter(|t| t.op == "OptMatMulPack" && t.node.ends_with("pack_a"))
        .map(|t| t.node)
        .collect();
    assert!(
        packed_per_run.is_empty(),
        "the head packs its weights on every run: {packed_per_run:?}"
    );
    let want = ArrayD::from_shape_fn(IxDyn(&[1, vocab]), |ix| {
        (0..d)
            .map(|k| e[id * d + k] * e[id * d + k] * e[ix[1] * d + k])
            .sum::<f32>()
    });
    assert_close("tied head logits", &got[0], &want);
}

#[test]
fn tract_fixed_dims_absent_from_the_graph_are_ignored() {
    let opts = RunOptions::default().with_fixed_dim("T", 16);
    let mut r = TractRunner::open(&model("no_inputs"), &opts).unwrap();
    assert!(r.fixed_dims().is_empty());
    check_case(&mut r, "no_inputs");
    assert_eq!(r.last_plan(), Some(PlanKind::Symbolic));
    let r = TractRunner::open(
        &model("ext_data"),
        &RunOptions::default().with_fixed_dim("no_such_symbol", 2),
    )
    .unwrap();
    assert!(r.fixed_dims().is_empty());
    // and ONNX Runtime ignores them
    if ort_available("tract_fixed_dims_absent_from_the_graph_are_ignored") {
        let mut r = open_graph(BackendKind::Ort, &model("tiny_mlp"), &opts).unwrap();
        check_case(r.as_mut(), "tiny_mlp");
    }
}

#[test]
fn tract_fixed_dim_of_zero_is_refused() {
    let opts = RunOptions::default().with_fixed_dim("T", 0);
    let err = TractRunner::open(&model("tiny_mlp"), &opts).unwrap_err();
    assert!(err.to_string().contains("`T` = 0"), "{err}");
}

#[test]
fn tract_multithreaded_matches_numpy() {
    for threads in [1, 2, 3] {
        let opts = RunOptions {
            intra_threads: Some(threads),
            ..RunOptions::default()
        }
        .with_fixed_dim("T", 5);
        let mut r = TractRunner::open(&model("tiny_mlp"), &opts).unwrap();
        assert_eq!(r.threads(), threads);
        check_case(&mut r, "tiny_mlp");
        let mut r = TractRunner::open(&model("ext_data"), &opts).unwrap();
        check_case(&mut r, "ext_data");
    }
}

/// The FAM block graph of the golden tiny-fam export (L = 16), planned symbolically, for T = L
/// and for batch = 2 and T = L, on one and two threads: full blocks and a tail block give the
/// same outputs on every runner, and each run goes to the plan its T calls for.
#[test]
fn tract_block_graph_fixed_t_matches_symbolic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tiny-fam");
    let manifest = famc::export::Manifest::read(&dir).unwrap();
    let l = manifest.fam.block_len;
    let vocab = manifest.model.vocab_size as i64;
    let block = dir.join("block.onnx");
    let mut runners: Vec<(String, TractRunner)> = Vec::new();
    for threads in [1, 2] {
        let base = RunOptions {
            intra_threads: Some(threads),
            ..RunOptions::default()
        };
        runners.push((
            format!("symbolic, {threads} thread(s)"),
            TractRunner::open(&block, &base).unwrap(),
        ));
        runners.push((
            format!("T = {l}, {threads} thread(s)"),
            TractRunner::open(&block, &base.clone().with_fixed_dim("T", l)).unwrap(),
        ));
        runners.push((
            format!("batch = 2, T = {l}, {threads} thread(s)"),
            TractRunner::open(
                &block,
                &base
                    .clone()
                    .with_fixed_dim("batch", 2)
                    .with_fixed_dim("T", l),
            )
            .unwrap(),
        ));
    }
    let specs = runners[0].1.input_specs().to_vec();
    let batch = 2;
    let inputs = |t: usize| -> Vec<Tensor> {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5
        };
        let mut v = vec![
            Tensor::I64(ArrayD::from_shape_fn(IxDyn(&[batch, t]), |ix| {
                ((ix[0] * 31 + ix[1] * 7) as i64) % vocab
            })),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch]), vec![0, 3]).unwrap()),
        ];
        for spec in &specs[2..] {
            let shape: Vec<usize> = spec
                .shape
                .as_ref()
                .unwrap()
                .iter()
                .map(|d| match d {
                    famc::runtime::Dim::Fixed(n) => *n,
                    _ => batch,
                })
                .collect();
            v.push(Tensor::F32(ArrayD::from_shape_simple_fn(
                IxDyn(&shape),
                &mut next,
            )));
        }
        v
    };
    for t in [l, 5, l, 1] {
        let mut reference: Option<Vec<ArrayD<f32>>> = None;
        for (what, r) in &mut runners {
            let got = r.run(inputs(t)).unwrap();
            let fixed = !r.fixed_dims().is_empty() && t == l;
            assert_eq!(
                r.last_plan(),
                Some(if fixed {
                    PlanKind::Fixed
                } else {
                    PlanKind::Symbolic
                }),
                "{what}, T = {t}"
            );
            match &reference {
                None => reference = Some(got),
                Some(want) => {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert_eq!(g.shape(), w.shape(), "{what}, T = {t}, output {i}");
                        let worst = g
                            .iter()
                            .zip(w.iter())
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(worst <= 1e-4, "{what}, T = {t}, output {i}: {worst}");
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// ONNX Runtime
// ------------------------------------------------------------------------------------------------

#[test]
fn ort_tiny_mlp_matches_numpy_across_batch_and_t() {
    if !ort_available("ort_tiny_mlp_matches_numpy_across_batch_and_t") {
        return;
    }
    let mut r = open_graph(BackendKind::Ort, &model("tiny_mlp"), &RunOptions::default()).unwrap();
    check_case(r.as_mut(), "tiny_mlp");
    check_case(r.as_mut(), "tiny_mlp");
}

#[test]
fn ort_external_data_and_options() {
    if !ort_available("ort_external_data_and_options") {
        return;
    }
    for level in [
        OrtOptLevel::Disable,
        OrtOptLevel::Basic,
        OrtOptLevel::Extended,
        OrtOptLevel::All,
    ] {
        let opts = RunOptions {
            intra_threads: Some(1),
            inter_threads: Some(1),
            ort_optimization: Some(level),
            ..RunOptions::default()
        };
        let mut r = open_graph(BackendKind::Ort, &model("ext_data"), &opts).unwrap();
        check_case(r.as_mut(), "ext_data");
    }
}

#[test]
fn ort_graph_without_inputs() {
    if !ort_available("ort_graph_without_inputs") {
        return;
    }
    let mut r = open_graph(
        BackendKind::Ort,
        &model("no_inputs"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(r.input_names().is_empty());
    check_case(r.as_mut(), "no_inputs");
}

#[test]
fn ort_initialises_once_from_a_supported_library() {
    if !ort_available("ort_initialises_once_from_a_supported_library") {
        return;
    }
    let a = init_ort().unwrap();
    let b = init_ort().unwrap();
    assert!(std::ptr::eq(a, b));
    check_ort_version(&a.version).unwrap();
    assert!(a.path.is_file());
}

// ------------------------------------------------------------------------------------------------
// Input checks (both backends)
// ------------------------------------------------------------------------------------------------

fn backends() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Tract];
    if ort_available("input checks on ort") {
        v.push(BackendKind::Ort);
    }
    v
}

fn good_inputs() -> Vec<Tensor> {
    load_runs("tiny_mlp")
        .swap_remove(0)
        .inputs
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

#[test]
fn input_count_mismatch_is_a_clear_error() {
    for kind in backends() {
        let mut r = open_graph(kind, &model("tiny_mlp"), &RunOptions::default()).unwrap();
        let mut inputs = good_inputs();
        inputs.pop();
        let msg = backend_message(r.run(inputs).unwrap_err(), kind.name());
        assert!(msg.contains("tiny_mlp"), "{msg}");
        assert!(msg.contains("2 input(s)") && msg.contains("got 1"), "{msg}");
        assert!(msg.contains("`input_ids`") && msg.contains("`x`"), "{msg}");
        // The runner still works after the error.
        r.run(good_inputs()).unwrap();

        let mut r0 = open_graph(kind, &model("no_inputs"), &RunOptions::default()).unwrap();
        let msg = backend_message(r0.run(good_inputs()).unwrap_err(), kind.name());
        assert!(msg.contains("0 input(s) (none), got 2"), "{msg}");
    }
}

#[test]
fn input_dtype_and_shape_mismatches_are_clear_errors() {
    for kind in backends() {
        let mut r = open_graph(kind, &model("tiny_mlp"), &RunOptions::default()).unwrap();

        // float ids
        let mut inputs = good_inputs();
        let ids = match &inputs[0] {
            Tensor::I64(a) => a.mapv(|v| v as f32),
            _ => unreachable!(),
        };
        inputs[0] = Tensor::F32(ids);
        let msg = backend_message(r.run(inputs).unwrap_err(), kind.name());
        assert!(
            msg.contains("`input_ids`") && msg.contains("int64"),
            "{msg}"
        );
        assert!(msg.contains("float32"), "{msg}");

        // wrong rank
        let mut inputs = good_inputs();
        inputs[1] = Tensor::F32(ArrayD::zeros(IxDyn(&[2, 3])));
        let msg = backend_message(r.run(inputs).unwrap_err(), kind.name());
        assert!(msg.contains("`x`") && msg.contains("rank 3"), "{msg}");

        // wrong fixed dimension (D = 4)
        let mut inputs = good_inputs();
        inputs[1] = Tensor::F32(ArrayD::zeros(IxDyn(&[2, 3, 5])));
        let msg = backend_message(r.run(inputs).unwrap_err(), kind.name());
        assert!(msg.contains("`x`") && msg.contains("must be 4"), "{msg}");

        // inconsistent T between inputs
        let mut inputs = good_inputs();
        inputs[1] = Tensor::F32(ArrayD::zeros(IxDyn(&[2, 4, 4])));
        let msg = backend_message(r.run(inputs).unwrap_err(), kind.name());
        assert!(msg.contains("`T`") && msg.contains("`input_ids`"), "{msg}");

        // and it still runs
        check_case(r.as_mut(), "tiny_mlp");
    }
}

#[test]
fn missing_graph_file_names_file_and_backend() {
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let path = case_dir("tiny_mlp").join("absent.onnx");
        let err = open_graph(kind, &path, &RunOptions::default())
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.starts_with(kind.name()), "{text}");
        assert!(
            text.contains("absent.onnx") && text.contains("does not exist"),
            "{text}"
        );
    }
}

#[test]
fn corrupt_graph_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.onnx");
    std::fs::write(&path, b"this is not a protobuf \xff\xff\xff").unwrap();
    let mut kinds = vec![BackendKind::Tract];
    if ort_available("corrupt_graph_file_is_an_error") {
        kinds.push(BackendKind::Ort);
    }
    for kind in kinds {
        let err = open_graph(kind, &path, &RunOptions::default())
            .err()
            .unwrap();
        let msg = backend_message(err, kind.name());
        assert!(msg.contains("junk.onnx"), "{msg}");
    }
}

// ------------------------------------------------------------------------------------------------
// Library discovery (explicit arguments: no process-wide state, no env var races)
// ------------------------------------------------------------------------------------------------

#[test]
fn ort_dylib_path_to_a_missing_file_is_a_clear_error() {
    let err = find_ort_library_with(Some(OsStr::new("/nonexistent/libonnxruntime.so.1.31.1")))
        .unwrap_err();
    let msg = backend_message(err, "ort");
    assert!(
        msg.contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so.1.31.1"),
        "{msg}"
    );
    assert!(msg.contains("no such file"), "{msg}");
    assert!(msg.contains("pip install onnxruntime==1.31.1"), "{msg}");
}

#[test]
fn ort_dylib_path_to_a_non_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, "not an ELF file\n").unwrap();
    let err = find_ort_library_with(Some(fake.as_os_str())).unwrap_err();
    let msg = backend_message(err, "ort");
    assert!(msg.contains(&fake.display().to_string()), "{msg}");
    assert!(msg.contains("cannot load it as a shared library"), "{msg}");
    assert!(msg.contains("version 1.31.1 by its file name"), "{msg}");
    assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");

    // A directory without the library.
    let empty = tempfile::tempdir().unwrap();
    let msg = backend_message(
        find_ort_library_with(Some(empty.path().as_os_str())).unwrap_err(),
        "ort",
    );
    assert!(msg.contains("holds no libonnxruntime"), "{msg}");

    // probe on its own
    let msg = backend_message(probe_ort_library(&fake).unwrap_err(), "ort");
    assert!(msg.contains("cannot load"), "{msg}");
}

#[test]
fn ort_dylib_path_to_a_library_that_is_not_onnxruntime() {
    // Any shared library without `OrtGetApiBase`; libm is on every glibc system.
    let Some(libm) = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file()) else {
        eprintln!("note: no libm found; skipping");
        return;
    };
    let msg = backend_message(
        find_ort_library_with(Some(libm.as_os_str())).unwrap_err(),
        "ort",
    );
    assert!(msg.contains("OrtGetApiBase"), "{msg}");
}

#[test]
fn ort_version_check() {
    check_ort_version("1.31.1").unwrap();
    check_ort_version("1.31.0").unwrap();
    check_ort_version("1.32.0-dev").unwrap();
    let msg = backend_message(check_ort_version("1.20.0").unwrap_err(), "ort");
    assert!(msg.contains("1.20.0") && msg.contains("1.31"), "{msg}");
    assert!(check_ort_version("2.0.0").is_err());
    assert!(check_ort_version("garbage").is_err());
}

#[test]
fn ort_library_found_by_ort_dylib_path_and_by_search() {
    let found = match find_ort_library() {
        Ok(f) => f,
        Err(e) => {
            if std::env::var_os("FAMC_REQUIRE_ORT").is_some_and(|v| !v.is_empty() && v != "0") {
                panic!("ONNX Runtime required (FAMC_REQUIRE_ORT) but not found: {e}");
            }
            eprintln!("note: skipping: {e}");
            return;
        }
    };
    eprintln!("found {found}");
    check_ort_version(&found.version).unwrap();
    assert_eq!(probe_ort_library(&found.path).unwrap(), found.version);
    // The same file, given explicitly, and its directory.
    let by_file = find_ort_library_with(Some(found.path.as_os_str())).unwrap();
    assert_eq!(by_file.path, found.path);
    assert_eq!(by_file.found_via, "ORT_DYLIB_PATH");
    let by_dir = find_ort_library_with(Some(found.path.parent().unwrap().as_os_str())).unwrap();
    assert_eq!(by_dir.version, found.version);
}

#[test]
fn backend_and_level_names() {
    for k in [BackendKind::Tract, BackendKind::Ort] {
        assert_eq!(k.to_string().parse::<BackendKind>().unwrap(), k);
    }
    assert_eq!("ORT".parse::<BackendKind>().unwrap(), BackendKind::Ort);
    assert!("onnx".parse::<BackendKind>().is_err());
    for l in [
        OrtOptLevel::Disable,
        OrtOptLevel::Basic,
        OrtOptLevel::Extended,
        OrtOptLevel::All,
    ] {
        assert_eq!(l.to_string().parse::<OrtOptLevel>().unwrap(), l);
    }
    assert!("max".parse::<OrtOptLevel>().is_err());
}

// ------------------------------------------------------------------------------------------------
// values written in place (the decode caches)
// ------------------------------------------------------------------------------------------------

#[test]
fn held_values_take_rows_in_place_on_every_backend() {
    use famc::runtime::Value as RtValue;
    let base = ArrayD::from_shape_fn(IxDyn(&[1, 2, 3, 2]), |i| {
        (i[1] * 100 + i[2] * 10 + i[3]) as f32
    });
    let row = ArrayD::from_shape_fn(IxDyn(&[1, 2, 1, 2]), |i| -((i[1] * 2 + i[3]) as f32) - 1.0);
    // what writing `row` at index 1 of axis 2 gives, element by element
    let mut want = base.clone();
    for h in 0..2 {
        for d in 0..2 {
            want[[0, h, 1, d]] = row[[0, h, 0, d]];
        }
    }
    let mut kinds = vec![BackendKind::Tract];
    if ort_available("held_values_take_rows_in_place_on_every_backend") {
        kinds.push(BackendKind::Ort);
    }
    let mut values = vec![("host", RtValue::host(Tensor::F32(base.clone())))];
    for kind in kinds {
        let r = open_graph(kind, &model("tiny_mlp"), &RunOptions::default()).unwrap();
        let v = r.hold(Tensor::F32(base.clone())).unwrap();
        assert_eq!(v.backend(), Some(kind), "{kind} holds it");
        values.push((kind.name(), v));
    }
    for (what, mut v) in values {
        let at = v.data_address();
        v.write_at(2, 1, &RtValue::host(Tensor::F32(row.clone())))
            .unwrap();
        assert_eq!(v.data_address(), at, "{what}: written in place");
        assert_eq!(v.to_host_f32().unwrap(), want, "{what}");
        let err = v
            .write_at(2, 3, &RtValue::host(Tensor::F32(row.clone())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("index 3 of axis 2") && err.contains("[1, 2, 3, 2]"),
            "{what}: {err}"
        );
        let wide = ArrayD::<f32>::zeros(IxDyn(&[1, 2, 2, 2]));
        let err = v
            .write_at(2, 0, &RtValue::host(Tensor::F32(wide)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[1, 2, 2, 2]") && err.contains("[1, 2, 1, 2]"),
            "{what}: {err}"
        );
        assert_eq!(
            v.to_host_f32().unwrap(),
            want,
            "{what}: a refused write changes nothing"
        );
    }
}
