//! The library's error type: every failure names what is wrong and where.

use std::path::PathBuf;

/// Errors raised while reading checkpoints, building or running FAM models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("checkpoint {dir}: {message}")]
    Checkpoint { dir: PathBuf, message: String },
    #[error("{path}: corrupt or truncated safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("missing tensor `{name}` (looked in {searched})")]
    MissingTensor { name: String, searched: String },
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {path}: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    TensorDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("invalid FAM parameters: {0}")]
    FamParams(String),
    #[error("{source_name}: {message}")]
    Tokens {
        source_name: String,
        message: String,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(transparent)]
    Build(#[from] crate::builder::BuildError),
    #[error("{backend} backend: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    #[error("export {dir}: {message}")]
    Export { dir: PathBuf, message: String },
}

/// Result with famc's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
