//! Streaming: scores against the reference's logits, snapshots, batches, incremental input.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Output;

use common::*;
use famc::export::{self, ExportOptions};
use famc::model::{Checkpoint, FamParams};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;
use famc::snapshot::Snapshot;
use famc::stream::{score_batch, Scorer, TokenReader};

fn params(l: usize, f: usize, m: usize) -> FamParams {
    FamParams {
        block_len: l,
        fam_len: f,
        mem_blocks: m,
    }
}

/// Mean NLL of next-token prediction computed here from the reference's f64 logits.
fn reference_mean_nll(r: &Reference, ids: &[u32]) -> f64 {
    let logits = r.forward(ids).unwrap();
    let mut total = 0.0;
    for i in 0..ids.len() - 1 {
        let row = logits.row(i);
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        total += lse - row[ids[i + 1] as usize];
    }
    total / (ids.len() - 1) as f64
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn write_ids(path: &Path, ids: &[u32]) {
    std::fs::write(
        path,
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    )
    .unwrap();
}

#[test]
fn score_matches_the_reference_on_hugging_face_and_fam_models() {
    // the HF fixture as plain causal attention, and FAM models
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let ids = hf_tiny_ids();
    let cases: Vec<(Checkpoint, FamParams, Vec<u32>)> = {
        let spec = Spec {
            fam_init_rows: Some(3),
            ..Spec::default()
        };
        let (_t, dir, _) = temp_checkpoint(&spec);
        let fam_ck = Checkpoint::load(&dir).unwrap();
        let fam_ids = Rng::new(1).tokens(29, 40);
        vec![
            (ck.clone(), params(16, 0, 7), ids.clone()),
            (ck, params(16, 4, 2), ids),
            (fam_ck.clone(), params(4, 3, 1), fam_ids.clone()),
            (fam_ck, params(5, 3, 0), fam_ids[..25].to_vec()),
        ]
    };
    for (ck, p, ids) in cases {
        let want = reference_mean_nll(&Reference::new(&ck, p).unwrap(), &ids);
        for backend in backends() {
            let m = FamModel::compile(&ck, p, backend, &RunOptions::default()).unwrap();
            // from the logits (the default on the CPU), and on ONNX Runtime in the score graph
            assert!(!m.scores_in_graph());
            let in_graph = RunOptions {
                score_in_graph: Some(true),
                ..RunOptions::default()
            };
            let g = FamModel::compile(&ck, p, backend, &in_graph).unwrap();
            assert_eq!(g.scores_in_graph(), backend == BackendKind::Ort);
            for m in [&m, &g] {
                let mut s = Scorer::new(m);
                for chunk in ids.chunks(7) {
                    s.push(chunk).unwrap();
                }
                let got = s.totals().unwrap();
                assert_eq!(
                    (got.tokens, got.scored),
                    (ids.len() as u64, ids.len() as u64 - 1)
                );
                assert!(
                    (got.mean_nll() - want).abs() < 1e-4,
                    "{backend:?} {p:?}, in the graph {}: {} vs {want}",
                    m.scores_in_graph(),
                    got.mean_nll()
                );
            }
        }
    }
}

#[test]
fn cli_score_json_equals_the_reference() {
    let ids = hf_tiny_ids();
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let want = reference_mean_nll(&Reference::new(&ck, params(16, 4, 2)).unwrap(), &ids);
    let d = hf_tiny_dir();
    let idf = d.join("ids.txt");
    for backend in backends() {
        let o = famc(&[
            "score",
            d.to_str().unwrap(),
            "--tokens",
            idf.to_str().unwrap(),
            "--json",
            "--backend",
            backend.name(),
            "--block-len",
            "16",
            "--fam-len",
            "4",
            "--mem-blocks",
            "2",
        ]);
        let j = json_of(&o);
        assert_eq!(j["tokens"], 100);
        assert!((j["mean_nll"].as_f64().unwrap() - want).abs() < 1e-4, "{j}");
        assert!(
            (j["ppl"].as_f64().unwrap() - want.exp()).abs() < 1e-3,
            "{j}"
        );
        assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0);
        let kept_in = match backend {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort cpu",
        };
        assert_eq!(j["state_location"], kept_in, "{j}");
    }
}

#[test]
fn snapshot_then_resume_equals_an_uninterrupted_run() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let out = tmp.path().join("export");
    export::export(&ck, params(4, 2, 1), &out, &ExportOptions::default()).unwrap();
    let ids = Rng::new(5).tokens(41, 40);
    for backend in backends() {
        let whole = {
            let m = FamModel::open(&out, backend, &RunOptions::default()).unwrap();
            let mut s = Scorer::new(&m);
            s.push(&ids).unwrap();
            s.totals().unwrap()
        };
        for cut in [1usize, 4, 5, 9, 17, 40] {
            let snap_path = tmp.path().join(format!("{cut}.state"));
            {
                let m = FamModel::open(&out, backend, &RunOptions::default()).unwrap();
                let mut s = Scorer::new(&m);
                s.push(&ids[..cut]).unwrap();
                s.snapshot()
                    .unwrap()
                    .save(&snap_path, m.manifest())
                    .unwrap();
            }
            let m = FamModel::open(&out, backend, &RunOptions::default()).unwrap();
            let snap = Snapshot::load(&snap_path, m.manifest()).unwrap();
            assert_eq!(snap.block_index * 4 + snap.pending.len(), cut);
            let mut s = Scorer::resume(&m, snap);
            s.push(&ids[cut..]).unwrap();
            let resumed = s.totals().unwrap();
            assert_eq!(
                (resumed.tokens, resumed.scored),
                (whole.tokens, whole.scored)
            );
            assert!(
                (resumed.nll_sum - whole.nll_sum).abs() < 1e-9,
                "{backend:?} cut {cut}: {resumed:?} vs {whole:?}"
            );
        }
    }

    // the same through the CLI
    let idf = tmp.path().join("all.txt");
    let a = tmp.path().join("a.txt");
    let b = tmp.path().join("b.txt");
    write_ids(&idf, &ids);
    write_ids(&a, &ids[..18]);
    write_ids(&b, &ids[18..]);
    let st = tmp.path().join("cli.state");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let whole = json_of(&famc(&["score", &s(&out), "--tokens", &s(&idf), "--json"]));
    json_of(&famc(&[
        "score",
        &s(&out),
        "--tokens",
        &s(&a),
        "--json",
        "--save-state",
        &s(&st),
    ]));
    let resumed = json_of(&famc(&[
        "score",
        &s(&out),
        "--tokens",
        &s(&b),
        "--json",
        "--resume-state",
        &s(&st),
    ]));
    assert_eq!(whole["tokens"], resumed["tokens"]);
    assert!(
        (whole["mean_nll"].as_f64().unwrap() - resumed["mean_nll"].as_f64().unwrap()).abs() < 1e-9
    );
}

#[test]
fn corrupt_or_foreign_snapshots_are_refused() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let m = FamModel::compile(
        &ck,
        params(4, 2, 1),
        BackendKind::Tract,
        &RunOptions::default(),
    )
    .unwrap();
    let mut s = Scorer::new(&m);
    s.push(&Rng::new(2).tokens(13, 40)).unwrap();
    let path = tmp.path().join("s.state");
    s.snapshot().unwrap().save(&path, m.manifest()).unwrap();
    assert!(Snapshot::load(&path, m.manifest()).is_ok());

    let err =
        |p: &Path, model: &FamModel| Snapshot::load(p, model.manifest()).unwrap_err().to_string();
    let bytes = std::fs::read(&path).unwrap();
    let flipped = tmp.path().join("flipped.state");
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 5] ^= 0x40;
    std::fs::write(&flipped, &b).unwrap();
    assert!(err(&flipped, &m).contains("checksum mismatch"));

    let truncated = tmp.path().join("truncated.state");
    std::fs::write(&truncated, &bytes[..n - 9]).unwrap();
    assert!(err(&truncated, &m).contains("corrupt or truncated"));

    // another configuration of the same weights
    let other_l = FamModel::compile(
        &ck,
        params(5, 2, 1),
        BackendKind::Tract,
        &RunOptions::default(),
    )
    .unwrap();
    assert!(
        err(&path, &other_l).contains("block_len"),
        "{}",
        err(&path, &other_l)
    );
    let other_m = FamModel::compile(
        &ck,
        params(4, 2, 2),
        BackendKind::Tract,
        &RunOptions::default(),
    )
    .unwrap();
    let e = err(&path, &other_m);
    assert!(
        e.contains("saved with mem_blocks = 1, this model has 2"),
        "{e}"
    );
    // another model
    let (_t2, dir2, _) = temp_checkpoint(&Spec { seed: 99, ..spec });
    let ck2 = Checkpoint::load(&dir2).unwrap();
    let other = FamModel::compile(
        &ck2,
        params(4, 2, 1),
        BackendKind::Tract,
        &RunOptions::default(),
    )
    .unwrap();
    assert!(err(&path, &other).contains("another model"));
    // not a snapshot at all
    std::fs::write(&truncated, b"hello").unwrap();
    assert!(err(&truncated, &m).contains("corrupt or truncated"));

    // the CLI says so and exits non-zero
    let ids = tmp.path().join("ids.txt");
    write_ids(&ids, &[1, 2, 3]);
    let o = famc(&[
        "score",
        dir.to_str().unwrap(),
        "--block-len",
        "4",
        "--mem-blocks",
        "1",
        "--tokens",
        ids.to_str().unwrap(),
        "--resume-state",
        flipped.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"));
}

#[test]
fn a_batch_scores_each_stream_as_if_alone() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (_t, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    for backend in backends() {
        let m = FamModel::compile(&ck, params(4, 2, 1), backend, &RunOptions::default()).unwrap();
        let streams: Vec<Vec<u32>> = [23usize, 9, 16, 2, 17]
            .iter()
            .enumerate()
            .map(|(i, &n)| Rng::new(i as u64).tokens(n, 40))
            .collect();
        let refs: Vec<&[u32]> = streams.iter().map(|s| s.as_slice()).collect();
        let batch = score_batch(&m, &refs).unwrap();
        for (s, got) in streams.iter().zip(batch) {
            let mut alone = Scorer::new(&m);
            alone.push(s).unwrap();
            let want = alone.totals().unwrap();
            assert_eq!((got.tokens, got.scored), (want.tokens, want.scored));
            assert!(
                (got.mean_nll() - want.mean_nll()).abs() < 1e-5,
                "{backend:?}: {got:?} vs {want:?}"
            );
        }
    }
}

/// A reader that hands out a few bytes at a time, cutting ids apart.
struct Dribble(Vec<u8>, usize);

impl Read for Dribble {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = 3.min(buf.len()).min(self.0.len() - self.1);
        buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
        self.1 += n;
        Ok(n)
    }
}

#[test]
fn token_reader_handles_ids_cut_across_reads() {
    let ids = Rng::new(8).tokens(500, 100_000);
    let text = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" \n ");
    let mut r = TokenReader::new(
        std::io::BufReader::with_capacity(5, Dribble(text.into_bytes(), 0)),
        "test",
        100_000,
    );
    let mut got = Vec::new();
    loop {
        let c = r.next_chunk().unwrap();
        if c.is_empty() {
            break;
        }
        got.extend(c);
    }
    assert_eq!(got, ids);
    let mut bad = TokenReader::new(std::io::Cursor::new(b"1 2 70000 3".to_vec()), "x.txt", 1000);
    let e = bad.next_chunk().unwrap_err().to_string();
    assert!(
        e.contains("x.txt") && e.contains("token 2") && e.contains("70000"),
        "{e}"
    );
}

/// A word-level tokenizer.json over the test vocabulary: "w0" … "w39".
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..40).map(|i| (format!("w{i}"), i.into())).collect();
    let mut vocab = vocab;
    vocab.insert("[UNK]".into(), 39.into());
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

#[test]
fn text_is_tokenized_with_the_models_tokenizer() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ids = Rng::new(4).tokens(30, 39);
    let text: String = ids
        .iter()
        .enumerate()
        .map(|(i, t)| format!("w{t}{}", if i % 7 == 6 { "\n" } else { " " }))
        .collect();
    let tf = tmp.path().join("t.txt");
    std::fs::write(&tf, &text).unwrap();
    let idf = tmp.path().join("ids.txt");
    write_ids(&idf, &ids);
    let fam = ["--block-len", "4", "--mem-blocks", "1"];
    let d = dir.to_str().unwrap();

    let o = famc(&[&["score", d, "--text", tf.to_str().unwrap()][..], &fam[..]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no tokenizer.json"));

    write_tokenizer(&dir);
    let by_text = json_of(&famc(
        &[
            &["score", d, "--text", tf.to_str().unwrap(), "--json"][..],
            &fam[..],
        ]
        .concat(),
    ));
    let by_ids = json_of(&famc(
        &[
            &["score", d, "--tokens", idf.to_str().unwrap(), "--json"][..],
            &fam[..],
        ]
        .concat(),
    ));
    assert_eq!(by_text["tokens"], 30);
    assert_eq!(by_text["mean_nll"], by_ids["mean_nll"]);
}

#[test]
fn the_score_graph_gives_each_rows_target_logprob() {
    if !backends().contains(&BackendKind::Ort) {
        eprintln!("skipped: ONNX Runtime is not available");
        return;
    }
    let spec = Spec {
        fam_init_rows: Some(3),
        ..Spec::default()
    };
    let (_t, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = params(4, 3, 1);
    let ids = Rng::new(3).tokens(19, 40);
    let logits = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
    // log softmax(logits)[target] of row i, in f64
    let want = |i: usize| {
        let row = logits.row(i);
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        row[ids[i + 1] as usize] - lse
    };
    let m = FamModel::compile(&ck, p, BackendKind::Ort, &RunOptions::default()).unwrap();
    let mut state = m.new_state();
    let mut worst = 0f64;
    for b in 0..4 {
        let (block, targets) = (&ids[4 * b..4 * b + 4], &ids[4 * b + 1..4 * b + 5]);
        let lp = m.step_scored(&mut state, block, targets).unwrap();
        for (j, &v) in lp.iter().enumerate() {
            worst = worst.max((f64::from(v) - want(4 * b + j)).abs());
        }
    }
    assert_eq!(
        state.block_index(),
        4,
        "full scored blocks advance the stream"
    );
    // a short block after them, not advancing
    let lp = m
        .preview_scored(&state, &ids[16..18], &ids[17..19])
        .unwrap();
    for (j, &v) in lp.iter().enumerate() {
        worst = worst.max((f64::from(v) - want(16 + j)).abs());
    }
    assert!(worst < 1e-4, "score graph against the reference: {worst}");

    let err = m
        .preview_scored(&state, &ids[16..18], &[1, 40])
        .unwrap_err()
        .to_string();
    assert!(err.contains("target token id 40"), "{err}");
    let err = m
        .step_scored(&mut state, &ids[..4], &ids[1..4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 targets for a block of 4 tokens"), "{err}");
    assert_eq!(
        state.block_index(),
        4,
        "a refused block leaves the stream as it was"
    );
}
