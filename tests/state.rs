//! Where a stream's state lives between calls: in the backend's own values (ONNX Runtime values,
//! double-buffered; tract tensors), never copied through host arrays per block, and the numbers
//! still those of the f64 reference.

mod common;

use common::*;
use famc::generate::{FamDecoder, LanguageModel};
use famc::model::{Checkpoint, FamParams};
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::{BatchState, FamModel};

fn params() -> FamParams {
    FamParams {
        block_len: 4,
        fam_len: 2,
        mem_blocks: 2,
    }
}

fn checkpoint() -> (tempfile::TempDir, Checkpoint) {
    let spec = Spec {
        fam_init_rows: Some(2),
        seed: 21,
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    (tmp, Checkpoint::load(&dir).unwrap())
}

fn diff_to<'a>(got: &[f32], want: impl Iterator<Item = &'a f64>) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&x, y)| (f64::from(x) - y).abs())
        .fold(0.0, f64::max)
}

fn location(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Tract => "tract",
        BackendKind::Ort => "ort cpu",
    }
}

#[test]
fn state_stays_in_the_backend_and_ort_double_buffers_it() {
    let (_t, ck) = checkpoint();
    let r = Reference::new(&ck, params()).unwrap();
    let ids = Rng::new(4).tokens(4 * 6 + 3, 40);
    let want = r.forward(&ids).unwrap();
    for backend in backends() {
        let m = FamModel::compile(&ck, params(), backend, &RunOptions::default()).unwrap();
        let mut state = [m.new_state()];
        assert_eq!(
            state[0].location(),
            "host",
            "a new stream starts from host arrays"
        );
        let mut addresses = Vec::new();
        let mut rows = Vec::new();
        for block in ids.chunks(4) {
            rows.extend(m.step(&mut state, &[block]).unwrap());
            assert_eq!(state[0].location(), location(backend));
            addresses.push(state[0].values()[0].data_address().unwrap());
        }
        let got: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let diff = diff_to(&got, want.iter());
        assert!(diff < 1e-4, "{backend}: {diff}");
        if backend == BackendKind::Ort {
            // from the third block on, each block writes into the buffers of the state before
            // the last: two buffers, alternating, no allocation per block
            let full = &addresses[..6];
            for k in 1..full.len() - 2 {
                assert_eq!(full[k + 2], full[k], "{addresses:?}");
                assert_ne!(full[k + 1], full[k], "{addresses:?}");
            }
        }
    }
}

#[test]
fn host_state_diagnostic_gives_the_same_numbers_from_host_arrays() {
    let (_t, ck) = checkpoint();
    let r = Reference::new(&ck, params()).unwrap();
    let ids = Rng::new(5).tokens(4 * 3 + 1, 40);
    let want = r.forward(&ids).unwrap();
    for backend in backends() {
        let opts = RunOptions {
            host_state: true,
            ..RunOptions::default()
        };
        let m = FamModel::compile(&ck, params(), backend, &opts).unwrap();
        let mut state = [m.new_state()];
        let mut rows = Vec::new();
        for block in ids.chunks(4) {
            rows.extend(m.step(&mut state, &[block]).unwrap());
            assert_eq!(state[0].location(), "host");
        }
        let got: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let diff = diff_to(&got, want.iter());
        assert!(diff < 1e-4, "{backend}: {diff}");
    }
}

#[test]
fn a_batch_keeps_its_state_in_the_backend_and_splits_exactly() {
    let (_t, ck) = checkpoint();
    let r = Reference::new(&ck, params()).unwrap();
    let streams: Vec<Vec<u32>> = (0..3).map(|s| Rng::new(30 + s).tokens(4 * 4, 40)).collect();
    for backend in backends() {
        let m = FamModel::compile(&ck, params(), backend, &RunOptions::default()).unwrap();
        let mut batch = m.new_batch(3).unwrap();
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); 3];
        for start in (0..8).step_by(4) {
            let blocks: Vec<&[u32]> = streams.iter().map(|s| &s[start..start + 4]).collect();
            for (s, l) in m
                .step_batch(&mut batch, &blocks)
                .unwrap()
                .iter()
                .enumerate()
            {
                logits[s].extend(l.iter());
            }
        }
        assert_eq!(batch.block_indices(), &[2, 2, 2]);
        // drop the middle stream, continue the others as a batch, then split them
        batch.retain(|s| s != 1).unwrap();
        let blocks: Vec<&[u32]> = [0, 2].iter().map(|&s| &streams[s][8..12]).collect();
        for (&s, l) in [0, 2]
            .iter()
            .zip(m.step_batch(&mut batch, &blocks).unwrap())
        {
            logits[s].extend(l.iter());
        }
        let mut alone = batch.into_streams().unwrap();
        for (&s, state) in [0usize, 2].iter().zip(alone.iter_mut()) {
            assert_eq!(state.block_index(), 3);
            let l = m
                .step(std::slice::from_mut(state), &[&streams[s][12..16]])
                .unwrap();
            logits[s].extend(l[0].iter());
        }
        for s in [0usize, 2] {
            let want = r.forward(&streams[s]).unwrap();
            let diff = diff_to(&logits[s], want.iter());
            assert!(diff < 1e-4, "{backend} stream {s}: {diff}");
        }
        let want1 = r.forward(&streams[1][..8]).unwrap();
        let diff = diff_to(&logits[1], want1.iter());
        assert!(diff < 1e-4, "{backend} stream 1: {diff}");
        assert!(BatchState::from_streams(&[]).is_err());
    }
}

#[test]
fn decoding_keeps_memory_and_caches_in_the_backend() {
    let (_t, ck) = checkpoint();
    let ids = Rng::new(6).tokens(11, 40);
    let r = Reference::new(&ck, params()).unwrap();
    let want = r.forward(&ids).unwrap();
    for backend in backends() {
        let m = FamModel::compile(&ck, params(), backend, &RunOptions::default()).unwrap();
        let mut dec = FamDecoder::new(&m).unwrap();
        let addresses = |dec: &FamDecoder| -> Vec<usize> {
            dec.caches()
                .iter()
                .map(|c| c.data_address().unwrap())
                .collect()
        };
        let first = addresses(&dec);
        assert_eq!(first.len(), 2 * ck.config.num_layers);
        for (i, &t) in ids.iter().enumerate() {
            let row = dec.feed(&[t]).unwrap();
            let diff = diff_to(&row, want.row(i).iter());
            assert!(diff < 1e-4, "{backend} token {i}: {diff}");
            // each token's key and value rows are written into the same cache buffers, in the
            // backend's memory: nothing is allocated or copied per token
            assert_eq!(addresses(&dec), first, "{backend} token {i}");
            for c in dec.caches() {
                assert_eq!(c.location(), location(backend), "{backend} token {i}");
            }
        }
        assert_eq!(dec.position(), 11);
        assert_eq!(dec.state().block_index(), 2);
        assert_eq!(dec.state().location(), location(backend));
    }
}

#[test]
fn a_state_of_the_wrong_shape_is_refused_clearly() {
    let (_t, ck) = checkpoint();
    let m = FamModel::compile(&ck, params(), BackendKind::Tract, &RunOptions::default()).unwrap();
    let mut host = m.new_state().to_host().unwrap();
    let wrong = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[3, 3]));
    host[0] = wrong;
    let mut state = [famc::session::StreamState::from_host(0, host)];
    let err = m
        .step(&mut state, &[&[1, 2, 3, 4]])
        .unwrap_err()
        .to_string();
    let first = &m.manifest().state[0].input;
    assert!(
        err.contains(first.as_str()) && err.contains("[1, 3, 3]"),
        "{err}"
    );
}

#[test]
fn cli_bench_compares_backend_and_host_state_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    for backend in backends() {
        let json = tmp.path().join(format!("{backend}.json"));
        let out = famc(&[
            "bench",
            "--preset",
            "tiny",
            "--compare-state",
            "--runs",
            "2",
            "--tokens",
            "128",
            "--decode-tokens",
            "3",
            "--backend",
            backend.name(),
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let results = j["results"].as_array().unwrap();
        let configs: Vec<&str> = results
            .iter()
            .map(|r| r["config"].as_str().unwrap())
            .collect();
        assert_eq!(configs, ["fam", "fam/host-state"]);
        for r in results {
            let rep = &r["report"];
            assert_eq!(rep["prefill_tokens"], 128);
            assert_eq!(rep["runs"].as_array().unwrap().len(), 2);
            for key in [
                "prefill_tokens_per_s",
                "ms_per_block",
                "decode_tokens_per_s",
            ] {
                assert!(rep[key].as_f64().unwrap() > 0.0, "{key}: {rep}");
            }
        }
    }
}

/// Runs `f` on another thread while the caller holds `held`, and returns its result: a call that
/// queued behind one lock around the graph would never come back (the test then fails after a
/// minute instead of hanging, because `held` goes with the panic).
fn beside<T: Send>(held: famc::runtime::Checkout<'_>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || tx.send(f()).ok());
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        drop(held);
        got.expect("the second caller waited for the first one's runner")
    })
}

#[test]
fn streams_of_one_model_run_at_once_each_on_its_own_runner() {
    let (_t, ck) = checkpoint();
    let r = Reference::new(&ck, params()).unwrap();
    let opts = RunOptions {
        concurrency: Some(3),
        ..RunOptions::default()
    };
    for backend in backends() {
        let m = FamModel::compile(&ck, params(), backend, &opts).unwrap();
        let pool = m.block_runners();
        assert_eq!((pool.opened(), pool.limit()), (1, 3));

        // a stream steps while another caller holds the block graph's first runner
        let ids = Rng::new(9).tokens(4 * 5 + 1, 40);
        let got = beside(pool.checkout().unwrap(), || m.run(&ids).unwrap());
        let d = diff_to(got.as_slice().unwrap(), r.forward(&ids).unwrap().iter());
        assert!(d < 1e-4, "{backend}: beside a held runner, {d}");
        assert_eq!(
            pool.opened(),
            2,
            "{backend}: a second runner for the second caller"
        );

        // six streams on three threads: each its own logits, at most three runners
        let streams: Vec<Vec<u32>> = (0..6)
            .map(|i| Rng::new(30 + i).tokens(4 * 4 + 2, 40))
            .collect();
        std::thread::scope(|s| {
            for chunk in streams.chunks(2) {
                let m = &m;
                let r = &r;
                s.spawn(move || {
                    for ids in chunk {
                        let got = m.run(ids).unwrap();
                        let d = diff_to(got.as_slice().unwrap(), r.forward(ids).unwrap().iter());
                        assert!(d < 1e-4, "{backend}: a stream among others, {d}");
                    }
                });
            }
        });
        assert!(pool.opened() <= 3, "{backend}: {} runners", pool.opened());

        // a decoder steps while another decoder's runner is held
        let graphs = m.decode_graphs().unwrap();
        let prompt = Rng::new(11).tokens(6, 40);
        let want = r.forward(&prompt).unwrap();
        let held = graphs.decode.checkout().unwrap();
        let last = beside(held, || {
            let mut d = FamDecoder::new(&m).unwrap();
            d.feed(&prompt).unwrap()
        });
        let d = diff_to(&last, want.row(prompt.len() - 1).iter());
        assert!(d < 1e-4, "{backend}: a decoder beside a held one, {d}");

        // unset, tract lends a runner per core; ONNX Runtime as many sessions of its default
        // threads (every core) as the cores hold: one
        let m = FamModel::compile(&ck, params(), backend, &RunOptions::default()).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        let want = match backend {
            BackendKind::Tract => cores,
            BackendKind::Ort => 1,
        };
        assert_eq!(m.block_runners().limit(), want, "{backend}");
    }
}
