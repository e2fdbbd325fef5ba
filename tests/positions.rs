//! Rotary positions far into a stream: streams that start at block indices near 10^6 / L and
//! 2^31 / L, through the block graph and the decode graphs on every backend, against the f64
//! reference started from the same state. With angles formed in f32 these positions are off by
//! 0.06 rad (10^6) and by whole radians (2^31).

mod common;

use common::*;
use famc::generate::{FamDecoder, LanguageModel};
use famc::model::{Checkpoint, FamParams, MAX_POSITION};
use famc::reference::{self, Reference};
use famc::runtime::RunOptions;
use famc::session::{FamModel, StreamState};
use ndarray::{Array2, Array3, ArrayD};

const P: FamParams = FamParams {
    block_len: 6,
    fam_len: 2,
    mem_blocks: 2,
};

fn spec() -> Spec {
    Spec {
        hidden: 32,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        inter: 40,
        fam_init_rows: Some(2),
        seed: 31,
        ..Spec::default()
    }
}

/// A reference state at block `tau` with random FAM rows and a full memory.
fn random_state(r: &Reference, tau: usize, seed: u64) -> reference::StreamState {
    let cfg = r.config();
    let (f, ml) = (P.fam_len, P.mem_len());
    let mut rng = Rng::new(seed);
    let mut uniform = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| f64::from(rng.uniform()) * 2.0 - 1.0)
            .collect()
    };
    let kv = (cfg.num_kv_heads, ml, cfg.head_dim);
    let layers = cfg.num_layers;
    reference::StreamState {
        block_index: tau,
        fam: (0..layers)
            .map(|_| Array2::from_shape_vec((f, cfg.hidden_size), uniform(f * cfg.hidden_size)))
            .collect::<Result<_, _>>()
            .unwrap(),
        mem_k: (0..layers)
            .map(|_| Array3::from_shape_vec(kv, uniform(kv.0 * kv.1 * kv.2)))
            .collect::<Result<_, _>>()
            .unwrap(),
        mem_v: (0..layers)
            .map(|_| Array3::from_shape_vec(kv, uniform(kv.0 * kv.1 * kv.2)))
            .collect::<Result<_, _>>()
            .unwrap(),
    }
}

/// The same state as famc's host arrays, in the order of the model's state list.
fn host_state(m: &FamModel, rs: &reference::StreamState) -> StreamState {
    let tensors = m
        .manifest()
        .state
        .iter()
        .map(|st| {
            let a: ArrayD<f64> = match st.kind.name() {
                "fam" => rs.fam[st.layer].clone().into_dyn(),
                "mem_k" => rs.padded_mem_k(st.layer, P.mem_len()).into_dyn(),
                _ => rs.padded_mem_v(st.layer, P.mem_len()).into_dyn(),
            };
            a.mapv(|x| x as f32)
        })
        .collect();
    StreamState::from_host(rs.block_index, tensors)
}

fn block_indices() -> [usize; 2] {
    [
        1_000_000 / P.block_len,
        (1usize << 31) / P.block_len - 2, // its third block reaches past 2^31
    ]
}

#[test]
fn blocks_far_into_a_stream_equal_the_reference() {
    let (_tmp, dir, _) = temp_checkpoint(&spec());
    let ck = Checkpoint::load(&dir).unwrap();
    let r = Reference::new(&ck, P).unwrap();
    let ids = Rng::new(5).tokens(3 * P.block_len - 2, 40);
    for (target, backend) in every_target_and_backend() {
        let m = FamModel::compile_for(&ck, P, target, backend, &RunOptions::default()).unwrap();
        for (n, tau) in block_indices().into_iter().enumerate() {
            let mut rs = random_state(&r, tau, n as u64);
            let mut gs = [host_state(&m, &rs)];
            for block in ids.chunks(P.block_len) {
                let want = r.step(&rs, block).unwrap();
                let got = m.step(&mut gs, &[block]).unwrap();
                let diff = max_abs_diff(got[0].mapv(f64::from).iter(), want.logits.iter());
                assert!(
                    diff < 1e-4,
                    "{target} {backend} block {}: {diff}",
                    rs.block_index
                );
                if let Some(next) = want.next {
                    rs = next;
                }
            }
            // the state carried through both full blocks is the reference's
            let want = host_state(&m, &rs);
            for (st, (g, w)) in m
                .manifest()
                .state
                .iter()
                .zip(gs[0].to_host().unwrap().iter().zip(want.to_host().unwrap()))
            {
                let diff = max_abs_diff_f32(g.iter(), w.iter());
                assert!(
                    diff < 1e-4,
                    "{target} {backend} τ {tau} {}: {diff}",
                    st.input
                );
            }
        }
    }
}

#[test]
fn decoding_far_into_a_stream_equals_the_reference() {
    let (_tmp, dir, _) = temp_checkpoint(&spec());
    let ck = Checkpoint::load(&dir).unwrap();
    let r = Reference::new(&ck, P).unwrap();
    let ids = Rng::new(6).tokens(P.block_len + 3, 40);
    for (target, backend) in every_target_and_backend() {
        let m = FamModel::compile_for(&ck, P, target, backend, &RunOptions::default()).unwrap();
        for (n, tau) in block_indices().into_iter().enumerate() {
            let rs = random_state(&r, tau, 10 + n as u64);
            let first = r.step(&rs, &ids[..P.block_len]).unwrap();
            let second = r
                .step(first.next.as_ref().unwrap(), &ids[P.block_len..])
                .unwrap();
            let mut dec = FamDecoder::from_state(&m, host_state(&m, &rs)).unwrap();
            for (i, &id) in ids.iter().enumerate() {
                let got = dec.feed(&[id]).unwrap();
                let want = if i < P.block_len {
                    first.logits.row(i)
                } else {
                    second.logits.row(i - P.block_len)
                };
                let got: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
                let diff = max_abs_diff(got.iter(), want.iter());
                assert!(diff < 1e-4, "{target} {backend} τ {tau} token {i}: {diff}");
            }
        }
    }
}

#[test]
fn positions_past_the_rotary_limit_are_refused() {
    let (_tmp, dir, _) = temp_checkpoint(&spec());
    let ck = Checkpoint::load(&dir).unwrap();
    let r = Reference::new(&ck, P).unwrap();
    let last = (MAX_POSITION as usize) / P.block_len - 1;
    // the refusal is the session's, before any graph runs: one target per backend suffices
    for backend in backends() {
        let m = FamModel::compile(&ck, P, backend, &RunOptions::default()).unwrap();
        let mut ok = [host_state(&m, &random_state(&r, last, 1))];
        m.step(&mut ok, &[&[1, 2, 3, 4, 5, 6]]).unwrap();
        // the next block would end past the limit
        let err = m.step(&mut ok, &[&[1]]).unwrap_err().to_string();
        assert!(err.contains("2^36"), "{backend}: {err}");
        let mut dec =
            FamDecoder::from_state(&m, host_state(&m, &random_state(&r, last + 1, 2))).unwrap();
        let err = dec.feed(&[1]).unwrap_err().to_string();
        assert!(err.contains("2^36"), "{backend}: {err}");
    }
}
