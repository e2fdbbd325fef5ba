//! How a linear layer `x · Wᵀ (+ bias)` is spelled for each weight dtype: a MatMul against an
//! f32/f16/bf16 matrix, `com.microsoft.MatMulNBits` over q8/q4 blocks, or with int8
//! activations a standard `MatMulInteger` over int8 rows.

use ndarray::{Array1, Array2, Axis};

use super::{quant, Activations, Emitter, WeightDtype, MS_DOMAIN};
use crate::builder::{Attr, DType, GraphBuilder, TensorData, Value};
use crate::error::Result;

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

/// Which of a model's products a linear layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Product {
    /// q, k and v (packed or not).
    Qkv,
    /// The attention output's projection.
    Out,
    /// The MLP's gate and up projections.
    GateUp,
    /// The MLP's down projection.
    Down,
    /// An untied output head.
    Head,
}

impl Product {
    /// Whether `--activations int8` quantizes this product's input. Measured on SmolLM2
    /// (docs/BENCHMARKS.md): int8 q/k/v inputs move attention's sharp scores, and down_proj's
    /// input (SiLU(gate)·up) has outlier channels that coarsen every row's step; those, and the
    /// head, keep q8 blocks over f32 activations.
    fn int8_activations(self) -> bool {
        matches!(self, Product::Out | Product::GateUp)
    }
}

/// `x · Wᵀ` in int8: W [N, K] with 7-bit codes as [`quant::quantize_rows`] gives them
/// (initializers `<name>.codes` [K, N] int8 and `<name>.scales` [N]), each row of `x` quantized
/// around its own absolute maximum, s = max |x| / 127, to uint8 codes round(x / s) + 128 (zero
/// point 128, so that runtimes take their u8·s8 kernels), and the int32 products rescaled by s
/// and the weight scales. A row's result depends on that row alone, whatever else is batched
/// with it.
fn int8_linear(b: &mut GraphBuilder, x: &Value, name: &str, w: &Array2<f32>) -> Result<Value> {
    let (n, k) = w.dim();
    let q = quant::quantize_rows(w);
    let codes = b.weight(
        &format!("{name}.codes"),
        TensorData::from_i8(&q.codes, &[k as i64, n as i64]),
    )?;
    let scales = b.weight(
        &format!("{name}.scales"),
        TensorData::from_f32(&q.scales, &[n as i64]),
    )?;
    let (xq, xs) = b.scoped("quantize", |b| {
        let abs = b.op("Abs", &[x], vec![], DType::F32);
        let max = b.reduce_max(&abs, &[-1], true);
        let step = b.scalar_f32(1.0 / 127.0);
        let s = b.mul(&max, &step);
        // an all-zero row keeps a finite step and quantizes to zeros
        let tiny = b.scalar_f32(f32::MIN_POSITIVE);
        let s = b.op("Max", &[&s, &tiny], vec![], DType::F32);
        let r = b.div(x, &s);
        let r = b.op("Round", &[&r], vec![], DType::F32);
        let mid = b.scalar_f32(128.0);
        let r = b.add(&r, &mid);
        let (lo, hi) = (b.scalar_f32(1.0), b.scalar_f32(255.0));
        let r = b.op("Clip", &[&r, &lo, &hi], vec![], DType::F32);
        (b.cast(&r, DType::U8), s)
    });
    let zero = b.scalar(DType::U8, 128.0);
    let acc = b.op("MatMulInteger", &[&xq, &codes, &zero], vec![], DType::I32);
    let y = b.cast(&acc, DType::F32);
    let y = b.mul(&y, &xs);
    Ok(b.mul(&y, &scales))
}

/// The `MatMulNBits` node `x · Wᵀ` for W [N, K] of `bits`-bit `codes` and `scales` (no zero
/// points), `[k, n]` = [K, N].
pub(super) fn nbits_node(
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
pub(super) fn quantized_weight(
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

/// A weight matrix initializer in `dtype`, as stored (not cast).
pub(super) fn store_matrix(
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
pub(super) fn to_f32(b: &mut GraphBuilder, x: Value) -> Value {
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

pub(super) fn weight_vec(
    b: &mut GraphBuilder,
    name: &str,
    v: &ndarray::Array1<f32>,
) -> Result<Value> {
    let data: Vec<f32> = v.iter().copied().collect();
    Ok(b.weight(name, TensorData::from_f32(&data, &[data.len() as i64]))?)
}

impl Emitter<'_> {
    pub(super) fn linear(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        product: Product,
        name: &str,
        w: &Array2<f32>,
        bias: Option<&ndarray::Array1<f32>>,
    ) -> Result<Value> {
        let y = match (self.spec.activations, self.spec.weight_dtype.bits()) {
            (Activations::Int8, _) if product.int8_activations() => int8_linear(b, x, name, w)?,
            (_, Some(bits)) => matmul_nbits(b, x, name, w, bits, self.spec.accuracy_level)?,
            (_, None) => {
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

    /// `x` through the matrices of `parts` stacked into one [ΣNᵢ, K] (one product, and for q4 one
    /// sum of `x`'s blocks), cut back into each part's output; a missing bias is zeros.
    pub(super) fn packed_linear(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        product: Product,
        name: &str,
        parts: &[(&Array2<f32>, Option<&Array1<f32>>)],
    ) -> Result<Vec<Value>> {
        let views: Vec<_> = parts.iter().map(|(w, _)| w.view()).collect();
        let w = ndarray::concatenate(Axis(0), &views)
            .map_err(|e| crate::Error::Input(format!("{name}: the parts differ in inputs: {e}")))?;
        let bias = parts.iter().any(|(_, bias)| bias.is_some()).then(|| {
            let mut all = Vec::with_capacity(w.nrows());
            for (w, bias) in parts {
                match bias {
                    Some(bias) => all.extend(bias.iter().copied()),
                    None => all.extend(std::iter::repeat_n(0.0, w.nrows())),
                }
            }
            Array1::from(all)
        });
        let y = self.linear(b, x, product, name, &w, bias.as_ref())?;
        let sizes: Vec<i64> = parts.iter().map(|(w, _)| w.nrows() as i64).collect();
        Ok(b.split(&y, -1, &sizes))
    }
}
