//! How a linear layer `x · Wᵀ (+ bias)` is spelled for each weight dtype: a MatMul against an
//! f32/f16/bf16 matrix, or `com.microsoft.MatMulNBits` over q8/q4 blocks.

use ndarray::{Array1, Array2, Axis};

use super::{quant, Emitter, WeightDtype, MS_DOMAIN};
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

    /// `x` through the matrices of `parts` stacked into one [ΣNᵢ, K] (one product, and for q4 one
    /// sum of `x`'s blocks), cut back into each part's output; a missing bias is zeros.
    pub(super) fn packed_linear(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
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
        let y = self.linear(b, x, name, &w, bias.as_ref())?;
        let sizes: Vec<i64> = parts.iter().map(|(w, _)| w.nrows() as i64).collect();
        Ok(b.split(&y, -1, &sizes))
    }
}
