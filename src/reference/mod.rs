//! The pure-Rust FAM reference: FAM-SPEC sections 2 to 4 in f64, written for clarity.
//!
//! It shares no math with graph emission, so that the graphs can be checked against it.

use ndarray::{s, Array1, Array2, Array3, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::model::{Checkpoint, FamParams, LayerWeights, ModelConfig};

struct Layer {
    in_norm: Array1<f64>,
    post_norm: Array1<f64>,
    wq: Array2<f64>,
    wk: Array2<f64>,
    wv: Array2<f64>,
    wo: Array2<f64>,
    bq: Option<Array1<f64>>,
    bk: Option<Array1<f64>>,
    bv: Option<Array1<f64>>,
    bo: Option<Array1<f64>>,
    gate: Array2<f64>,
    up: Array2<f64>,
    down: Array2<f64>,
}

impl Layer {
    fn new(w: &LayerWeights) -> Self {
        let m = |a: &Array2<f32>| a.mapv(f64::from);
        let v = |a: &Array1<f32>| a.mapv(f64::from);
        Layer {
            in_norm: v(&w.input_layernorm),
            post_norm: v(&w.post_attention_layernorm),
            wq: m(&w.attn.q_proj),
            wk: m(&w.attn.k_proj),
            wv: m(&w.attn.v_proj),
            wo: m(&w.attn.o_proj),
            bq: w.attn.q_bias.as_ref().map(v),
            bk: w.attn.k_bias.as_ref().map(v),
            bv: w.attn.v_bias.as_ref().map(v),
            bo: w.attn.o_bias.as_ref().map(v),
            gate: m(&w.mlp.gate_proj),
            up: m(&w.mlp.up_proj),
            down: m(&w.mlp.down_proj),
        }
    }
}

/// One stream's state between blocks: FAM-SPEC section 2's `fam[l]` and `mem[l]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// Index τ of the next block.
    pub block_index: usize,
    /// Per layer, the FAM activations [F, d].
    pub fam: Vec<Array2<f64>>,
    /// Per layer, the post-RoPE memory keys [Hkv, n, Dh] of the last n = min(τ·L, M·L) tokens, oldest first.
    pub mem_k: Vec<Array3<f64>>,
    /// Per layer, the memory values [Hkv, n, Dh], aligned with `mem_k`.
    pub mem_v: Vec<Array3<f64>>,
}

impl StreamState {
    /// Memory keys of layer `l` laid out as the graphs carry them: [Hkv, M·L, Dh], the valid
    /// entries last and zeros before them.
    pub fn padded_mem_k(&self, l: usize, mem_len: usize) -> Array3<f64> {
        pad_front(&self.mem_k[l], mem_len)
    }

    /// Memory values of layer `l` laid out as the graphs carry them (see [`Self::padded_mem_k`]).
    pub fn padded_mem_v(&self, l: usize, mem_len: usize) -> Array3<f64> {
        pad_front(&self.mem_v[l], mem_len)
    }
}

fn pad_front(a: &Array3<f64>, len: usize) -> Array3<f64> {
    let (h, n, dh) = a.dim();
    let mut out = Array3::zeros((h, len, dh));
    out.slice_mut(s![.., len - n.., ..]).assign(a);
    out
}

/// What one block step returns.
#[derive(Debug, Clone)]
pub struct BlockOutput {
    /// Logits [T, V] of the block's tokens.
    pub logits: Array2<f64>,
    /// The state after the block; `None` for a block shorter than L, which does not advance it.
    pub next: Option<StreamState>,
}

/// The reference model: a checkpoint's weights in f64 with FAM parameters fixed.
pub struct Reference {
    cfg: ModelConfig,
    fam: FamParams,
    embed: Array2<f64>,
    lm_head: Array2<f64>,
    norm: Array1<f64>,
    layers: Vec<Layer>,
    initial_fam: Vec<Array2<f64>>,
}

impl Reference {
    /// Builds the reference and computes the initial FAM state (FAM-SPEC section 3).
    pub fn new(ck: &Checkpoint, fam: FamParams) -> Result<Self> {
        fam.validate()?;
        let cfg = ck.config.clone();
        let w = &ck.weights;
        if let Some(init) = &w.fam_init {
            if init.nrows() != fam.fam_len {
                return Err(Error::FamParams(format!(
                    "F = {} but model.fam_init has {} rows",
                    fam.fam_len,
                    init.nrows()
                )));
            }
        }
        let mut r = Reference {
            embed: w.embed_tokens.mapv(f64::from),
            lm_head: w.output_weight().mapv(f64::from),
            norm: w.norm.mapv(f64::from),
            layers: w.layers.iter().map(Layer::new).collect(),
            initial_fam: Vec::new(),
            cfg,
            fam,
        };
        let prompt = match &w.fam_init {
            Some(a) => a.mapv(f64::from),
            None => Array2::zeros((fam.fam_len, r.cfg.hidden_size)),
        };
        r.initial_fam = r.compute_initial_fam(prompt);
        Ok(r)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The FAM parameters.
    pub fn fam_params(&self) -> FamParams {
        self.fam
    }

    /// F_{-1}^0 is the prompt; F_{-1}^l is layer l-1 applied to F_{-1}^{l-1} alone, with full
    /// attention at positions -F … -1 and no memory.
    fn compute_initial_fam(&self, prompt: Array2<f64>) -> Vec<Array2<f64>> {
        let f = self.fam.fam_len;
        let mut out = Vec::with_capacity(self.layers.len());
        let mut cur = prompt;
        let start = -(f as i64);
        for (l, layer) in self.layers.iter().enumerate() {
            out.push(cur.clone());
            if l + 1 == self.layers.len() {
                break;
            }
            let (q, k, v) = self.qkv(layer, &cur, start);
            let attn = self.attention(&q, &[&k], &[&v], |_, _| true);
            let a = self.linear(&attn, &layer.wo, layer.bo.as_ref()) + &cur;
            cur = self.mlp_residual(layer, a);
        }
        out
    }

    /// The state of a new stream: block 0, the initial FAM, empty memory.
    pub fn initial_state(&self) -> StreamState {
        let kv = |_| Array3::zeros((self.cfg.num_kv_heads, 0, self.cfg.head_dim));
        StreamState {
            block_index: 0,
            fam: self.initial_fam.clone(),
            mem_k: (0..self.layers.len()).map(kv).collect(),
            mem_v: (0..self.layers.len()).map(kv).collect(),
        }
    }

    /// Runs one block of 1 ≤ T ≤ L tokens on `state`.
    pub fn step(&self, state: &StreamState, tokens: &[u32]) -> Result<BlockOutput> {
        let l_len = self.fam.block_len;
        let t = tokens.len();
        if t == 0 || t > l_len {
            return Err(Error::Input(format!(
                "a block holds 1 to {l_len} tokens, got {t}"
            )));
        }
        let d = self.cfg.hidden_size;
        let mut x = Array2::zeros((t, d));
        for (i, &id) in tokens.iter().enumerate() {
            let id = id as usize;
            if id >= self.cfg.vocab_size {
                return Err(Error::Input(format!(
                    "token id {id} at block position {i} is out of range (vocab_size {})",
                    self.cfg.vocab_size
                )));
            }
            x.row_mut(i).assign(&self.embed.row(id));
        }
        let tau = state.block_index;
        let s = (tau * l_len) as i64;
        let f = self.fam.fam_len;
        let mem_len = self.fam.mem_len();
        let mut next = StreamState {
            block_index: tau + 1,
            fam: Vec::new(),
            mem_k: Vec::new(),
            mem_v: Vec::new(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.qkv(layer, &x, s);
            let (qf, kf, vf) = self.qkv(layer, &state.fam[l], s - f as i64);
            let (mk, mv) = (&state.mem_k[l], &state.mem_v[l]);
            let n_mem = mk.dim().1;

            // Block tokens: all memory, all FAM keys, block keys j <= i.
            let attn = self.attention(&q, &[mk, &kf, &k], &[mv, &vf, &v], |i, j| {
                j < n_mem + f || j - n_mem - f <= i
            });
            let a = self.linear(&attn, &layer.wo, layer.bo.as_ref()) + &x;
            let out = self.mlp_residual(layer, a);

            if f > 0 {
                // FAM update: FAM queries see FAM keys and all block keys; no memory, no mask.
                let attn_f = self.attention(&qf, &[&kf, &k], &[&vf, &v], |_, _| true);
                let mut af = self.linear(&attn_f, &layer.wo, layer.bo.as_ref());
                if tau > 0 {
                    af += &state.fam[l];
                }
                next.fam.push(self.mlp_residual(layer, af));
            } else {
                next.fam.push(state.fam[l].clone());
            }

            let keep = |m: &Array3<f64>, new: &Array3<f64>| {
                let all =
                    ndarray::concatenate(Axis(1), &[m.view(), new.view()]).expect("same heads");
                let n = all.dim().1;
                all.slice(s![.., n - mem_len.min(n).., ..]).to_owned()
            };
            next.mem_k.push(keep(mk, &k));
            next.mem_v.push(keep(mv, &v));
            x = out;
        }
        let h = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps);
        let logits = h.dot(&self.lm_head.t());
        Ok(BlockOutput {
            logits,
            next: (t == l_len).then_some(next),
        })
    }

    /// Runs a whole sequence from the initial state, block after block; logits [len, V].
    pub fn forward(&self, tokens: &[u32]) -> Result<Array2<f64>> {
        let mut state = self.initial_state();
        let mut rows = Vec::new();
        for chunk in tokens.chunks(self.fam.block_len) {
            let out = self.step(&state, chunk)?;
            rows.push(out.logits);
            if let Some(next) = out.next {
                state = next;
            }
        }
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::Input(format!("empty token sequence: {e}")))
    }

    /// Runs one block on each of several independent streams.
    pub fn step_batch(
        &self,
        states: &[StreamState],
        tokens: &[&[u32]],
    ) -> Result<Vec<BlockOutput>> {
        if states.len() != tokens.len() {
            return Err(Error::Input(format!(
                "{} states but {} token blocks",
                states.len(),
                tokens.len()
            )));
        }
        states
            .iter()
            .zip(tokens)
            .map(|(st, t)| self.step(st, t))
            .collect()
    }

    fn linear(&self, x: &Array2<f64>, w: &Array2<f64>, b: Option<&Array1<f64>>) -> Array2<f64> {
        let y = x.dot(&w.t());
        match b {
            Some(b) => y + b,
            None => y,
        }
    }

    /// Normalised q, k, v of rows `x` at positions `start`, `start + 1`, …, RoPE applied to q and k.
    /// q: [H, T, Dh]; k, v: [Hkv, T, Dh].
    fn qkv(
        &self,
        layer: &Layer,
        x: &Array2<f64>,
        start: i64,
    ) -> (Array3<f64>, Array3<f64>, Array3<f64>) {
        let h = rms_norm(x, &layer.in_norm, self.cfg.rms_norm_eps);
        let q = self.linear(&h, &layer.wq, layer.bq.as_ref());
        let k = self.linear(&h, &layer.wk, layer.bk.as_ref());
        let v = self.linear(&h, &layer.wv, layer.bv.as_ref());
        let heads = |a: Array2<f64>, n: usize| split_heads(a.view(), n, self.cfg.head_dim);
        let mut q = heads(q, self.cfg.num_heads);
        let mut k = heads(k, self.cfg.num_kv_heads);
        let v = heads(v, self.cfg.num_kv_heads);
        self.rope(&mut q, start);
        self.rope(&mut k, start);
        (q, k, v)
    }

    fn rope(&self, x: &mut Array3<f64>, start: i64) {
        let dh = self.cfg.head_dim;
        let half = dh / 2;
        let theta = self.cfg.rope_theta;
        for t in 0..x.dim().1 {
            let p = (start + t as i64) as f64;
            for j in 0..half {
                let angle = p * theta.powf(-2.0 * j as f64 / dh as f64);
                let (sin, cos) = angle.sin_cos();
                for h in 0..x.dim().0 {
                    let x1 = x[[h, t, j]];
                    let x2 = x[[h, t, j + half]];
                    x[[h, t, j]] = x1 * cos - x2 * sin;
                    x[[h, t, j + half]] = x2 * cos + x1 * sin;
                }
            }
        }
    }

    /// Attention of q [H, Tq, Dh] over the concatenation of key/value segments [Hkv, n_i, Dh];
    /// `visible(i, j)` says whether query i sees key j of the concatenation. Returns [Tq, H·Dh].
    fn attention(
        &self,
        q: &Array3<f64>,
        keys: &[&Array3<f64>],
        values: &[&Array3<f64>],
        visible: impl Fn(usize, usize) -> bool,
    ) -> Array2<f64> {
        let (n_heads, tq, dh) = q.dim();
        let k_views: Vec<_> = keys.iter().map(|k| k.view()).collect();
        let v_views: Vec<_> = values.iter().map(|v| v.view()).collect();
        let k = ndarray::concatenate(Axis(1), &k_views).expect("same kv heads");
        let v = ndarray::concatenate(Axis(1), &v_views).expect("same kv heads");
        let nk = k.dim().1;
        let group = self.cfg.group_size();
        let scale = 1.0 / (dh as f64).sqrt();
        let mut out = Array2::zeros((tq, n_heads * dh));
        for h in 0..n_heads {
            let kh = k.index_axis(Axis(0), h / group);
            let vh = v.index_axis(Axis(0), h / group);
            for i in 0..tq {
                let qi = q.slice(s![h, i, ..]);
                let mut scores: Vec<Option<f64>> = (0..nk)
                    .map(|j| visible(i, j).then(|| qi.dot(&kh.row(j)) * scale))
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut total = 0.0;
                for sc in scores.iter_mut().flatten() {
                    *sc = (*sc - max).exp();
                    total += *sc;
                }
                let mut row = out.slice_mut(s![i, h * dh..(h + 1) * dh]);
                for (j, sc) in scores.iter().enumerate() {
                    if let Some(p) = sc {
                        row.scaled_add(p / total, &vh.row(j));
                    }
                }
            }
        }
        out
    }

    /// a + MLP(RMSNorm(a; post_attention_layernorm)).
    fn mlp_residual(&self, layer: &Layer, a: Array2<f64>) -> Array2<f64> {
        let z = rms_norm(&a, &layer.post_norm, self.cfg.rms_norm_eps);
        let gate = z.dot(&layer.gate.t()).mapv(|g| g / (1.0 + (-g).exp()));
        let up = z.dot(&layer.up.t());
        let m = (gate * up).dot(&layer.down.t());
        a + m
    }
}

fn rms_norm(x: &Array2<f64>, w: &Array1<f64>, eps: f64) -> Array2<f64> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        row.zip_mut_with(w, |v, w| *v = *v * inv * w);
    }
    out
}

/// [T, n·Dh] -> [n, T, Dh]
fn split_heads(a: ArrayView2<f64>, n: usize, dh: usize) -> Array3<f64> {
    let t = a.nrows();
    let mut out = Array3::zeros((n, t, dh));
    for h in 0..n {
        out.slice_mut(s![h, .., ..])
            .assign(&a.slice(s![.., h * dh..(h + 1) * dh]));
    }
    out
}
