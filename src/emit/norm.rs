//! RMSNorm, per target: opset-17 primitives or opset 23's `RMSNormalization`.

use super::Emitter;
use crate::builder::{Attr, DType, GraphBuilder, Value};
use crate::onnx::Target;

impl Emitter<'_> {
    /// RMSNorm(x; w) over the last axis.
    pub(super) fn rms_norm(&self, b: &mut GraphBuilder, x: &Value, w: &Value) -> Value {
        b.scoped("norm", |b| {
            let eps = self.cfg().rms_norm_eps as f32;
            if self.target() == Target::Opset23 {
                let attrs = vec![Attr::int("axis", -1), Attr::float("epsilon", eps)];
                return b.op("RMSNormalization", &[x, w], attrs, DType::F32);
            }
            let sq = b.mul(x, x);
            let ms = b.reduce_mean(&sq, &[-1], true);
            let eps = b.scalar_f32(eps);
            let var = b.add(&ms, &eps);
            let rms = b.sqrt(&var);
            let inv = b.reciprocal(&rms);
            let y = b.mul(x, &inv);
            b.mul(&y, w)
        })
    }
}
