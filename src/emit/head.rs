//! The output head: final norm and logits, a tied head reading the embedding's own matrix.

use super::linear::{nbits_node, to_f32, weight_vec, Product};
use super::Emitter;
use crate::builder::{Attr, DType, GraphBuilder, Value};
use crate::error::Result;

impl Emitter<'_> {
    /// Logits [B, Q, V] of the last layer's rows.
    pub(super) fn head(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value> {
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
                return self.linear(b, &h, Product::Head, "lm_head", w.output_weight(), None);
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

    /// log softmax(logits)[target] [B, T] for logits [B, T, V] and targets [B, T] (int64), with
    /// the maximum subtracted first so that no exponential overflows.
    pub(super) fn target_logprob(
        &self,
        b: &mut GraphBuilder,
        logits: &Value,
        targets: &Value,
    ) -> Value {
        let max = b.reduce_max(logits, &[-1], true);
        let z = b.sub(logits, &max);
        let e = b.exp(&z);
        let sum = b.reduce_sum(&e, &[-1], true);
        let lse = b.op("Log", &[&sum], vec![], DType::F32); // [B, T, 1]
        let t = b.unsqueeze(targets, &[2]);
        let picked = b.op(
            "GatherElements",
            &[&z, &t],
            vec![Attr::int("axis", 2)],
            DType::F32,
        );
        let lp = b.sub(&picked, &lse);
        b.squeeze(&lp, &[2])
    }
}
