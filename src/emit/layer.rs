//! One decoder layer: the q/k/v projections, attention and the MLP, shared by every graph.

use super::linear::{weight_vec, Product};
use super::rotary::Rope;
use super::Emitter;
use crate::builder::{GraphBuilder, Value};
use crate::error::Result;
use crate::model::LayerWeights;

impl Emitter<'_> {
    /// [B, Q, heads·Dh] → [B, heads, Q, Dh]
    fn split_heads(&self, b: &mut GraphBuilder, x: &Value, heads: usize) -> Value {
        let dh = self.cfg().head_dim as i64;
        let r = b.reshape(x, &[0, 0, heads as i64, dh]);
        b.transpose(&r, &[0, 2, 1, 3])
    }

    /// q [B, Q, H·Dh] → [B, H, Q, Dh], rotated and scaled by 1/√Dh.
    fn scaled_q(&self, b: &mut GraphBuilder, q: &Value, rope: &Rope) -> Value {
        let dh = self.cfg().head_dim;
        let q = self.split_heads(b, q, self.cfg().num_heads);
        let q = self.apply_rope(b, &q, rope);
        let scale = b.scalar_f32((1.0 / (dh as f64).sqrt()) as f32);
        b.mul(&q, &scale)
    }

    /// RMSNorm and the q, k, v projections of rows [B, Q, d], RoPE applied by `rope`: q
    /// [B, H, Q, Dh] (scaled by 1/√Dh, when `with_q`), k and v [B, Hkv, Q, Dh].
    pub(super) fn project(
        &self,
        b: &mut GraphBuilder,
        lw: &LayerWeights,
        rows: &Value,
        rope: &Rope,
        with_q: bool,
    ) -> Result<(Option<Value>, Value, Value)> {
        let hkv = self.cfg().num_kv_heads;
        let w_in = weight_vec(b, "input_layernorm.weight", &lw.input_layernorm)?;
        let x = self.rms_norm(b, rows, &w_in);
        let a = &lw.attn;
        let (q, k, v) = if self.lowering().packed_projections {
            // one product for all three; without `with_q` (FAM-kv) the q part goes unused
            let parts = [
                (&a.q_proj, a.q_bias.as_ref()),
                (&a.k_proj, a.k_bias.as_ref()),
                (&a.v_proj, a.v_bias.as_ref()),
            ];
            let [q, k, v]: [Value; 3] = self
                .packed_linear(b, &x, Product::Qkv, "qkv_proj", &parts)?
                .try_into()
                .expect("three parts");
            (with_q.then(|| self.scaled_q(b, &q, rope)), k, v)
        } else {
            let q = if with_q {
                let q = self.linear(b, &x, Product::Qkv, "q_proj", &a.q_proj, a.q_bias.as_ref())?;
                Some(self.scaled_q(b, &q, rope))
            } else {
                None
            };
            let k = self.linear(b, &x, Product::Qkv, "k_proj", &a.k_proj, a.k_bias.as_ref())?;
            let v = self.linear(b, &x, Product::Qkv, "v_proj", &a.v_proj, a.v_bias.as_ref())?;
            (q, k, v)
        };
        let k = self.split_heads(b, &k, hkv);
        let v = self.split_heads(b, &v, hkv);
        let k = self.apply_rope(b, &k, rope);
        Ok((q, k, v))
    }

    /// One decoder layer over rows [B, Q, d].
    ///
    /// `attend` turns the scaled q [B, H, Q, Dh] and the rows' own post-RoPE keys and values
    /// [B, Hkv, Q, Dh] into the attention output [B, Q, H·Dh] (attending to memory, FAM and caches
    /// as the graph has them), plus any extra values the caller wants back; `residual`: what the
    /// attention output is added to. Returns the layer output [B, Q, d], the rows' keys and
    /// values, and the extras.
    #[allow(clippy::type_complexity)]
    pub(super) fn layer(
        &self,
        b: &mut GraphBuilder,
        lw: &LayerWeights,
        rows: &Value,
        rope: &Rope,
        attend: impl FnOnce(&mut GraphBuilder, &Value, &Value, &Value) -> (Value, Vec<Value>),
        residual: &Value,
    ) -> Result<(Value, Value, Value, Vec<Value>)> {
        let (attn_out, k, v, extras) = b.scoped("attn", |b| -> Result<_> {
            let (q, k, v) = self.project(b, lw, rows, rope, true)?;
            let q = q.expect("asked for q");
            let (o, extras) = attend(b, &q, &k, &v);
            let a = &lw.attn;
            let o = self.linear(b, &o, Product::Out, "o_proj", &a.o_proj, a.o_bias.as_ref())?;
            Ok((o, k, v, extras))
        })?;
        let skip = self.lowering().skip_norm;
        let summed = (!skip).then(|| b.add(&attn_out, residual));
        let out = b.scoped("mlp", |b| -> Result<Value> {
            let w_post = weight_vec(
                b,
                "post_attention_layernorm.weight",
                &lw.post_attention_layernorm,
            )?;
            let (a, z) = match summed {
                Some(a) => {
                    let z = self.rms_norm(b, &a, &w_post);
                    (a, z)
                }
                None => self.skip_rms_norm(b, &attn_out, residual, &w_post),
            };
            let m = &lw.mlp;
            let (g, u) = if self.lowering().packed_projections {
                let parts = [(&m.gate_proj, None), (&m.up_proj, None)];
                let [g, u]: [Value; 2] = self
                    .packed_linear(b, &z, Product::GateUp, "gate_up_proj", &parts)?
                    .try_into()
                    .expect("two parts");
                (g, u)
            } else {
                let g = self.linear(b, &z, Product::GateUp, "gate_proj", &m.gate_proj, None)?;
                let u = self.linear(b, &z, Product::GateUp, "up_proj", &m.up_proj, None)?;
                (g, u)
            };
            let sg = b.sigmoid(&g);
            let silu = b.mul(&g, &sg);
            let gu = b.mul(&silu, &u);
            let down = self.linear(b, &gu, Product::Down, "down_proj", &m.down_proj, None)?;
            Ok(b.add(&a, &down))
        })?;
        Ok((out, k, v, extras))
    }
}
