//! The token embedding (float, or int8 blocks a tied 8-bit head shares).

use super::linear::{quantized_weight, store_matrix, to_f32};
use super::{quant, Emitter};
use crate::builder::{DType, GraphBuilder, Value};
use crate::error::Result;

impl Emitter<'_> {
    /// The embedding matrix [V, d] as stored; one initializer per graph, which a tied head
    /// shares.
    pub(super) fn embedding(&self, b: &mut GraphBuilder) -> Result<Value> {
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
    pub(super) fn embedding_q8(&self, b: &mut GraphBuilder) -> Result<(Value, Value)> {
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

    pub(super) fn embed(&self, b: &mut GraphBuilder, ids: &Value) -> Result<Value> {
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
