//! famc: a graph compiler and runtime for TransformerFAM (feedback attention memory) on
//! Llama-family checkpoints.
//!
//! - [`model`] reads Hugging Face checkpoints (config.json + safetensors);
//! - [`reference`] is the pure-Rust f64 reference of `FAM-SPEC.md`;
//! - [`onnx`] and [`builder`] write ONNX graphs;
//! - [`contract`] says what every graph input and output carries, for binding by role;
//! - [`io`] reads token ids and writes results atomically.

pub mod bench;
pub mod builder;
pub mod contract;
pub mod doctor;
pub mod emit;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod io;
pub mod model;
pub mod onnx;
pub mod reference;
pub mod rng;
pub mod runtime;
pub mod serve;
pub mod session;
pub mod signal;
pub mod snapshot;
pub mod stream;
pub mod triton;

pub use error::{Error, Result};
