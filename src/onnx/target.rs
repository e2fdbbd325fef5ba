//! What a set of graphs is emitted for: the operator set they use and the runtimes that read it.

use serde::{Deserialize, Serialize};

/// The ONNX dialect famc emits (`famc export --target`, `target` in famc.json). Every target
/// computes exactly FAM-SPEC; they differ in which fused standard operators spell it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Opset 17 primitives only (RMSNorm as Mul/ReduceMean/Sqrt, rotary as Slice/Concat,
    /// attention as MatMul/Softmax/MatMul): any ONNX runtime of the last years reads it.
    #[default]
    Opset17,
    /// Opset 23's fused `RMSNormalization`, `RotaryEmbedding` and `Attention`, IR version 11:
    /// ONNX Runtime 1.31 (CPU, CUDA), tract ≥ 0.23, TensorRT ≥ 10.15.
    Opset23,
    /// Opset 23 plus ONNX Runtime's own fusions: the q/k/v and gate/up projections packed into one
    /// MatMul each, and the residual sum with the post-attention RMSNorm as
    /// `com.microsoft.SkipSimplifiedLayerNormalization`. ONNX Runtime only (CPU, CUDA).
    Ort,
}

impl Target {
    /// Every target, in the order `famc export --target` lists them.
    pub const ALL: [Target; 3] = [Target::Opset17, Target::Opset23, Target::Ort];

    /// `opset17`, `opset23` or `ort`, as the flag and famc.json spell it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Opset17 => "opset17",
            Target::Opset23 => "opset23",
            Target::Ort => "ort",
        }
    }

    /// The version of the default (`ai.onnx`) domain the graphs import.
    pub fn opset(self) -> i64 {
        match self {
            Target::Opset17 => super::DEFAULT_OPSET,
            Target::Opset23 | Target::Ort => 23,
        }
    }

    /// The IR version the graphs declare (opset 23 needs IR 11).
    pub fn ir_version(self) -> i64 {
        match self {
            Target::Opset17 => super::IR_VERSION,
            Target::Opset23 | Target::Ort => 11,
        }
    }

    /// Whether only ONNX Runtime reads these graphs: they use its contrib operators beyond
    /// `MatMulNBits` (which tract reads too).
    pub fn ort_only(self) -> bool {
        self == Target::Ort
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
