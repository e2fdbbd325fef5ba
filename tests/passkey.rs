//! PassKey: the shipped trained model (models/passkey-fam) agrees with the PyTorch FAM that
//! trained it (tests/data/passkey, written by export/make_passkey_fixture.py), and recalls its
//! key across many blocks through famc's graphs, while the same weights without FAM do not.

use std::path::PathBuf;
use std::process::Command;

use ndarray::{Array2, Ix2};

use famc::eval::passkey::{self, PasskeyOptions};
use famc::eval::Engine;
use famc::model::{Checkpoint, FamDefaults};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("models/passkey-fam")
}

fn fixture() -> (Vec<u32>, Array2<f32>) {
    let dir = root().join("tests/data/passkey");
    let ids = famc::io::read_token_ids(&dir.join("ids.txt"), passkey::VOCAB as usize).unwrap();
    let logits = famc::io::read_npy_f32(&dir.join("torch_logits.npy"))
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();
    assert_eq!(logits.nrows(), ids.len());
    (ids, logits)
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tract_graphs_match_the_pytorch_fam() {
    let (ids, torch) = fixture();
    let m = FamModel::open_any(
        &model_dir(),
        FamDefaults::default(),
        BackendKind::Tract,
        &RunOptions::default(),
    )
    .unwrap();
    let p = m.fam_params();
    assert!(
        ids.len() > 5 * p.block_len && ids.len() % p.block_len != 0,
        "the fixture spans several blocks and a tail"
    );
    let got = m.run(&ids).unwrap();
    let diff = max_abs_diff(&got, &torch);
    assert!(diff <= 1e-4, "tract vs torch: max abs diff {diff}");
}

#[test]
fn reference_matches_the_pytorch_fam() {
    let (ids, torch) = fixture();
    let ck = Checkpoint::load(&model_dir()).unwrap();
    let fam = ck.fam_params(FamDefaults::default()).unwrap();
    let got = Reference::new(&ck, fam)
        .unwrap()
        .forward(&ids)
        .unwrap()
        .mapv(|v| v as f32);
    let diff = max_abs_diff(&got, &torch);
    assert!(diff <= 1e-4, "reference vs torch: max abs diff {diff}");
}

#[test]
fn generator_is_deterministic_and_matches_python() {
    let a = passkey::samples(7, 8, 2, 2).unwrap();
    assert_eq!(a, passkey::samples(7, 8, 2, 2).unwrap());
    assert_ne!(a, passkey::samples(8, 8, 2, 2).unwrap());
    // export/passkey.py: eval_samples(7, 8, 2, 2)
    assert_eq!(
        a[0].ids,
        [
            0, 28, 28, 1, 12, 25, 23, 26, 26, 28, 31, 27, 22, 25, 26, 28, 24, 31, 28, 23, 28, 21,
            30, 2
        ]
    );
    assert_eq!(a[0].answer, 12);
    assert_eq!(
        a[1].ids,
        [
            0, 1, 5, 20, 26, 21, 25, 27, 31, 20, 31, 24, 31, 22, 24, 19, 29, 20, 25, 26, 19, 20,
            21, 2
        ]
    );
    assert_eq!(a[1].answer, 5);
    for s in passkey::samples(3, 16, 5, 50).unwrap() {
        assert_eq!(s.ids.len(), 6 * 16);
        assert_eq!(s.ids[0], passkey::BOS);
        assert_eq!(*s.ids.last().unwrap(), passkey::QUERY);
        let p = s.ids.iter().position(|&t| t == passkey::KEY).unwrap();
        assert!((1..15).contains(&p));
        assert_eq!(s.ids[p + 1], s.answer);
        assert!((passkey::KEY0..passkey::KEY0 + passkey::NUM_KEYS).contains(&s.answer));
        assert_eq!(s.ids.iter().filter(|&&t| t < passkey::FILLER0).count(), 4);
    }
}

#[test]
fn fam_recalls_across_16_blocks_and_bswa_does_not() {
    let mut opts = PasskeyOptions {
        distances: vec![16],
        samples: 48,
        engine: Engine::Graphs(BackendKind::Tract),
        ..PasskeyOptions::default()
    };
    let fam = passkey::evaluate(&model_dir(), &opts).unwrap();
    assert!(fam.fam.fam_len > 0);
    let r = fam.results[0].recall;
    assert!(r >= 0.9, "FAM recall at 16 blocks: {r}");

    opts.bswa = true;
    let bswa = passkey::evaluate(&model_dir(), &opts).unwrap();
    assert_eq!(bswa.fam.fam_len, 0);
    let r = bswa.results[0].recall;
    assert!(r <= bswa.chance + 0.2, "BSWA recall at 16 blocks: {r}");
}

#[test]
fn an_export_evaluates_but_bswa_needs_the_checkpoint() {
    let ck = Checkpoint::load(&model_dir()).unwrap();
    let fam = ck.fam_params(FamDefaults::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    famc::export::export(&ck, fam, dir.path(), &Default::default()).unwrap();
    let mut opts = PasskeyOptions {
        distances: vec![4],
        samples: 8,
        ..PasskeyOptions::default()
    };
    let r = passkey::evaluate(dir.path(), &opts).unwrap();
    assert_eq!(r.fam, fam);
    assert_eq!(r.results[0].samples, 8);
    opts.bswa = true;
    assert!(passkey::evaluate(dir.path(), &opts).is_err());
    opts.bswa = false;
    opts.engine = Engine::Reference;
    assert!(passkey::evaluate(dir.path(), &opts).is_err());
}

#[test]
fn distances_and_samples_must_be_positive() {
    for (distances, samples) in [(vec![0], 1), (vec![], 1), (vec![4], 0)] {
        let opts = PasskeyOptions {
            distances,
            samples,
            ..PasskeyOptions::default()
        };
        assert!(passkey::evaluate(&model_dir(), &opts).is_err());
    }
}

#[test]
fn cli_eval_passkey() {
    let out = Command::new(env!("CARGO_BIN_EXE_famc"))
        .args(["eval", "passkey"])
        .arg(model_dir())
        .args(["--distance-blocks", "2,4", "--samples", "8", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["distance_blocks"], 4);
    assert_eq!(results[1]["samples"], 8);
    assert_eq!(v["fam"]["fam_len"], 4);
}
