//! Python's onnx and onnxruntime on famc's exports: onnx.checker with full_check, strict shape
//! inference, famc's graph rules, and a driver written from docs/graph-contract.md alone.
//!
//! Needs the .venv that scripts/setup-python.sh makes (FAMC_PYTHON); skipped when it is absent
//! unless FAMC_REQUIRE_PYTHON is set, as CI does.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use famc::export::{self, Activations, ExportOptions, WeightDtype};
use famc::model::{Checkpoint, FamParams};
use famc::onnx::Target;
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

fn python() -> Option<PathBuf> {
    common::python_with("onnx, onnxruntime, numpy")
}

fn script(name: &str) -> PathBuf {
    common::export_script(name)
}

fn run_python(py: &Path, args: &[&std::ffi::OsStr]) -> String {
    let o = Command::new(py).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "python {args:?} failed:\n{text}");
    text
}

#[derive(Clone)]
struct Case {
    spec: Spec,
    fam: FamParams,
    external_threshold: usize,
    dtype: WeightDtype,
    activations: Activations,
}

fn cases() -> Vec<Case> {
    let p = |l, f, m| FamParams {
        block_len: l,
        fam_len: f,
        mem_blocks: m,
    };
    vec![
        Case {
            spec: Spec {
                fam_init_rows: Some(3),
                ..Spec::default()
            },
            fam: p(4, 3, 2),
            external_threshold: 1 << 20,
            dtype: WeightDtype::F32,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                kv_heads: 1,
                qkv_bias: true,
                ..Spec::default()
            },
            fam: p(5, 2, 0),
            external_threshold: 1 << 20,
            dtype: WeightDtype::F32,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                tie: true,
                ..Spec::default()
            },
            fam: p(3, 0, 1),
            external_threshold: 1 << 20,
            dtype: WeightDtype::F32,
            activations: Activations::F32,
        },
        Case {
            spec: Spec::default(),
            fam: p(4, 0, 0),
            external_threshold: 1 << 20,
            dtype: WeightDtype::F32,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                fam_init_rows: Some(2),
                ..Spec::default()
            },
            fam: p(4, 2, 1),
            external_threshold: 256,
            dtype: WeightDtype::F32,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                fam_init_rows: Some(2),
                ..Spec::default()
            },
            fam: p(4, 2, 1),
            external_threshold: 256,
            dtype: WeightDtype::F16,
            activations: Activations::F32,
        },
        Case {
            spec: Spec::default(),
            fam: p(3, 0, 2),
            external_threshold: 1 << 20,
            dtype: WeightDtype::BF16,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                hidden: 64,
                head_dim: 16,
                inter: 96,
                tie: true,
                fam_init_rows: Some(2),
                ..Spec::default()
            },
            fam: p(4, 2, 1),
            external_threshold: 256,
            dtype: WeightDtype::Q4,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                hidden: 64,
                head_dim: 16,
                inter: 96,
                ..Spec::default()
            },
            fam: p(4, 0, 1),
            external_threshold: 256,
            dtype: WeightDtype::Q8,
            activations: Activations::F32,
        },
        Case {
            spec: Spec {
                hidden: 64,
                head_dim: 16,
                inter: 96,
                tie: true,
                ..Spec::default()
            },
            fam: p(4, 2, 1),
            external_threshold: 256,
            dtype: WeightDtype::Q8,
            activations: Activations::Int8,
        },
    ]
}

#[test]
fn every_export_passes_the_onnx_checker_and_the_contract_driver() {
    let Some(py) = python() else { return };
    let all = cases()
        .into_iter()
        .flat_map(|c| Target::ALL.map(|t| (t, c.clone())));
    for (i, (target, case)) in all.enumerate() {
        let (tmp, dir, _) = temp_checkpoint(&case.spec);
        let ck = Checkpoint::load(&dir).unwrap();
        let out = tmp.path().join("export");
        let opts = ExportOptions {
            external_threshold: case.external_threshold,
            dtype: case.dtype,
            // f32 compute: famc's and Python's ONNX Runtime sessions then agree to 1e-4
            accuracy_level: 1,
            target,
            activations: case.activations,
        };
        export::export(&ck, case.fam, &out, &opts).unwrap();
        run_python(
            &py,
            &[script("check_graphs.py").as_os_str(), out.as_os_str()],
        );

        let ids = Rng::new(i as u64).tokens(case.fam.block_len * 6 + 1, case.spec.vocab as u32);
        let ids_path = tmp.path().join("ids.txt");
        std::fs::write(
            &ids_path,
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .unwrap();
        let py_out = tmp.path().join("py.npy");
        run_python(
            &py,
            &[
                script("run_contract.py").as_os_str(),
                out.as_os_str(),
                ids_path.as_os_str(),
                py_out.as_os_str(),
            ],
        );
        let from_python = famc::io::read_npy_f32(&py_out).unwrap();
        // the driver runs ONNX Runtime: compare quantized graphs with famc's ONNX Runtime run
        // (tract's run of them is tests/quant.rs's)
        let backend = match case.dtype {
            WeightDtype::Q8 | WeightDtype::Q4 => BackendKind::Ort,
            _ if !runs(target, BackendKind::Tract) => BackendKind::Ort,
            _ => BackendKind::Tract,
        };
        let ours = FamModel::open(&out, backend, &RunOptions::default())
            .unwrap()
            .run(&ids)
            .unwrap();
        let reference = Reference::new(&ck, case.fam)
            .unwrap()
            .forward(&ids)
            .unwrap();
        assert_eq!(from_python.shape(), ours.shape());
        let d_ours = max_abs_diff_f32(from_python.iter(), ours.iter());
        let d_ref = from_python
            .iter()
            .zip(reference.iter())
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            // half-precision and quantized weights move logits by far more than 1e-4 (tests/half.rs
            // and tests/quant.rs bound them)
            d_ours < 1e-4 && (d_ref < 1e-4 || case.dtype != WeightDtype::F32),
            "case {i} ({target}): python vs famc {d_ours}, vs reference {d_ref}"
        );
    }
}

#[test]
fn golden_graphs_pass_the_checker() {
    let Some(py) = python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs");
    for case in ["tiny-fam", "tiny-bswa", "tiny-fam-opset23", "tiny-fam-ort"] {
        run_python(
            &py,
            &[
                script("check_graphs.py").as_os_str(),
                root.join(case).as_os_str(),
            ],
        );
    }
}

#[test]
fn the_checker_rejects_a_broken_graph() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.onnx");
    std::fs::write(&bad, b"not a model").unwrap();
    let o = Command::new(&py)
        .arg(script("check_graphs.py"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("FAILED"));
}
