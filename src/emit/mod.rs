//! Emission of the FAM graphs: the block graph and the init graph (docs/graph-contract.md).
//!
//! Each layer runs the F FAM rows and the T block rows as one sequence of F + T rows at positions
//! s − F … s + T − 1, so the FAM and block projections share one MatMul each. One additive mask
//! gives both attention patterns of FAM-SPEC section 2: FAM rows see every FAM and block key and
//! no memory; block rows see the valid memory, every FAM key and the block keys up to their own.

use ndarray::Array2;

use crate::builder::{Attr, DType, Dim, GraphBuilder, TensorData, Value};
use crate::error::Result;
use crate::model::{FamParams, LayerWeights, LlamaWeights, ModelConfig};
use crate::onnx::{self, DEFAULT_OPSET};

/// Additive mask value for hidden keys: finite, so no row ever turns into NaN.
const MASKED: f32 = -1e9;

/// One turn of a rotary angle in the fixed point of `Emitter::rope_tables`: 2^52.
const TURN: i64 = 1 << 52;
/// Width of the limbs `Emitter::rope_tables` splits each frequency into.
const LIMB_BITS: u32 = 26;

pub mod quant;
pub mod triton;

/// Names of graph inputs and outputs (docs/graph-contract.md).
pub mod names {
    pub const INPUT_IDS: &str = "input_ids";
    pub const BLOCK_INDEX: &str = "block_index";
    pub const LOGITS: &str = "logits";

    pub fn fam(l: usize) -> String {
        format!("fam.{l}")
    }
    pub fn mem_k(l: usize) -> String {
        format!("mem_k.{l}")
    }
    pub fn mem_v(l: usize) -> String {
        format!("mem_v.{l}")
    }
    /// The output carrying the next value of state input `input`.
    pub fn next(input: &str) -> String {
        format!("next_{input}")
    }
    pub fn init_fam(l: usize) -> String {
        format!("init_fam.{l}")
    }
    pub const POSITION: &str = "position";
    pub fn fam_k(l: usize) -> String {
        format!("fam_k.{l}")
    }
    pub fn fam_v(l: usize) -> String {
        format!("fam_v.{l}")
    }
    pub fn cache_k(l: usize) -> String {
        format!("cache_k.{l}")
    }
    pub fn cache_v(l: usize) -> String {
        format!("cache_v.{l}")
    }
}

/// Symbolic dimension names.
pub const BATCH: &str = "batch";
/// The block's token count, 1 ≤ T ≤ L.
pub const TOKENS: &str = "T";

/// What the emitter needs to know about the model.
pub struct EmitSpec<'a> {
    pub config: &'a ModelConfig,
    pub weights: &'a LlamaWeights,
    pub fam: FamParams,
    /// How weight matrices are stored; computation is f32 whatever this is.
    pub weight_dtype: WeightDtype,
    /// `MatMulNBits`' `accuracy_level` for q8/q4 (1: f32 compute; 4: int8 compute).
    pub accuracy_level: i64,
    /// Where initializers over the given size go as they are emitted; `None` keeps them in
    /// the graphs.
    pub store: Option<(crate::builder::SharedStore, usize)>,
}

/// A builder for graph `name`, writing large weights into `spec`'s store when it has one.
fn builder(spec: &EmitSpec, name: &str) -> GraphBuilder {
    let mut b = GraphBuilder::new(name, DEFAULT_OPSET);
    if let Some((store, threshold)) = &spec.store {
        b.set_store(store.clone(), *threshold);
    }
    b
}

/// `com.microsoft` (ONNX Runtime's contrib operators), version 1.
const MS_DOMAIN: &str = "com.microsoft";

/// `x · Wᵀ` for `w` [N, K] quantized to `bits` as `MatMulNBits` (initializers `<name>.codes`,
/// `<name>.scales`) plus, for 4 bits, the blocks' offsets (`<name>.offsets`, see [`quant`]).
fn matmul_nbits(
    b: &mut GraphBuilder,
    x: &Value,
    name: &str,
    w: &Array2<f32>,
    bits: u32,
    accuracy_level: i64,
) -> Result<Value> {
    let (q, codes, scales) = quantized_weight(b, name, w, bits)?;
    let y = nbits_node(b, x, &codes, &scales, [q.k, q.n], bits, accuracy_level);
    let Some(offsets) = &q.offsets else {
        return Ok(y);
    };
    // the blocks' offsets times the block sums of x [B, Q, K / 32]
    let blocks = q.blocks() as i64;
    let c = b.weight(
        &format!("{name}.offsets"),
        TensorData::from_f32(offsets, &[blocks, q.n as i64]),
    )?;
    let xb = b.reshape(x, &[0, 0, blocks, quant::BLOCK as i64]);
    let axes = b.vec_i64(&[-1]);
    let sums = b.op(
        "ReduceSum",
        &[&xb, &axes],
        vec![Attr::int("keepdims", 0)],
        DType::F32,
    );
    let shift = b.matmul(&sums, &c);
    Ok(b.add(&y, &shift))
}

/// The `MatMulNBits` node `x · Wᵀ` for W [N, K] of `bits`-bit `codes` and `scales` (no zero
/// points), `[k, n]` = [K, N].
fn nbits_node(
    b: &mut GraphBuilder,
    x: &Value,
    codes: &Value,
    scales: &Value,
    [k, n]: [usize; 2],
    bits: u32,
    accuracy_level: i64,
) -> Value {
    let attrs = vec![
        Attr::int("K", k as i64),
        Attr::int("N", n as i64),
        Attr::int("bits", bits as i64),
        Attr::int("block_size", quant::BLOCK as i64),
        Attr::int("accuracy_level", accuracy_level),
    ];
    b.op_in_domain(
        MS_DOMAIN,
        1,
        "MatMulNBits",
        &[Some(x), Some(codes), Some(scales)],
        attrs,
        DType::F32,
    )
}

/// `w` quantized, with its codes [N, K/32, blob] and scales [N·K/32] as initializers (the
/// returned `Quantized` keeps the rest: dims and 4-bit offsets; its codes are moved out).
fn quantized_weight(
    b: &mut GraphBuilder,
    name: &str,
    w: &Array2<f32>,
    bits: u32,
) -> Result<(quant::Quantized, Value, Value)> {
    let (n, k) = w.dim();
    if !k.is_multiple_of(quant::BLOCK) {
        return Err(crate::Error::Input(format!(
            "{name}: {k} inputs per row; q8 and q4 quantize in blocks of {} along the inputs, so hidden_size and intermediate_size must be multiples of {}",
            quant::BLOCK,
            quant::BLOCK
        )));
    }
    let mut q = quant::quantize(w, bits);
    let dims = vec![n as i64, q.blocks() as i64, q.blob() as i64];
    let codes = b.weight(
        &format!("{name}.codes"),
        TensorData::new(DType::U8, dims, std::mem::take(&mut q.codes))?,
    )?;
    let scales = b.weight(
        &format!("{name}.scales"),
        TensorData::from_f32(&q.scales, &[q.scales.len() as i64]),
    )?;
    Ok((q, codes, scales))
}

/// Element type of the stored weight matrices (embedding, projections, MLP, output head).
///
/// Half-precision matrices are cast to f32 where they are used, so RMSNorm statistics, softmax,
/// residual sums and logits stay f32; ONNX Runtime folds those casts when it loads the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    BF16,
    /// Blockwise int8 (`com.microsoft.MatMulNBits`, 8 bits); the embedding int8 too.
    Q8,
    /// Blockwise int4 (`com.microsoft.MatMulNBits`, 4 bits, with a per-block offset); the
    /// embedding and a tied head int8.
    Q4,
}

impl WeightDtype {
    /// `f32`, `f16`, `bf16`, `q8` or `q4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Q8 => "q8",
            WeightDtype::Q4 => "q4",
        }
    }

    /// The code width of a quantized dtype (`None` for the float ones).
    pub fn bits(self) -> Option<u32> {
        match self {
            WeightDtype::Q8 => Some(8),
            WeightDtype::Q4 => Some(4),
            _ => None,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::BF16),
            "q8" => Ok(WeightDtype::Q8),
            "q4" => Ok(WeightDtype::Q4),
            other => Err(crate::Error::Input(format!(
                "unknown dtype `{other}` (f32, f16, bf16, q8 or q4)"
            ))),
        }
    }
}

fn sym(name: &str) -> Dim {
    Dim::Sym(name.to_string())
}

fn fixed(n: usize) -> Dim {
    Dim::Fixed(n as i64)
}

/// A weight matrix initializer in `dtype`, as stored (not cast).
fn store_matrix(
    b: &mut GraphBuilder,
    name: &str,
    data: &[f32],
    dims: [i64; 2],
    dtype: WeightDtype,
) -> Result<Value> {
    let t = match dtype {
        WeightDtype::F32 => TensorData::from_f32(data, &dims),
        WeightDtype::F16 => {
            let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
            TensorData::from_f16(&h, &dims)
        }
        WeightDtype::BF16 => {
            let h: Vec<half::bf16> = data.iter().map(|&v| half::bf16::from_f32(v)).collect();
            TensorData::from_bf16(&h, &dims)
        }
        WeightDtype::Q8 | WeightDtype::Q4 => TensorData::from_f32(data, &dims),
    };
    Ok(b.weight(name, t)?)
}

/// `x` as f32 (no node when it already is).
fn to_f32(b: &mut GraphBuilder, x: Value) -> Value {
    if x.dtype == DType::F32 {
        x
    } else {
        b.cast(&x, DType::F32)
    }
}

/// The transposed matrix [in, out] as an f32 value, so that `x · Wᵀ` is one MatMul.
fn weight_t(
    b: &mut GraphBuilder,
    name: &str,
    w: &Array2<f32>,
    dtype: WeightDtype,
) -> Result<Value> {
    let t = w.t();
    let data: Vec<f32> = t.iter().copied().collect();
    let stored = store_matrix(b, name, &data, [t.nrows() as i64, t.ncols() as i64], dtype)?;
    Ok(to_f32(b, stored))
}

fn weight_vec(b: &mut GraphBuilder, name: &str, v: &ndarray::Array1<f32>) -> Result<Value> {
    let data: Vec<f32> = v.iter().copied().collect();
    Ok(b.weight(name, TensorData::from_f32(&data, &[data.len() as i64]))?)
}

struct Emitter<'a> {
    spec: &'a EmitSpec<'a>,
}

/// Rotary tables for a run of rows: cos and sin, each [B, 1, Q, Dh].
struct Rope {
    cos: Value,
    sin: Value,
}

impl<'a> Emitter<'a> {
    fn cfg(&self) -> &ModelConfig {
        self.spec.config
    }

    /// RMSNorm(x; w) over the last axis.
    fn rms_norm(&self, b: &mut GraphBuilder, x: &Value, w: &Value) -> Value {
        b.scoped("norm", |b| {
            let sq = b.mul(x, x);
            let ms = b.reduce_mean(&sq, &[-1], true);
            let eps = b.scalar_f32(self.cfg().rms_norm_eps as f32);
            let var = b.add(&ms, &eps);
            let rms = b.sqrt(&var);
            let inv = b.reciprocal(&rms);
            let y = b.mul(x, &inv);
            b.mul(&y, w)
        })
    }

    /// cos/sin tables for integer positions [B, Q], exact at any position below
    /// [`MAX_POSITION`](crate::model::MAX_POSITION): each angle p·θ_j is reduced modulo one turn in int64 arithmetic before
    /// it becomes an f32, so the angle's error stays about 1e-6 rad instead of growing with p
    /// (p·θ_j formed in f32 is off by 0.06 rad at p = 10^6).
    ///
    /// With V_j = round(2^52·θ_j / 2π) = hi_j·2^26 + lo_j, the angle in turns is
    /// (|p|·V_j mod 2^52) / 2^52, computed as ((|p|·hi_j mod 2^26)·2^26 + (|p|·lo_j mod 2^52))
    /// mod 2^52: every product stays below 2^63 while |p| < 2^37. A negative position negates
    /// the sine.
    fn rope_tables(&self, b: &mut GraphBuilder, positions: &Value) -> Rope {
        b.scoped("rope", |b| {
            let dh = self.cfg().head_dim;
            let theta = self.cfg().rope_theta;
            let (hi, lo): (Vec<i64>, Vec<i64>) = (0..dh / 2)
                .map(|j| {
                    let inv_freq = theta.powf(-2.0 * j as f64 / dh as f64);
                    let v = (inv_freq / std::f64::consts::TAU * TURN as f64).round() as i64;
                    (v >> LIMB_BITS, v & ((1 << LIMB_BITS) - 1))
                })
                .unzip();
            let half = (dh / 2) as i64;
            let hi = b.const_i64(&hi, &[half]);
            let lo = b.const_i64(&lo, &[half]);
            let pos = b.unsqueeze(positions, &[-1]); // [B, Q, 1]
            let abs = b.op("Abs", &[&pos], vec![], DType::I64);
            let limb = b.scalar_i64(1 << LIMB_BITS);
            let turn = b.scalar_i64(TURN);
            let modulo = |b: &mut GraphBuilder, x: &Value, m: &Value| {
                let q = b.div(x, m);
                let qm = b.mul(&q, m);
                b.sub(x, &qm)
            };
            let h = b.mul(&abs, &hi);
            let h = modulo(b, &h, &limb);
            let h = b.mul(&h, &limb);
            let l = b.mul(&abs, &lo);
            let l = modulo(b, &l, &turn);
            let r = b.add(&h, &l);
            let r = modulo(b, &r, &turn); // [B, Q, Dh/2], in 2^-52 turns
            let r = b.cast(&r, DType::F32);
            let scale = b.scalar_f32((std::f64::consts::TAU / TURN as f64) as f32);
            let angles = b.mul(&r, &scale);
            let emb = b.concat(&[&angles, &angles], -1);
            let emb = b.unsqueeze(&emb, &[1]);
            let zero = b.scalar_i64(0);
            let negative = b.less(positions, &zero);
            let negative = b.unsqueeze(&negative, &[1, 3]); // [B, 1, Q, 1]
            let sin = b.sin(&emb);
            let neg_sin = b.neg(&sin);
            Rope {
                cos: b.cos(&emb),
                sin: b.where_(&negative, &neg_sin, &sin),
            }
        })
    }

    /// x·cos + rotate_half(x)·sin for x [B, heads, Q, Dh].
    fn apply_rope(&self, b: &mut GraphBuilder, x: &Value, rope: &Rope) -> Value {
        let half = (self.cfg().head_dim / 2) as i64;
        let x1 = b.slice(x, &[0], &[half], &[-1], None);
        let x2 = b.slice(x, &[half], &[i64::MAX], &[-1], None);
        let nx2 = b.neg(&x2);
        let rot = b.concat(&[&nx2, &x1], -1);
        let a = b.mul(x, &rope.cos);
        let c = b.mul(&rot, &rope.sin);
        b.add(&a, &c)
    }

    /// [B, Q, heads·Dh] → [B, heads, Q, Dh]
    fn split_heads(&self, b: &mut GraphBuilder, x: &Value, heads: usize) -> Value {
        let dh = self.cfg().head_dim as i64;
        let r = b.reshape(x, &[0, 0, heads as i64, dh]);
        b.transpose(&r, &[0, 2, 1, 3])
    }

    fn linear(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        name: &str,
        w: &Array2<f32>,
        bias: Option<&ndarray::Array1<f32>>,
    ) -> Result<Value> {
        let y = match self.spec.weight_dtype.bits() {
            Some(bits) => matmul_nbits(b, x, name, w, bits, self.spec.accuracy_level)?,
            None => {
                let wt = weight_t(b, &format!("{name}.weight"), w, self.spec.weight_dtype)?;
                b.matmul(x, &wt)
            }
        };
        Ok(match bias {
            Some(bias) => {
                let bv = weight_vec(b, &format!("{name}.bias"), bias)?;
                b.add(&y, &bv)
            }
            None => y,
        })
    }

    /// RMSNorm and the q, k, v projections of rows [B, Q, d], RoPE applied by `rope`: q
    /// [B, H, Q, Dh] (scaled by 1/√Dh, when `with_q`), k and v [B, Hkv, Q, Dh].
    fn project(
        &self,
        b: &mut GraphBuilder,
        lw: &LayerWeights,
        rows: &Value,
        rope: &Rope,
        with_q: bool,
    ) -> Result<(Option<Value>, Value, Value)> {
        let cfg = self.cfg();
        let (h, hkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let w_in = weight_vec(b, "input_layernorm.weight", &lw.input_layernorm)?;
        let x = self.rms_norm(b, rows, &w_in);
        let a = &lw.attn;
        let q = if with_q {
            let q = self.linear(b, &x, "q_proj", &a.q_proj, a.q_bias.as_ref())?;
            let q = self.split_heads(b, &q, h);
            let q = self.apply_rope(b, &q, rope);
            let scale = b.scalar_f32((1.0 / (dh as f64).sqrt()) as f32);
            Some(b.mul(&q, &scale))
        } else {
            None
        };
        let k = self.linear(b, &x, "k_proj", &a.k_proj, a.k_bias.as_ref())?;
        let v = self.linear(b, &x, "v_proj", &a.v_proj, a.v_bias.as_ref())?;
        let k = self.split_heads(b, &k, hkv);
        let v = self.split_heads(b, &v, hkv);
        let k = self.apply_rope(b, &k, rope);
        Ok((q, k, v))
    }

    /// One decoder layer over rows [B, Q, d].
    ///
    /// `keys` turns the rows' own post-RoPE keys and values [B, Hkv, Q, Dh] into the keys and
    /// values attended to (memory, FAM and caches around them), plus any extra values the caller
    /// wants back; `mask`: additive, [B or 1, 1, G·Q, keys], the [Q, keys] pattern repeated for
    /// each of the G query heads that share a key/value head; `residual`: what the attention
    /// output is added to. Returns the layer output [B, Q, d], the rows' keys and values, and the
    /// extras.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn layer(
        &self,
        b: &mut GraphBuilder,
        lw: &LayerWeights,
        rows: &Value,
        rope: &Rope,
        keys: impl FnOnce(&mut GraphBuilder, &Value, &Value) -> (Value, Value, Vec<Value>),
        mask: Option<&Value>,
        residual: &Value,
    ) -> Result<(Value, Value, Value, Vec<Value>)> {
        let cfg = self.cfg();
        let (h, hkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (attn_out, k, v, extras) = b.scoped("attn", |b| -> Result<_> {
            let (q, k, v) = self.project(b, lw, rows, rope, true)?;
            let q = q.expect("asked for q");
            let (keys, values, extras) = keys(b, &k, &v);
            // GQA without repeating keys: a key/value head's G query heads are one run of G·Q
            // rows, so every MatMul is rank 4.
            let qg = b.reshape(&q, &[0, hkv as i64, -1, dh as i64]); // [B, Hkv, G·Q, Dh]
            let kt = b.transpose(&keys, &[0, 1, 3, 2]);
            let scores = b.matmul(&qg, &kt); // [B, Hkv, G·Q, N]
            let scores = match mask {
                Some(m) => b.add(&scores, m),
                None => scores,
            };
            let p = b.softmax(&scores, -1);
            let o = b.matmul(&p, &values); // [B, Hkv, G·Q, Dh]
            let o = b.reshape(&o, &[0, h as i64, -1, dh as i64]);
            let o = b.transpose(&o, &[0, 2, 1, 3]);
            let o = b.reshape(&o, &[0, 0, (h * dh) as i64]);
            let a = &lw.attn;
            let o = self.linear(b, &o, "o_proj", &a.o_proj, a.o_bias.as_ref())?;
            Ok((o, k, v, extras))
        })?;
        let a = b.add(&attn_out, residual);
        let out = b.scoped("mlp", |b| -> Result<Value> {
            let w_post = weight_vec(
                b,
                "post_attention_layernorm.weight",
                &lw.post_attention_layernorm,
            )?;
            let z = self.rms_norm(b, &a, &w_post);
            let m = &lw.mlp;
            let g = self.linear(b, &z, "gate_proj", &m.gate_proj, None)?;
            let u = self.linear(b, &z, "up_proj", &m.up_proj, None)?;
            let sg = b.sigmoid(&g);
            let silu = b.mul(&g, &sg);
            let gu = b.mul(&silu, &u);
            let down = self.linear(b, &gu, "down_proj", &m.down_proj, None)?;
            Ok(b.add(&a, &down))
        })?;
        Ok((out, k, v, extras))
    }

    /// Logits [B, Q, V] of the last layer's rows.
    fn head(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value> {
        let w = self.spec.weights;
        let (vocab, d) = w.embed_tokens.dim();
        let quantized = self.spec.weight_dtype.bits().is_some();
        let embed = match (&w.lm_head, quantized) {
            (None, false) => Some(self.embedding(b)?),
            _ => None,
        };
        let embed_q8 = match (&w.lm_head, quantized) {
            (None, true) => Some(self.embedding_q8(b)?),
            _ => None,
        };
        b.scoped("head", |b| -> Result<Value> {
            let norm = weight_vec(b, "norm.weight", &w.norm)?;
            let h = self.rms_norm(b, x, &norm);
            if let Some((codes, scales)) = embed_q8 {
                // a tied head reads the embedding's int8 blocks: one copy serves both
                let acc = self.spec.accuracy_level;
                return Ok(nbits_node(b, &h, &codes, &scales, [d, vocab], 8, acc));
            }
            let Some(embed) = embed else {
                return self.linear(b, &h, "lm_head", w.output_weight(), None);
            };
            // A tied head reads the embedding's own [V, d] initializer, so the matrix is stored
            // and held once: Gemm's transB takes it as it is, where a MatMul would need a
            // transposed copy (one more matrix in memory once a runtime folds the Transpose).
            let e = to_f32(b, embed);
            let rows = b.reshape(&h, &[-1, d as i64]);
            let logits = b.op(
                "Gemm",
                &[&rows, &e],
                vec![Attr::int("transB", 1)],
                DType::F32,
            );
            let lead = b.op(
                "Shape",
                &[&h],
                vec![Attr::int("start", 0), Attr::int("end", 2)],
                DType::I64,
            );
            let v = b.vec_i64(&[vocab as i64]);
            let shape = b.concat(&[&lead, &v], 0);
            Ok(b.reshape_to(&logits, &shape))
        })
    }

    /// The embedding matrix [V, d] as stored; one initializer per graph, which a tied head
    /// shares.
    fn embedding(&self, b: &mut GraphBuilder) -> Result<Value> {
        const NAME: &str = "embed_tokens.weight";
        if let Some(v) = b.initializer_value(NAME) {
            return Ok(v);
        }
        let w = self.spec.weights;
        let (v, d) = w.embed_tokens.dim();
        let data: Vec<f32> = w.embed_tokens.iter().copied().collect();
        store_matrix(b, NAME, &data, [v as i64, d as i64], self.spec.weight_dtype)
    }

    /// The embedding's 8-bit blocks (codes [V, d/32, 32], scales [V·d/32]), as an 8-bit
    /// `MatMulNBits` weight reads them; one pair per graph.
    fn embedding_q8(&self, b: &mut GraphBuilder) -> Result<(Value, Value)> {
        const NAME: &str = "embed_tokens";
        if let (Some(c), Some(s)) = (
            b.initializer_value("embed_tokens.codes"),
            b.initializer_value("embed_tokens.scales"),
        ) {
            return Ok((c, s));
        }
        let (_, codes, scales) = quantized_weight(b, NAME, &self.spec.weights.embed_tokens, 8)?;
        Ok((codes, scales))
    }

    fn embed(&self, b: &mut GraphBuilder, ids: &Value) -> Result<Value> {
        if self.spec.weight_dtype.bits().is_some() {
            // int8 rows: (code - 128) · the row's per-block scale
            let d = self.cfg().hidden_size as i64;
            let blocks = d / quant::BLOCK as i64;
            let (codes, scales) = self.embedding_q8(b)?;
            let rows = b.gather(&codes, ids, 0); // [B, T, d/32, 32]
            let rows = b.cast(&rows, DType::F32);
            let mid = b.scalar_f32(128.0);
            let rows = b.sub(&rows, &mid);
            let s = b.reshape(&scales, &[-1, blocks, 1]);
            let s = b.gather(&s, ids, 0); // [B, T, d/32, 1]
            let rows = b.mul(&rows, &s);
            let lead = b.shape(ids);
            let d_1 = b.vec_i64(&[d]);
            let shape = b.concat(&[&lead, &d_1], 0);
            return Ok(b.reshape_to(&rows, &shape));
        }
        let embed = self.embedding(b)?;
        // gather before the cast, so only the block's rows are converted
        let rows = b.gather(&embed, ids, 0);
        Ok(to_f32(b, rows))
    }
}

/// The block graph: one block of up to L tokens for a batch of streams, state in and out.
pub fn block_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let w = spec.weights;
    let p = spec.fam;
    p.validate()?;
    let (d, hkv, dh, v_size) = (
        cfg.hidden_size,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (f, ml, l_len) = (p.fam_len, p.mem_len(), p.block_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_block");
    let ids = b.input(names::INPUT_IDS, DType::I64, vec![sym(BATCH), sym(TOKENS)]);
    let block_index = b.input(names::BLOCK_INDEX, DType::I64, vec![sym(BATCH)]);
    let mut state_in = Vec::new();
    for l in 0..cfg.num_layers {
        let fam = (f > 0).then(|| {
            b.input(
                &names::fam(l),
                DType::F32,
                vec![sym(BATCH), fixed(f), fixed(d)],
            )
        });
        let mem = (ml > 0).then(|| {
            let shape = vec![sym(BATCH), fixed(hkv), fixed(ml), fixed(dh)];
            (
                b.input(&names::mem_k(l), DType::F32, shape.clone()),
                b.input(&names::mem_v(l), DType::F32, shape),
            )
        });
        state_in.push((fam, mem));
    }

    // Positions, masks and the first-update factor, shared by every layer.
    let (rope, mask, first_factor) = b.scoped("block", |b| {
        let shape = b.shape(&ids);
        let one = b.scalar_i64(1);
        let t = b.gather(&shape, &one, 0);
        let f_c = b.scalar_i64(f as i64);
        let q_len = b.add(&t, &f_c);
        let zero = b.scalar_i64(0);
        let rows = b.range(&zero, &q_len, &one); // [Q]
        let l_c = b.scalar_i64(l_len as i64);
        let start = b.mul(&block_index, &l_c);
        let first_pos = b.sub(&start, &f_c);
        let first_pos = b.unsqueeze(&first_pos, &[1]); // [B, 1]
        let pos_i = b.add(&first_pos, &rows); // [B, Q]
        let rope = em.rope_tables(b, &pos_i);

        // self part: row i sees row j when i < F (a FAM row) or j <= i, the latter written as
        // pos_j <= pos_i on the [B, Q] positions: tract mis-evaluates masks that depend on T alone.
        let pos_row = b.unsqueeze(&pos_i, &[2]); // [B, Q, 1]
        let pos_col = b.unsqueeze(&pos_i, &[1]); // [B, 1, Q]
        let future = b.less(&pos_row, &pos_col);
        let causal = b.op("Not", &[&future], vec![], DType::Bool); // [B, Q, Q]
        let is_fam_row = (f > 0).then(|| {
            let row_col = b.unsqueeze(&rows, &[1]); // [Q, 1]
            b.less(&row_col, &f_c)
        });
        let self_vis = match &is_fam_row {
            Some(fam_row) => b.op("Or", &[fam_row, &causal], vec![], DType::Bool),
            None => causal,
        };
        let masked = b.scalar_f32(MASKED);
        let open = b.scalar_f32(0.0);
        let vis = if ml > 0 {
            // memory slot j is valid when j >= M·L − min(τ·L, M·L); only block rows see it
            let ml_c = b.scalar_i64(ml as i64);
            let valid = b.op("Min", &[&start, &ml_c], vec![], DType::I64);
            let first_valid = b.sub(&ml_c, &valid); // [B]
            let first_valid = b.unsqueeze(&first_valid, &[1, 2]); // [B, 1, 1]
            let slots: Vec<i64> = (0..ml as i64).collect();
            let slots = b.const_i64(&slots, &[1, 1, ml as i64]);
            let slot_ok = b.op(
                "GreaterOrEqual",
                &[&slots, &first_valid],
                vec![],
                DType::Bool,
            ); // [B, 1, ML]
            let mem_vis = match &is_fam_row {
                Some(fam_row) => {
                    let is_block_row = b.op("Not", &[fam_row], vec![], DType::Bool); // [Q, 1]
                    b.op("And", &[&slot_ok, &is_block_row], vec![], DType::Bool)
                }
                None => slot_ok,
            };
            let batch = b.shape(&block_index);
            let q1 = b.unsqueeze(&q_len, &[0]);
            let ml_1 = b.vec_i64(&[ml as i64]);
            let mem_shape = b.concat(&[&batch, &q1, &ml_1], 0);
            let mem_vis = b.expand(&mem_vis, &mem_shape); // [B, Q, ML]
            b.concat(&[&mem_vis, &self_vis], 2) // [B, Q, ML + Q]
        } else {
            self_vis
        };
        let m = b.where_(&vis, &open, &masked);
        let mask = b.unsqueeze(&m, &[1]); // [B, 1, Q, keys]
        let group = cfg.group_size() as i64;
        let mask = if group > 1 {
            // rows of a key/value head's G query heads run as G·Q rows (see `Emitter::layer`)
            let reps = b.vec_i64(&[1, 1, group, 1]);
            b.op("Tile", &[&mask, &reps], vec![], DType::F32)
        } else {
            mask
        };
        let first_factor = (f > 0).then(|| {
            let later = b.greater(&block_index, &zero);
            let later = b.cast(&later, DType::F32);
            b.unsqueeze(&later, &[1, 2]) // [B, 1, 1]
        });
        (rope, mask, first_factor)
    });

    let mut x = em.embed(&mut b, &ids)?; // [B, T, d]
    for (l, lw) in w.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}"));
        let (fam, mem) = &state_in[l];
        let (rows, residual) = match (fam, &first_factor) {
            (Some(fam), Some(factor)) => {
                let rows = b.concat(&[fam, &x], 1);
                let fam_res = b.mul(fam, factor);
                let residual = b.concat(&[&fam_res, &x], 1);
                (rows, residual)
            }
            _ => (x.clone(), x.clone()),
        };
        let with_memory = |b: &mut GraphBuilder, k: &Value, v: &Value| match mem {
            Some((mk, mv)) => (b.concat(&[mk, k], 2), b.concat(&[mv, v], 2), Vec::new()),
            None => (k.clone(), v.clone(), Vec::new()),
        };
        let (out, k, v, _) = em.layer(
            &mut b,
            lw,
            &rows,
            &rope,
            with_memory,
            Some(&mask),
            &residual,
        )?;
        if fam.is_some() {
            let next_fam = b.slice(&out, &[0], &[f as i64], &[1], None);
            b.output_with_shape(
                &next_fam,
                &names::next(&names::fam(l)),
                vec![sym(BATCH), fixed(f), fixed(d)],
            );
            x = b.slice(&out, &[f as i64], &[i64::MAX], &[1], None);
        } else {
            x = out;
        }
        if let Some((mk, mv)) = mem {
            let shape = vec![sym(BATCH), fixed(hkv), fixed(ml), fixed(dh)];
            for (memory, new, input) in [(mk, &k, &names::mem_k(l)), (mv, &v, &names::mem_v(l))] {
                let block_part = if f > 0 {
                    b.slice(new, &[f as i64], &[i64::MAX], &[2], None)
                } else {
                    new.clone()
                };
                let all = b.concat(&[memory, &block_part], 2);
                let kept = b.slice(&all, &[-(ml as i64)], &[i64::MAX], &[2], None);
                b.output_with_shape(&kept, &names::next(input), shape.clone());
            }
        }
        b.pop_scope();
    }
    let logits = em.head(&mut b, &x)?;
    b.output_with_shape(
        &logits,
        names::LOGITS,
        vec![sym(BATCH), sym(TOKENS), fixed(v_size)],
    );
    reorder_outputs(b.finish()?)
}

/// Puts `logits` first, then the state outputs layer by layer, as the contract lists them.
fn reorder_outputs(mut m: onnx::ModelProto) -> Result<onnx::ModelProto> {
    if let Some(g) = m.graph.as_mut() {
        let pos = g.output.iter().position(|o| o.name == names::LOGITS);
        if let Some(i) = pos {
            let logits = g.output.remove(i);
            g.output.insert(0, logits);
        }
    }
    Ok(m)
}

/// The init graph: no inputs; outputs `init_fam.{l}` [F, d] for every layer (FAM-SPEC section 3).
pub fn init_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let w = spec.weights;
    let (f, d) = (spec.fam.fam_len, cfg.hidden_size);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_init");
    let prompt: Vec<f32> = match &w.fam_init {
        Some(a) => a.iter().copied().collect(),
        None => vec![0.0; f * d],
    };
    let mut cur = b.weight(
        "fam_init",
        TensorData::from_f32(&prompt, &[1, f as i64, d as i64]),
    )?;
    let positions: Vec<i64> = (0..f as i64).map(|i| i - f as i64).collect();
    let pos = b.const_i64(&positions, &[1, f as i64]);
    let rope = b.scoped("init", |b| em.rope_tables(b, &pos));
    for (l, lw) in w.layers.iter().enumerate() {
        let out = b.squeeze(&cur, &[0]);
        b.output_with_shape(&out, &names::init_fam(l), vec![fixed(f), fixed(d)]);
        if l + 1 == w.layers.len() {
            break;
        }
        b.push_scope(&format!("layers.{l}"));
        let own = |_: &mut GraphBuilder, k: &Value, v: &Value| (k.clone(), v.clone(), Vec::new());
        let (next, _, _, _) = em.layer(&mut b, lw, &cur, &rope, own, None, &cur)?;
        b.pop_scope();
        cur = next;
    }
    Ok(b.finish()?)
}

/// The FAM keys/values graph: from each layer's FAM state and the block index, the post-RoPE FAM
/// keys and values [B, Hkv, F, Dh] that every token of the block attends to. The decode graph
/// takes them as inputs, so they are computed once per block rather than once per token.
pub fn fam_kv_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let p = spec.fam;
    let (d, hkv, dh, f) = (cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, p.fam_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_fam_kv");
    let block_index = b.input(names::BLOCK_INDEX, DType::I64, vec![sym(BATCH)]);
    let fams: Vec<Value> = (0..cfg.num_layers)
        .map(|l| {
            b.input(
                &names::fam(l),
                DType::F32,
                vec![sym(BATCH), fixed(f), fixed(d)],
            )
        })
        .collect();
    let rope = b.scoped("fam", |b| {
        let l_c = b.scalar_i64(p.block_len as i64);
        let start = b.mul(&block_index, &l_c);
        let start = b.unsqueeze(&start, &[1]); // [B, 1]
        let offsets: Vec<i64> = (0..f as i64).map(|i| i - f as i64).collect();
        let offsets = b.const_i64(&offsets, &[1, f as i64]);
        let pos = b.add(&start, &offsets);
        em.rope_tables(b, &pos)
    });
    let shape = vec![sym(BATCH), fixed(hkv), fixed(f), fixed(dh)];
    for (l, lw) in spec.weights.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}.attn"));
        let (_, k, v) = em.project(&mut b, lw, &fams[l], &rope, false)?;
        b.pop_scope();
        b.output_with_shape(&k, &names::fam_k(l), shape.clone());
        b.output_with_shape(&v, &names::fam_v(l), shape.clone());
    }
    Ok(b.finish()?)
}

/// The decode graph: one token per stream at absolute position `position`, attending to the
/// valid memory, the block's FAM keys/values and the in-block key/value cache.
///
/// Inputs: `input_ids` [B, 1], `position` [B], then per layer `fam_k.{l}`, `fam_v.{l}`
/// [B, Hkv, F, Dh] (F > 0), `mem_k.{l}`, `mem_v.{l}` [B, Hkv, M·L, Dh] (M > 0), `cache_k.{l}`,
/// `cache_v.{l}` [B, Hkv, L, Dh]. Outputs: `logits` [B, 1, V] and per layer `next_cache_k.{l}`,
/// `next_cache_v.{l}`: the cache with slot `position mod L` holding this token's key and value.
pub fn decode_graph(spec: &EmitSpec) -> Result<onnx::ModelProto> {
    let cfg = spec.config;
    let p = spec.fam;
    p.validate()?;
    let (hkv, dh, v_size) = (cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
    let (f, ml, l_len) = (p.fam_len, p.mem_len(), p.block_len);
    let em = Emitter { spec };
    let mut b = builder(spec, "famc_decode");
    let ids = b.input(names::INPUT_IDS, DType::I64, vec![sym(BATCH), fixed(1)]);
    let position = b.input(names::POSITION, DType::I64, vec![sym(BATCH)]);
    let kv_shape = |n: usize| vec![sym(BATCH), fixed(hkv), fixed(n), fixed(dh)];
    struct LayerIn {
        fam: Option<(Value, Value)>,
        mem: Option<(Value, Value)>,
        cache: (Value, Value),
    }
    let mut layer_in = Vec::new();
    for l in 0..cfg.num_layers {
        let fam = (f > 0).then(|| {
            (
                b.input(&names::fam_k(l), DType::F32, kv_shape(f)),
                b.input(&names::fam_v(l), DType::F32, kv_shape(f)),
            )
        });
        let mem = (ml > 0).then(|| {
            (
                b.input(&names::mem_k(l), DType::F32, kv_shape(ml)),
                b.input(&names::mem_v(l), DType::F32, kv_shape(ml)),
            )
        });
        let cache = (
            b.input(&names::cache_k(l), DType::F32, kv_shape(l_len)),
            b.input(&names::cache_v(l), DType::F32, kv_shape(l_len)),
        );
        layer_in.push(LayerIn { fam, mem, cache });
    }

    let (rope, slot_is_new, mask) = b.scoped("decode", |b| {
        let l_c = b.scalar_i64(l_len as i64);
        let tau = b.div(&position, &l_c); // [B]
        let start = b.mul(&tau, &l_c);
        let in_block = b.sub(&position, &start); // [B]
        let pos = b.unsqueeze(&position, &[1]); // [B, 1]
        let rope = em.rope_tables(b, &pos);
        let slots: Vec<i64> = (0..l_len as i64).collect();
        let slots = b.const_i64(&slots, &[1, l_len as i64]);
        let i = b.unsqueeze(&in_block, &[1]); // [B, 1]
        let slot_is_new = b.equal(&slots, &i); // [B, L]
        let slot_is_new = b.unsqueeze(&slot_is_new, &[1, 3]); // [B, 1, L, 1]
        let future = b.greater(&slots, &i);
        let cache_vis = b.op("Not", &[&future], vec![], DType::Bool); // [B, L]
        let open = b.scalar_f32(0.0);
        let masked = b.scalar_f32(MASKED);
        let mut parts = Vec::new();
        if ml > 0 {
            let ml_c = b.scalar_i64(ml as i64);
            let valid = b.op("Min", &[&start, &ml_c], vec![], DType::I64);
            let first_valid = b.sub(&ml_c, &valid);
            let first_valid = b.unsqueeze(&first_valid, &[1]); // [B, 1]
            let mslots: Vec<i64> = (0..ml as i64).collect();
            let mslots = b.const_i64(&mslots, &[1, ml as i64]);
            let mem_vis = b.op(
                "GreaterOrEqual",
                &[&mslots, &first_valid],
                vec![],
                DType::Bool,
            );
            parts.push(b.where_(&mem_vis, &open, &masked));
        }
        if f > 0 {
            // every FAM key is visible: zeros, broadcast over the batch by the concat below
            let batch = b.shape(&position);
            let f_1 = b.vec_i64(&[f as i64]);
            let full = b.concat(&[&batch, &f_1], 0);
            parts.push(b.expand(&open, &full));
        }
        parts.push(b.where_(&cache_vis, &open, &masked));
        let refs: Vec<&Value> = parts.iter().collect();
        let m = b.concat(&refs, 1); // [B, N]
        let mask = b.unsqueeze(&m, &[1, 2]); // [B, 1, 1, N]
        (rope, slot_is_new, mask)
    });

    let mut x = em.embed(&mut b, &ids)?; // [B, 1, d]
    for (l, lw) in spec.weights.layers.iter().enumerate() {
        b.push_scope(&format!("layers.{l}"));
        let li = &layer_in[l];
        let assemble = |b: &mut GraphBuilder, k: &Value, v: &Value| {
            let new_k = b.where_(&slot_is_new, k, &li.cache.0);
            let new_v = b.where_(&slot_is_new, v, &li.cache.1);
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            if let Some((mk, mv)) = &li.mem {
                ks.push(mk.clone());
                vs.push(mv.clone());
            }
            if let Some((fk, fv)) = &li.fam {
                ks.push(fk.clone());
                vs.push(fv.clone());
            }
            ks.push(new_k.clone());
            vs.push(new_v.clone());
            let keys = b.concat(&ks.iter().collect::<Vec<_>>(), 2);
            let values = b.concat(&vs.iter().collect::<Vec<_>>(), 2);
            (keys, values, vec![new_k, new_v])
        };
        let (out, _, _, extras) = em.layer(&mut b, lw, &x, &rope, assemble, Some(&mask), &x)?;
        b.pop_scope();
        b.output_with_shape(
            &extras[0],
            &names::next(&names::cache_k(l)),
            kv_shape(l_len),
        );
        b.output_with_shape(
            &extras[1],
            &names::next(&names::cache_v(l)),
            kv_shape(l_len),
        );
        x = out;
    }
    let logits = em.head(&mut b, &x)?;
    b.output_with_shape(
        &logits,
        names::LOGITS,
        vec![sym(BATCH), fixed(1), fixed(v_size)],
    );
    reorder_outputs(b.finish()?)
}
