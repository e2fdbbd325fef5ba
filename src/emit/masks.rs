//! The additive attention masks of the block and decode graphs (FAM-SPEC section 2).

use super::{Emitter, MASKED};
use crate::builder::{DType, GraphBuilder, Value};

/// The block's rows, as the block mask is computed from them.
pub(super) struct BlockRows<'v> {
    /// Row numbers 0 … Q − 1, [Q] (F FAM rows, then the T block rows).
    pub rows: &'v Value,
    /// Each row's absolute position, [B, Q].
    pub positions: &'v Value,
    /// Q = F + T, a scalar.
    pub count: &'v Value,
    /// τ·L, [B].
    pub start: &'v Value,
    /// τ, [B].
    pub block_index: &'v Value,
    /// F, a scalar.
    pub fam_len: &'v Value,
}

impl Emitter<'_> {
    /// Which memory slots hold keys of the stream, [B, M·L] bool, for a block starting at
    /// `start` = τ·L [B]: slot j when j ≥ M·L − min(τ·L, M·L) (FAM-SPEC section 2).
    fn memory_valid(&self, b: &mut GraphBuilder, start: &Value) -> Value {
        let ml = self.spec.fam.mem_len() as i64;
        let ml_c = b.scalar_i64(ml);
        let valid = b.op("Min", &[start, &ml_c], vec![], DType::I64);
        let first_valid = b.sub(&ml_c, &valid);
        let first_valid = b.unsqueeze(&first_valid, &[1]); // [B, 1]
        let slots: Vec<i64> = (0..ml).collect();
        let slots = b.const_i64(&slots, &[1, ml]);
        b.op(
            "GreaterOrEqual",
            &[&slots, &first_valid],
            vec![],
            DType::Bool,
        )
    }

    /// The block graph's mask [B, 1, G·Q, M·L + Q] (opset 17) or [B, 1, Q, M·L + Q] (opset 23):
    /// FAM rows see every FAM and block row and no memory; block rows see the valid memory slots,
    /// every FAM row and the block rows up to their own.
    pub(super) fn block_mask(&self, b: &mut GraphBuilder, r: &BlockRows) -> Value {
        let (f, ml) = (self.spec.fam.fam_len, self.spec.fam.mem_len());
        let (rows, pos_i, q_len, start, block_index, f_c) = (
            r.rows,
            r.positions,
            r.count,
            r.start,
            r.block_index,
            r.fam_len,
        );
        // self part: row i sees row j when i < F (a FAM row) or j <= i, the latter written as
        // pos_j <= pos_i on the [B, Q] positions: tract mis-evaluates masks that depend on T alone.
        let pos_row = b.unsqueeze(pos_i, &[2]); // [B, Q, 1]
        let pos_col = b.unsqueeze(pos_i, &[1]); // [B, 1, Q]
        let future = b.less(&pos_row, &pos_col);
        let causal = b.op("Not", &[&future], vec![], DType::Bool); // [B, Q, Q]
        let is_fam_row = (f > 0).then(|| {
            let row_col = b.unsqueeze(rows, &[1]); // [Q, 1]
            b.less(&row_col, f_c)
        });
        let self_vis = match &is_fam_row {
            Some(fam_row) => b.op("Or", &[fam_row, &causal], vec![], DType::Bool),
            None => causal,
        };
        let masked = b.scalar_f32(MASKED);
        let open = b.scalar_f32(0.0);
        let vis = if ml > 0 {
            // only block rows see the memory
            let slot_ok = self.memory_valid(b, start);
            let slot_ok = b.unsqueeze(&slot_ok, &[1]); // [B, 1, ML]
            let mem_vis = match &is_fam_row {
                Some(fam_row) => {
                    let is_block_row = b.op("Not", &[fam_row], vec![], DType::Bool); // [Q, 1]
                    b.op("And", &[&slot_ok, &is_block_row], vec![], DType::Bool)
                }
                None => slot_ok,
            };
            let batch = b.shape(block_index);
            let q1 = b.unsqueeze(q_len, &[0]);
            let ml_1 = b.vec_i64(&[ml as i64]);
            let mem_shape = b.concat(&[&batch, &q1, &ml_1], 0);
            let mem_vis = b.expand(&mem_vis, &mem_shape); // [B, Q, ML]
            b.concat(&[&mem_vis, &self_vis], 2) // [B, Q, ML + Q]
        } else {
            self_vis
        };
        let m = b.where_(&vis, &open, &masked);
        let mask = b.unsqueeze(&m, &[1]); // [B, 1, Q, keys]
        let group = self.cfg().group_size() as i64;
        if group > 1 && !self.lowering().fused_attention {
            // rows of a key/value head's G query heads run as G·Q rows (see `Emitter::attention`)
            let reps = b.vec_i64(&[1, 1, group, 1]);
            b.op("Tile", &[&mask, &reps], vec![], DType::F32)
        } else {
            mask
        }
    }

    /// The decode graph's mask [B, 1, 1, M·L + F + L + 1] for a token at slot `in_block` [B] of
    /// the block starting at `start` [B]: the valid memory, every FAM key, the cache slots before
    /// its own, and its own key (last).
    pub(super) fn decode_mask(
        &self,
        b: &mut GraphBuilder,
        position: &Value,
        start: &Value,
        in_block: &Value,
    ) -> Value {
        let (f, ml, l_len) = (
            self.spec.fam.fam_len,
            self.spec.fam.mem_len(),
            self.spec.fam.block_len,
        );
        let slots: Vec<i64> = (0..l_len as i64).collect();
        let slots = b.const_i64(&slots, &[1, l_len as i64]);
        let i = b.unsqueeze(in_block, &[1]); // [B, 1]
        let cache_vis = b.op("Less", &[&slots, &i], vec![], DType::Bool); // [B, L]
        let open = b.scalar_f32(0.0);
        let masked = b.scalar_f32(MASKED);
        let mut parts = Vec::new();
        if ml > 0 {
            let mem_vis = self.memory_valid(b, start);
            parts.push(b.where_(&mem_vis, &open, &masked));
        }
        let batch = b.shape(position);
        // every FAM key and the token's own are visible: zeros, broadcast over the batch
        let open_cols = |b: &mut GraphBuilder, n: usize| {
            let n_c = b.vec_i64(&[n as i64]);
            let full = b.concat(&[&batch, &n_c], 0);
            b.expand(&open, &full)
        };
        if f > 0 {
            parts.push(open_cols(b, f));
        }
        parts.push(b.where_(&cache_vis, &open, &masked));
        parts.push(open_cols(b, 1));
        let refs: Vec<&Value> = parts.iter().collect();
        let m = b.concat(&refs, 1); // [B, N]
        b.unsqueeze(&m, &[1, 2]) // [B, 1, 1, N]
    }
}
