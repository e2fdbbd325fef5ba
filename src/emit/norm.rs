//! RMSNorm, per target: opset-17 primitives, opset 23's `RMSNormalization`, or ONNX Runtime's
//! `SkipSimplifiedLayerNormalization` with the residual sum before it.

use super::{Emitter, MS_DOMAIN};
use crate::builder::{Attr, DType, GraphBuilder, Value};

impl Emitter<'_> {
    /// RMSNorm(x; w) over the last axis.
    pub(super) fn rms_norm(&self, b: &mut GraphBuilder, x: &Value, w: &Value) -> Value {
        b.scoped("norm", |b| {
            let eps = self.cfg().rms_norm_eps as f32;
            if self.lowering().fused_norm {
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

    /// (x + skip, RMSNorm(x + skip; w)) as one `com.microsoft.SkipSimplifiedLayerNormalization`.
    pub(super) fn skip_rms_norm(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        skip: &Value,
        w: &Value,
    ) -> (Value, Value) {
        b.scoped("norm", |b| {
            let eps = self.cfg().rms_norm_eps as f32;
            // outputs: normalised, mean (unused), 1/rms (unused), the sum
            let outs = b.op_multi_in_domain(
                MS_DOMAIN,
                1,
                "SkipSimplifiedLayerNormalization",
                &[Some(x), Some(skip), Some(w)],
                vec![Attr::float("epsilon", eps)],
                &[DType::F32; 4],
            );
            let [normed, _, _, sum]: [Value; 4] = outs.try_into().expect("four outputs");
            (sum, normed)
        })
    }
}
