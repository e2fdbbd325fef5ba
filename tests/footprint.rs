//! Footprint: every graph of an export reads its weights from one store holding each matrix
//! once, and the ONNX Runtime sessions of one export hold the weights once between them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;
use famc::export::{self, ExportOptions};
use famc::model::{Checkpoint, FamParams};
use famc::onnx::{self, tensor_proto::DataLocation};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;
use prost::Message;

fn graph_files(dir: &Path) -> Vec<String> {
    [
        "block.onnx",
        "init.onnx",
        "decode.onnx",
        "fam_kv.onnx",
        "score.onnx",
    ]
    .into_iter()
    .filter(|f| dir.join(f).exists())
    .map(String::from)
    .collect()
}

/// (location, offset, length) of every external initializer of the graph at `path`.
fn external_refs(path: &Path) -> Vec<(String, u64, u64)> {
    let m = onnx::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let g = m.graph.unwrap();
    g.initializer
        .iter()
        .filter(|t| t.data_location == DataLocation::External as i32)
        .map(|t| {
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .unwrap()
                    .value
                    .clone()
            };
            (
                get("location"),
                get("offset").parse().unwrap(),
                get("length").parse().unwrap(),
            )
        })
        .collect()
}

fn le_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// The matrix [rows, cols] (row-major `v`) transposed, as bytes.
fn transposed(v: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    le_bytes((0..cols).flat_map(|c| (0..rows).map(move |r| v[r * cols + c])))
}

/// What the store must hold, computed from the checkpoint's tensors alone: each projection and
/// MLP matrix as [in, out], the embedding [V, d] and the FAM prompt [F, d] as they are, an
/// untied head as [d, V].
fn expected_store(t: &Tensors) -> BTreeMap<Vec<u8>, String> {
    let mut want = BTreeMap::new();
    for (name, (shape, v)) in &t.0 {
        if shape.len() != 2 {
            continue;
        }
        let bytes = if name == "model.embed_tokens.weight" || name == "model.fam_init" {
            le_bytes(v.iter().copied())
        } else {
            transposed(v, shape[0], shape[1])
        };
        want.insert(bytes, name.clone());
    }
    want
}

#[test]
fn every_graph_reads_one_store_holding_each_matrix_once() {
    for tie in [true, false] {
        let spec = Spec {
            tie,
            fam_init_rows: Some(2),
            ..Spec::default()
        };
        let (tmp, dir, tensors) = temp_checkpoint(&spec);
        let ck = Checkpoint::load(&dir).unwrap();
        let p = FamParams {
            block_len: 4,
            fam_len: 2,
            mem_blocks: 1,
        };
        let out = tmp.path().join("export");
        // above the norm vectors (16 floats), below every matrix
        let threshold = 64;
        export::export(
            &ck,
            p,
            &out,
            &ExportOptions {
                external_threshold: threshold,
                ..ExportOptions::default()
            },
        )
        .unwrap();
        let store = std::fs::read(out.join(export::WEIGHTS_FILE)).unwrap();
        let files = graph_files(&out);
        assert_eq!(files.len(), 5, "tie {tie}: {files:?}");
        let mut distinct = BTreeSet::new();
        for f in &files {
            let refs = external_refs(&out.join(f));
            assert!(!refs.is_empty(), "{f} has no external weights");
            for (location, offset, length) in refs {
                assert_eq!(location, export::WEIGHTS_FILE, "{f}");
                assert_eq!(offset % 4096, 0, "{f}: offset {offset} not page-aligned");
                distinct.insert((offset, length));
            }
        }
        let want = expected_store(&tensors);
        let mut found: BTreeMap<&str, usize> = BTreeMap::new();
        for &(offset, length) in &distinct {
            let bytes = &store[offset as usize..(offset + length) as usize];
            let name = want.get(bytes).unwrap_or_else(|| {
                panic!("tie {tie}: the store holds {length} bytes at {offset} that are no checkpoint matrix")
            });
            *found.entry(name).or_default() += 1;
        }
        let names: BTreeSet<&str> = want.values().map(String::as_str).collect();
        assert_eq!(
            found.keys().copied().collect::<BTreeSet<_>>(),
            names,
            "tie {tie}: every matrix is in the store"
        );
        assert!(
            found.values().all(|&n| n == 1),
            "tie {tie}: a matrix is stored twice: {found:?}"
        );
        // one copy of each, and nothing else but alignment padding
        let payload: usize = want.keys().map(Vec::len).sum();
        assert!(
            store.len() < payload + 4096 * want.len(),
            "tie {tie}: store {} bytes for {payload} bytes of weights",
            store.len()
        );
        if tie {
            assert!(!tensors.has("lm_head.weight"));
        }

        // and the graphs still compute the reference's logits, on every backend
        let ids = Rng::new(3).tokens(11, spec.vocab as u32);
        let reference = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
        for backend in backends() {
            let got = FamModel::open(&out, backend, &RunOptions::default())
                .unwrap()
                .run(&ids)
                .unwrap();
            let diff = max_abs_diff(got.mapv(f64::from).iter(), reference.iter());
            assert!(diff < 1e-4, "tie {tie}, {backend:?}: {diff}");
        }
    }
}

/// A size this process's `/proc/self/status` gives under `field` (in KiB there), in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resident set size of this process now (Linux `VmRSS`), in bytes.
fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

const CHILD_ENV: &str = "FAMC_FOOTPRINT_CHILD";

/// Runs the test `name` of this binary alone in a child process (so that no other test's
/// memory is in its measurements), passing `dir` to it.
fn in_child(name: &str, dir: &Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {name} failed:\n{text}");
    text
}

/// Exports a checkpoint of `spec` (L = 16, F = 4, M = 1), runs the test `child` on it in a
/// child process and returns the numbers on the child's line that starts with `label`.
fn measured_in_child(spec: &Spec, child: &str, label: &str) -> Vec<f64> {
    let (tmp, dir, _) = temp_checkpoint(spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let out = tmp.path().join("export");
    let p = FamParams {
        block_len: 16,
        fam_len: 4,
        mem_blocks: 1,
    };
    export::export(&ck, p, &out, &ExportOptions::default()).unwrap();
    drop(ck);
    let text = in_child(child, &out);
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no measurement in:\n{text}"));
    text[at + label.len()..]
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// A model big enough (216 MiB of f32 weights) for its weights to stand out of what ONNX
/// Runtime's sessions hold besides.
fn footprint_spec() -> Spec {
    Spec {
        hidden: 768,
        layers: 8,
        heads: 12,
        kv_heads: 4,
        head_dim: 64,
        inter: 2048,
        vocab: 8192,
        tie: true,
        fam_init_rows: Some(4),
        ..Spec::default()
    }
}

#[test]
fn ort_sessions_of_one_export_hold_the_weights_once() {
    if !backends().contains(&BackendKind::Ort) {
        eprintln!("skipped: ONNX Runtime is not available");
        return;
    }
    let v = measured_in_child(&footprint_spec(), "child_opens_every_graph", "footprint:");
    let (store, block, rest) = (v[0], v[1], v[2]);
    eprintln!(
        "store {:.1} MiB; opening the block graph added {:.1} MiB, the decode and FAM-kv graphs {:.1} MiB",
        store / 1048576.0,
        block / 1048576.0,
        rest / 1048576.0
    );
    // measured here: the block session 1.1-1.25x the store (the packed matrices, the rest of
    // the session), the decode and FAM-kv sessions 0.06-0.25x; with a copy of their own they
    // added 1.2x (and the block session 1.35x, the map's pages resident besides)
    assert!(
        block < 1.6 * store,
        "the block session holds {block} bytes for a {store}-byte store"
    );
    assert!(
        rest < 0.5 * store,
        "the decode and FAM-kv sessions added {rest} bytes to a {store}-byte store: they hold their own copies"
    );
}

/// Runs only as [`ort_sessions_of_one_export_hold_the_weights_once`]'s child.
#[test]
fn child_opens_every_graph() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let store = std::fs::metadata(dir.join(export::WEIGHTS_FILE))
        .unwrap()
        .len();
    let opts = RunOptions {
        intra_threads: Some(1),
        ..RunOptions::default()
    };
    // ONNX Runtime's own start-up (library, thread pools) first, on a tiny export
    let (tmp, small, _) = temp_checkpoint(&Spec::default());
    let ck = Checkpoint::load(&small).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 2,
        mem_blocks: 1,
    };
    let warm = tmp.path().join("warm");
    export::export(&ck, p, &warm, &ExportOptions::default()).unwrap();
    let m = FamModel::open(&warm, BackendKind::Ort, &opts).unwrap();
    m.run(&[1, 2, 3, 4, 5]).unwrap();
    drop(m.decode_graphs().unwrap());
    drop(m);

    let before = rss_bytes();
    let model = FamModel::open(dir, BackendKind::Ort, &opts).unwrap();
    let _ = model.run(&[1, 2, 3]).unwrap();
    let after_block = rss_bytes();
    let decode = model.decode_graphs().unwrap();
    let after_all = rss_bytes();
    drop(decode);
    println!(
        "footprint: {store} {} {}",
        after_block.saturating_sub(before),
        after_all.saturating_sub(after_block)
    );
}

/// This process's resident pages of mapped files (Linux `RssFile`), in bytes.
fn rss_file_bytes() -> u64 {
    status_bytes("RssFile:")
}

#[test]
fn ort_embedding_rows_read_do_not_stay_resident() {
    if !backends().contains(&BackendKind::Ort) {
        eprintln!("skipped: ONNX Runtime is not available");
        return;
    }
    let spec = Spec {
        vocab: 32768,
        ..footprint_spec()
    };
    let grew = measured_in_child(&spec, "child_reads_scattered_rows", "embedding rows:")[0];
    let embedding = (spec.vocab * spec.hidden * 4) as f64;
    eprintln!(
        "mapped pages resident grew by {:.1} MiB over scattered tokens, embedding {:.1} MiB",
        grew / 1048576.0,
        embedding / 1048576.0
    );
    // the kernel maps the cached pages around each row faulted in: without the pages handed
    // back between runs, most of the embedding became resident (measured 0.73x here)
    assert!(
        grew < 0.4 * embedding,
        "reading scattered embedding rows left {grew} bytes of the {embedding}-byte embedding resident"
    );
}

/// Runs only as [`ort_embedding_rows_read_do_not_stay_resident`]'s child.
#[test]
fn child_reads_scattered_rows() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let opts = RunOptions {
        intra_threads: Some(1),
        ..RunOptions::default()
    };
    let model = FamModel::open(Path::new(&dir), BackendKind::Ort, &opts).unwrap();
    let vocab = model.manifest().model.vocab_size as u32;
    let mut rng = Rng::new(12345);
    let mut ids = |n: usize| rng.tokens(n, vocab);
    model.run(&ids(16)).unwrap();
    let before = rss_file_bytes();
    for _ in 0..40 {
        model.run(&ids(128)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    model.run(&ids(16)).unwrap();
    println!(
        "embedding rows: {}",
        rss_file_bytes().saturating_sub(before)
    );
}
