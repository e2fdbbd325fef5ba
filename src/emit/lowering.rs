//! How each target spells the operation families: one table, read by the norm, rotary, attention,
//! layer and mask emitters instead of checks of the target scattered through them.

use crate::onnx::Target;

/// The spelling choices of one target (docs/graph-contract.md, "Targets").
#[derive(Debug, Clone, Copy)]
pub(super) struct Lowering {
    /// RMSNorm as opset 23's `RMSNormalization` (else Mul/ReduceMean/Sqrt).
    pub fused_norm: bool,
    /// Rotary embedding as opset 23's `RotaryEmbedding` over half-width tables (else
    /// Slice/Neg/Concat over full-width ones).
    pub fused_rotary: bool,
    /// Attention as opset 23's `Attention` with its q and kv head counts (else MatMul/Softmax/
    /// MatMul over G·Q rows per key/value head, with a mask tiled to match).
    pub fused_attention: bool,
    /// The q, k, v projections as one MatMul over their matrices stacked (then a Split), and the
    /// gate and up projections likewise: fewer, larger products, one offset sum for q4.
    pub packed_projections: bool,
    /// The residual sum and the post-attention RMSNorm as one
    /// `com.microsoft.SkipSimplifiedLayerNormalization`.
    pub skip_norm: bool,
}

impl Lowering {
    /// The lowering `target` stands for.
    pub(super) fn of(target: Target) -> Lowering {
        let fused = target != Target::Opset17;
        let ort = target == Target::Ort;
        Lowering {
            fused_norm: fused,
            fused_rotary: fused,
            fused_attention: fused,
            packed_projections: ort,
            skip_norm: ort,
        }
    }
}
