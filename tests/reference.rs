//! The pure-Rust reference against Hugging Face's logits and an independent naive FAM.

mod common;

use common::*;
use famc::model::{Checkpoint, FamParams};
use famc::reference::Reference;

fn params(l: usize, f: usize, m: usize) -> FamParams {
    FamParams {
        block_len: l,
        fam_len: f,
        mem_blocks: m,
    }
}

#[test]
fn matches_hugging_face_when_memory_covers_the_input() {
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let ids = hf_tiny_ids();
    let hf = hf_tiny_logits();
    assert_eq!(hf.dim(), (ids.len(), ck.config.vocab_size));
    for l in [1usize, 7, 16, 33, 64, 100, 128] {
        let m = ids.len().div_ceil(l);
        let r = Reference::new(&ck, params(l, 0, m)).unwrap();
        let ours = r.forward(&ids).unwrap();
        let hf64 = hf.mapv(f64::from);
        let diff = max_abs_diff(ours.iter(), hf64.iter());
        assert!(diff < 1e-4, "L={l} M={m}: max abs diff {diff}");
    }
}

#[test]
fn bswa_without_memory_is_an_independent_causal_window() {
    // RoPE is relative, so a block with F = 0 and M = 0 gives the logits of its tokens alone.
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let ids = hf_tiny_ids();
    let l = 16;
    let bswa = Reference::new(&ck, params(l, 0, 0))
        .unwrap()
        .forward(&ids)
        .unwrap();
    let whole = Reference::new(&ck, params(l, 0, 0)).unwrap();
    for (b, chunk) in ids.chunks(l).enumerate() {
        let alone = whole.forward(chunk).unwrap();
        let rows = bswa.slice(ndarray::s![b * l..b * l + chunk.len(), ..]);
        let diff = max_abs_diff(rows.iter(), alone.iter());
        assert!(diff < 1e-9, "block {b}: {diff}");
    }
    // and it differs from full attention beyond the first block
    let full = hf_tiny_logits().mapv(f64::from);
    let diff = max_abs_diff(
        bswa.slice(ndarray::s![l.., ..]).iter(),
        full.slice(ndarray::s![l.., ..]).iter(),
    );
    assert!(diff > 1e-2);
}

#[test]
fn split_invariance_and_prefixes() {
    let spec = Spec {
        fam_init_rows: Some(3),
        ..Spec::default()
    };
    let (_tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let r = Reference::new(&ck, params(5, 3, 2)).unwrap();
    let ids = Rng::new(11).tokens(27, spec.vocab as u32);
    let whole = r.forward(&ids).unwrap();

    // block by block through the state API
    let mut state = r.initial_state();
    let mut row = 0;
    for chunk in ids.chunks(5) {
        let out = r.step(&state, chunk).unwrap();
        let diff = max_abs_diff(
            out.logits.iter(),
            whole.slice(ndarray::s![row..row + chunk.len(), ..]).iter(),
        );
        assert_eq!(diff, 0.0, "rows {row}..");
        row += chunk.len();
        match out.next {
            Some(next) => {
                assert_eq!(next.block_index, state.block_index + 1);
                state = next;
            }
            None => assert!(chunk.len() < 5),
        }
    }
    // memory holds min(τL, ML) entries
    assert_eq!(state.mem_k[0].dim(), (spec.kv_heads, 10, spec.head_dim));

    // every prefix's logits are the first rows of the whole
    for n in [1, 4, 5, 6, 13, 26] {
        let p = r.forward(&ids[..n]).unwrap();
        let diff = max_abs_diff(p.iter(), whole.slice(ndarray::s![..n, ..]).iter());
        assert!(diff < 1e-12, "prefix {n}: {diff}");
    }

    // a batch of independent streams equals each alone
    let other = Rng::new(12).tokens(5, spec.vocab as u32);
    let s0 = r.initial_state();
    let batch = r
        .step_batch(&[s0.clone(), s0], &[&ids[..5], &other])
        .unwrap();
    assert_eq!(
        batch[0].logits,
        r.step(&r.initial_state(), &ids[..5]).unwrap().logits
    );
    assert_eq!(
        batch[1].logits,
        r.step(&r.initial_state(), &other).unwrap().logits
    );
}

#[test]
fn rejects_bad_blocks() {
    let (_tmp, dir, _) = temp_checkpoint(&Spec::default());
    let ck = Checkpoint::load(&dir).unwrap();
    let r = Reference::new(&ck, params(4, 2, 1)).unwrap();
    let st = r.initial_state();
    assert!(r.step(&st, &[]).is_err());
    assert!(r.step(&st, &[1, 2, 3, 4, 5]).is_err());
    let e = r.step(&st, &[1, 40]).unwrap_err().to_string();
    assert!(e.contains("40") && e.contains("position 1"), "{e}");
    assert!(Reference::new(&ck, params(0, 2, 1)).is_err());
}

// ---------------------------------------------------------------------------------------------
// An independent, deliberately naive FAM: plain Vec<f64> loops over explicit key lists.

struct NaiveLayer {
    in_norm: Vec<f64>,
    post_norm: Vec<f64>,
    q: Vec<Vec<f64>>,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    o: Vec<Vec<f64>>,
    bq: Option<Vec<f64>>,
    bk: Option<Vec<f64>>,
    bv: Option<Vec<f64>>,
    gate: Vec<Vec<f64>>,
    up: Vec<Vec<f64>>,
    down: Vec<Vec<f64>>,
}

/// One attention entry: key heads and value heads.
type KvRef<'a> = (&'a Vec<Vec<f64>>, &'a Vec<Vec<f64>>);

struct Naive {
    spec: Spec,
    embed: Vec<Vec<f64>>,
    head: Vec<Vec<f64>>,
    norm: Vec<f64>,
    layers: Vec<NaiveLayer>,
    prompt: Vec<Vec<f64>>,
}

fn matvec(w: &[Vec<f64>], x: &[f64], b: Option<&Vec<f64>>) -> Vec<f64> {
    w.iter()
        .enumerate()
        .map(|(i, row)| {
            row.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + b.map_or(0.0, |b| b[i])
        })
        .collect()
}

fn rmsnorm(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms: f64 = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    x.iter()
        .zip(w)
        .map(|(v, w)| v / (ms + 1e-5).sqrt() * w)
        .collect()
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

impl Naive {
    fn new(spec: &Spec, t: &Tensors) -> Self {
        let opt = |n: String| t.has(&n).then(|| t.vector(&n));
        let layers = (0..spec.layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                NaiveLayer {
                    in_norm: t.vector(&format!("{p}input_layernorm.weight")),
                    post_norm: t.vector(&format!("{p}post_attention_layernorm.weight")),
                    q: t.matrix(&format!("{p}self_attn.q_proj.weight")),
                    k: t.matrix(&format!("{p}self_attn.k_proj.weight")),
                    v: t.matrix(&format!("{p}self_attn.v_proj.weight")),
                    o: t.matrix(&format!("{p}self_attn.o_proj.weight")),
                    bq: opt(format!("{p}self_attn.q_proj.bias")),
                    bk: opt(format!("{p}self_attn.k_proj.bias")),
                    bv: opt(format!("{p}self_attn.v_proj.bias")),
                    gate: t.matrix(&format!("{p}mlp.gate_proj.weight")),
                    up: t.matrix(&format!("{p}mlp.up_proj.weight")),
                    down: t.matrix(&format!("{p}mlp.down_proj.weight")),
                }
            })
            .collect();
        let embed = t.matrix("model.embed_tokens.weight");
        let head = if spec.tie {
            embed.clone()
        } else {
            t.matrix("lm_head.weight")
        };
        let prompt = match spec.fam_init_rows {
            Some(_) => t.matrix("model.fam_init"),
            None => Vec::new(),
        };
        Naive {
            spec: spec.clone(),
            embed,
            head,
            norm: t.vector("model.norm.weight"),
            layers,
            prompt,
        }
    }

    /// Rotates one head vector to position p.
    fn rope(&self, x: &[f64], p: i64) -> Vec<f64> {
        let dh = x.len();
        let mut out = vec![0.0; dh];
        for j in 0..dh / 2 {
            let freq = 1.0 / self.spec.rope_theta.powf((2 * j) as f64 / dh as f64);
            let (s, c) = ((p as f64) * freq).sin_cos();
            out[j] = x[j] * c - x[j + dh / 2] * s;
            out[j + dh / 2] = x[j + dh / 2] * c + x[j] * s;
        }
        out
    }

    /// (q heads, k heads, v heads) of one row at position p.
    #[allow(clippy::type_complexity)]
    fn project(
        &self,
        ly: &NaiveLayer,
        x: &[f64],
        p: i64,
    ) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let h = rmsnorm(x, &ly.in_norm);
        let dh = self.spec.head_dim;
        let q = matvec(&ly.q, &h, ly.bq.as_ref());
        let k = matvec(&ly.k, &h, ly.bk.as_ref());
        let v = matvec(&ly.v, &h, ly.bv.as_ref());
        let q = q.chunks(dh).map(|c| self.rope(c, p)).collect();
        let k = k.chunks(dh).map(|c| self.rope(c, p)).collect();
        let v = v.chunks(dh).map(|c| c.to_vec()).collect();
        (q, k, v)
    }

    /// One query row over an explicit list of (k heads, v heads) entries, then o_proj.
    fn attend(&self, ly: &NaiveLayer, q: &[Vec<f64>], entries: &[KvRef]) -> Vec<f64> {
        let dh = self.spec.head_dim;
        let group = self.spec.heads / self.spec.kv_heads;
        let mut concat = Vec::new();
        for (h, qh) in q.iter().enumerate() {
            let g = h / group;
            let scores: Vec<f64> = entries
                .iter()
                .map(|(k, _)| {
                    qh.iter().zip(&k[g]).map(|(a, b)| a * b).sum::<f64>() / (dh as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut o = vec![0.0; dh];
            for (w, (_, v)) in e.iter().zip(entries) {
                for (oi, vi) in o.iter_mut().zip(&v[g]) {
                    *oi += w / z * vi;
                }
            }
            concat.extend(o);
        }
        matvec(&ly.o, &concat, None)
    }

    fn mlp(&self, ly: &NaiveLayer, a: &[f64]) -> Vec<f64> {
        let z = rmsnorm(a, &ly.post_norm);
        let g = matvec(&ly.gate, &z, None);
        let u = matvec(&ly.up, &z, None);
        let hmid: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        add(a, &matvec(&ly.down, &hmid, None))
    }

    fn logits(&self, x: &[f64]) -> Vec<f64> {
        matvec(&self.head, &rmsnorm(x, &self.norm), None)
    }

    fn run(&self, ids: &[u32], l_len: usize, f: usize, m: usize) -> Vec<Vec<f64>> {
        let n = self.spec.layers;
        type Kv = (Vec<Vec<f64>>, Vec<Vec<f64>>);
        // initial FAM per layer
        let mut fam: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut cur = if self.prompt.is_empty() {
            vec![vec![0.0; self.spec.hidden]; f]
        } else {
            self.prompt.clone()
        };
        for ly in &self.layers {
            fam.push(cur.clone());
            let proj: Vec<_> = cur
                .iter()
                .enumerate()
                .map(|(i, x)| self.project(ly, x, i as i64 - f as i64))
                .collect();
            let entries: Vec<_> = proj.iter().map(|(_, k, v)| (k, v)).collect();
            cur = cur
                .iter()
                .zip(&proj)
                .map(|(x, (q, _, _))| self.mlp(ly, &add(&self.attend(ly, q, &entries), x)))
                .collect();
        }
        let mut memory: Vec<Vec<Kv>> = vec![Vec::new(); n];
        let mut out = Vec::new();
        for (tau, block) in ids.chunks(l_len).enumerate() {
            let s = (tau * l_len) as i64;
            let mut xs: Vec<Vec<f64>> = block
                .iter()
                .map(|&id| self.embed[id as usize].clone())
                .collect();
            for (l, ly) in self.layers.iter().enumerate() {
                let proj: Vec<_> = xs
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.project(ly, x, s + i as i64))
                    .collect();
                let fproj: Vec<_> = fam[l]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.project(ly, x, s - f as i64 + i as i64))
                    .collect();
                let mut new_xs = Vec::new();
                for (i, x) in xs.iter().enumerate() {
                    let mut entries: Vec<_> = memory[l].iter().map(|(k, v)| (k, v)).collect();
                    entries.extend(fproj.iter().map(|(_, k, v)| (k, v)));
                    entries.extend(proj[..=i].iter().map(|(_, k, v)| (k, v)));
                    let a = add(&self.attend(ly, &proj[i].0, &entries), x);
                    new_xs.push(self.mlp(ly, &a));
                }
                if block.len() == l_len {
                    let mut entries: Vec<_> = fproj.iter().map(|(_, k, v)| (k, v)).collect();
                    entries.extend(proj.iter().map(|(_, k, v)| (k, v)));
                    let new_fam: Vec<Vec<f64>> = fproj
                        .iter()
                        .enumerate()
                        .map(|(i, (q, _, _))| {
                            let mut af = self.attend(ly, q, &entries);
                            if tau > 0 {
                                af = add(&af, &fam[l][i]);
                            }
                            self.mlp(ly, &af)
                        })
                        .collect();
                    fam[l] = new_fam;
                    memory[l].extend(proj.iter().map(|(_, k, v)| (k.clone(), v.clone())));
                    let excess = memory[l].len().saturating_sub(m * l_len);
                    memory[l].drain(..excess);
                }
                xs = new_xs;
            }
            out.extend(xs.iter().map(|x| self.logits(x)));
        }
        out
    }
}

fn check_against_naive(spec: Spec, l: usize, f: usize, m: usize, len: usize) {
    let (_tmp, dir, tensors) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let ids = Rng::new(spec.seed + 100).tokens(len, spec.vocab as u32);
    let ours = Reference::new(&ck, params(l, f, m))
        .unwrap()
        .forward(&ids)
        .unwrap();
    let naive = Naive::new(&spec, &tensors).run(&ids, l, f, m);
    let flat: Vec<f64> = naive.into_iter().flatten().collect();
    let diff = max_abs_diff(ours.iter(), flat.iter());
    assert!(diff < 1e-9, "{spec:?} L={l} F={f} M={m}: {diff}");
}

#[test]
fn fam_matches_an_independent_naive_computation() {
    check_against_naive(
        Spec {
            fam_init_rows: Some(2),
            ..Spec::default()
        },
        4,
        2,
        1,
        19,
    );
    check_against_naive(
        Spec {
            fam_init_rows: Some(3),
            qkv_bias: true,
            ..Spec::default()
        },
        3,
        3,
        2,
        14,
    );
    // zero FAM prompt, MQA, tied embeddings, no memory
    check_against_naive(
        Spec {
            kv_heads: 1,
            tie: true,
            layers: 3,
            ..Spec::default()
        },
        5,
        2,
        0,
        17,
    );
    // memory larger than the input, F = 1
    check_against_naive(
        Spec {
            kv_heads: 4,
            seed: 3,
            ..Spec::default()
        },
        2,
        1,
        20,
        9,
    );
}
