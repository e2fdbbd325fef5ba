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
}

impl Target {
    /// Every target, in the order `famc export --target` lists them.
    pub const ALL: [Target; 2] = [Target::Opset17, Target::Opset23];

    /// `opset17` or `opset23`, as the flag and famc.json spell it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Opset17 => "opset17",
            Target::Opset23 => "opset23",
        }
    }

    /// The version of the default (`ai.onnx`) domain the graphs import.
    pub fn opset(self) -> i64 {
        match self {
            Target::Opset17 => super::DEFAULT_OPSET,
            Target::Opset23 => 23,
        }
    }

    /// The IR version the graphs declare (opset 23 needs IR 11).
    pub fn ir_version(self) -> i64 {
        match self {
            Target::Opset17 => super::IR_VERSION,
            Target::Opset23 => 11,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
