//! Golden exports in graphs/: emission must not change them unintentionally (re-run
//! graphs/regen.sh after an intended change), and they must still compute the reference's logits.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use famc::builder::encode_model;
use famc::export;
use famc::model::{Checkpoint, FamParams};
use famc::onnx::Target;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("graphs")
        .join(name)
}

const HINT: &str = "emission changed; if intended, run graphs/regen.sh and review the .txt diffs";

fn check_golden(name: &str, p: FamParams, target: Target) {
    let dir = case_dir(name);
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let compiled = export::compile(&ck, p, export::WeightDtype::F32, target).unwrap();
    for (file, g) in compiled.graphs() {
        assert!(
            encode_model(g) == std::fs::read(dir.join(file)).unwrap(),
            "{name}/{file}: {HINT}"
        );
    }
    let manifest = export::Manifest::read(&dir).unwrap();
    assert_eq!(
        manifest.embedded(),
        compiled.manifest,
        "{name}/famc.json: {HINT}"
    );
    // famc.json's sizes and hashes are those of the golden files themselves
    for (file, entry) in &manifest.files {
        assert_eq!(
            &export::file_entry(&dir.join(file)).unwrap(),
            entry,
            "{name}/{file}: {HINT}"
        );
    }
    for g in ["block", "init", "decode", "fam_kv", "score"] {
        let onnx = dir.join(format!("{g}.onnx"));
        if onnx.exists() {
            let dump = famc::inspect::dump_graph(&onnx).unwrap();
            assert_eq!(
                dump,
                std::fs::read_to_string(dir.join(format!("{g}.txt"))).unwrap(),
                "{name}/{g}.txt: {HINT}"
            );
        }
    }

    // the golden graphs reproduce the io fixture, which the reference wrote
    let ids: Vec<u32> = std::fs::read_to_string(dir.join("ids.txt"))
        .unwrap()
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    let want = famc::io::read_npy_f32(&dir.join("logits.npy")).unwrap();
    let mut kinds = vec![BackendKind::Tract];
    if famc::runtime::ort::find_ort_library().is_ok() {
        kinds.push(BackendKind::Ort);
    }
    for kind in kinds.into_iter().filter(|&k| runs(target, k)) {
        let got = FamModel::open(&dir, kind, &RunOptions::default())
            .unwrap()
            .run(&ids)
            .unwrap();
        assert_eq!(got.shape(), want.shape());
        let diff = max_abs_diff_f32(got.iter(), want.iter());
        assert!(diff < 1e-4, "{name} on {kind:?}: {diff}");
    }
}

#[test]
fn tiny_fam_golden() {
    check_golden(
        "tiny-fam",
        FamParams {
            block_len: 16,
            fam_len: 4,
            mem_blocks: 2,
        },
        Target::Opset17,
    );
}

#[test]
fn tiny_fam_opset23_golden() {
    check_golden(
        "tiny-fam-opset23",
        FamParams {
            block_len: 16,
            fam_len: 4,
            mem_blocks: 2,
        },
        Target::Opset23,
    );
}

#[test]
fn tiny_fam_ort_golden() {
    check_golden(
        "tiny-fam-ort",
        FamParams {
            block_len: 16,
            fam_len: 4,
            mem_blocks: 2,
        },
        Target::Ort,
    );
}

#[test]
fn tiny_bswa_golden() {
    check_golden(
        "tiny-bswa",
        FamParams {
            block_len: 16,
            fam_len: 0,
            mem_blocks: 1,
        },
        Target::Opset17,
    );
}
