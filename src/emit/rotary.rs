//! Rotary position embedding: the cos/sin tables for integer positions, and their application
//! (opset-17 Slice/Concat/Mul, or opset 23's `RotaryEmbedding`).

use super::Emitter;
use crate::builder::{Attr, DType, GraphBuilder, Value};

/// One turn of a rotary angle in the fixed point of `Emitter::rope_tables`: 2^52.
const TURN: i64 = 1 << 52;
/// Width of the limbs `Emitter::rope_tables` splits each frequency into.
const LIMB_BITS: u32 = 26;

/// Rotary tables for a run of rows: cos and sin, each [B, 1, Q, Dh] (opset 17: both halves, for
/// a broadcast multiply) or [B, Q, Dh/2] (opset 23: `RotaryEmbedding`'s cos and sin caches).
pub(super) struct Rope {
    cos: Value,
    sin: Value,
}

impl Emitter<'_> {
    /// cos/sin tables for integer positions [B, Q], exact at any position below
    /// [`MAX_POSITION`](crate::model::MAX_POSITION): each angle p·θ_j is reduced modulo one turn
    /// in int64 arithmetic before it becomes an f32, so the angle's error stays about 1e-6 rad
    /// instead of growing with p (p·θ_j formed in f32 is off by 0.06 rad at p = 10^6).
    ///
    /// With V_j = round(2^52·θ_j / 2π) = hi_j·2^26 + lo_j, the angle in turns is
    /// (|p|·V_j mod 2^52) / 2^52, computed as ((|p|·hi_j mod 2^26)·2^26 + (|p|·lo_j mod 2^52))
    /// mod 2^52: every product stays below 2^63 while |p| < 2^37. A negative position negates
    /// the sine.
    pub(super) fn rope_tables(&self, b: &mut GraphBuilder, positions: &Value) -> Rope {
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
            // opset 17 multiplies by both halves [B, 1, Q, Dh]; opset 23 takes the half [B, Q, Dh/2]
            let (emb, sign_axes): (Value, &[i64]) = if self.lowering().fused_rotary {
                (angles, &[-1])
            } else {
                let emb = b.concat(&[&angles, &angles], -1);
                (b.unsqueeze(&emb, &[1]), &[1, 3])
            };
            let zero = b.scalar_i64(0);
            let negative = b.less(positions, &zero);
            let negative = b.unsqueeze(&negative, sign_axes); // broadcasts over the tables
            let sin = b.sin(&emb);
            let neg_sin = b.neg(&sin);
            Rope {
                cos: b.cos(&emb),
                sin: b.where_(&negative, &neg_sin, &sin),
            }
        })
    }

    /// x·cos + rotate_half(x)·sin for x [B, heads, Q, Dh].
    pub(super) fn apply_rope(&self, b: &mut GraphBuilder, x: &Value, rope: &Rope) -> Value {
        b.scoped("rope", |b| {
            if self.lowering().fused_rotary {
                return b.op(
                    "RotaryEmbedding",
                    &[x, &rope.cos, &rope.sin],
                    vec![Attr::int("interleaved", 0)],
                    DType::F32,
                );
            }
            let half = (self.cfg().head_dim / 2) as i64;
            let x1 = b.slice(x, &[0], &[half], &[-1], None);
            let x2 = b.slice(x, &[half], &[i64::MAX], &[-1], None);
            let nx2 = b.neg(&x2);
            let rot = b.concat(&[&nx2, &x1], -1);
            let a = b.mul(x, &rope.cos);
            let c = b.mul(&rot, &rope.sin);
            b.add(&a, &c)
        })
    }
}
