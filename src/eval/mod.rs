//! Task evaluations of FAM models through famc's own engines.
//!
//! - [`passkey`]: long-range recall of a key placed many blocks before the question.

pub mod passkey;

use crate::runtime::BackendKind;

/// What runs the model during an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The compiled graphs on a backend.
    Graphs(BackendKind),
    /// The pure-Rust f64 reference of FAM-SPEC (checkpoints only).
    Reference,
}

impl Engine {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Graphs(kind) => kind.name(),
            Engine::Reference => "reference",
        }
    }
}
