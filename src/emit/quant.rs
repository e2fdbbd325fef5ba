//! Weight-only block quantization of a matrix, in the layout of ONNX Runtime's
//! `com.microsoft.MatMulNBits`: each output row's K inputs in blocks of [`BLOCK`], one scale per
//! block; codes are unsigned, and a code stands for `(code - 128) * scale` (8 bits) or
//! `(code - 8) * scale` (4 bits), `MatMulNBits`' defaults without a zero-point input.
//!
//! 8 bits are symmetric (scale = max |w| / 127). 4 bits cover the block's range, [min, max]: scale
//! = (max - min) / 15 rounded to f16 (the precision tract's Q4_0 keeps, so both runtimes compute
//! with the same weight), codes = round((w - min) / scale), and the block's offset `8 * scale +
//! min` restores `w ≈ (code - 8) * scale + offset`. The offsets' share of a product, the block
//! sums of the activations times an [K / BLOCK, N] matrix, is a small separate `MatMul`, so the
//! 4-bit product keeps the symmetric fast path of both runtimes; a block that came from a GGUF
//! Q4_1 block (an f16 scale and minimum) is represented exactly.

use ndarray::Array2;

/// Weights per quantization block along K.
pub const BLOCK: usize = 32;

/// A matrix [N, K] quantized for `MatMulNBits`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// 4 or 8.
    pub bits: u32,
    /// Output features (rows of the [N, K] weight).
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Codes [N, K / BLOCK, BLOCK · bits / 8], low nibble first for 4 bits.
    pub codes: Vec<u8>,
    /// [N · K / BLOCK].
    pub scales: Vec<f32>,
    /// 4 bits: each block's offset, [K / BLOCK, N] (block-major, so that it is the right-hand
    /// side of the offsets' `MatMul`); `None` for 8 bits.
    pub offsets: Option<Vec<f32>>,
}

impl Quantized {
    /// Blocks per output row.
    pub fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Bytes per block of codes.
    pub fn blob(&self) -> usize {
        BLOCK * self.bits as usize / 8
    }
}

/// `w` [N, K] (K a multiple of [`BLOCK`]) quantized to `bits` (4 or 8).
pub fn quantize(w: &Array2<f32>, bits: u32) -> Quantized {
    let (n, k) = w.dim();
    assert!(k.is_multiple_of(BLOCK) && (bits == 4 || bits == 8));
    let blocks = k / BLOCK;
    let blob = BLOCK * bits as usize / 8;
    let mut codes = vec![0u8; n * blocks * blob];
    let mut scales = vec![0f32; n * blocks];
    let mut offsets = vec![0f32; n * blocks];
    for r in 0..n {
        let row = w.row(r);
        for b in 0..blocks {
            let vals: Vec<f32> = (0..BLOCK).map(|i| row[b * BLOCK + i]).collect();
            let at = r * blocks + b;
            let out = &mut codes[at * blob..(at + 1) * blob];
            if bits == 8 {
                let max = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = if max > 0.0 { max / 127.0 } else { 1.0 };
                scales[at] = s;
                for (i, v) in vals.iter().enumerate() {
                    out[i] = ((v / s).round().clamp(-127.0, 127.0) + 128.0) as u8;
                }
            } else {
                let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = half::f16::from_f32((hi - lo) / 15.0).to_f32();
                let s = if s > 0.0 && s.is_finite() { s } else { 1.0 };
                scales[at] = s;
                offsets[b * n + r] = 8.0 * s + lo;
                for (i, v) in vals.iter().enumerate() {
                    let q = ((v - lo) / s).round().clamp(0.0, 15.0) as u8;
                    out[i / 2] |= q << (4 * (i % 2));
                }
            }
        }
    }
    Quantized {
        bits,
        n,
        k,
        codes,
        scales,
        offsets: (bits == 4).then_some(offsets),
    }
}

/// A matrix [N, K] quantized to int8 per output row for `MatMulInteger`: symmetric, 7 bits of
/// it (scale = max |row| / 63), so that no pair of u8 · s8 products can overflow the int16 sums
/// of x86 CPUs without VNNI (255 · 63 · 2 < 2¹⁵); stored transposed.
#[derive(Debug, Clone, PartialEq)]
pub struct RowQuantized {
    /// Codes [K, N] (the right-hand side of `x · Wᵀ`), each `round(w / scale)` in [-63, 63].
    pub codes: Vec<i8>,
    /// [N].
    pub scales: Vec<f32>,
}

/// `w` [N, K] quantized to 7-bit int8 codes with one scale per row.
pub fn quantize_rows(w: &Array2<f32>) -> RowQuantized {
    let (n, k) = w.dim();
    let scales: Vec<f32> = w
        .rows()
        .into_iter()
        .map(|row| {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max > 0.0 {
                max / 63.0
            } else {
                1.0
            }
        })
        .collect();
    let mut codes = vec![0i8; k * n];
    for ((r, c), v) in w.indexed_iter() {
        codes[c * n + r] = (v / scales[r]).round().clamp(-63.0, 63.0) as i8;
    }
    RowQuantized { codes, scales }
}
