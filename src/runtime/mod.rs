//! Running ONNX graphs: one backend-neutral interface, [`GraphRunner`], over two backends:
//!
//! - [`BackendKind::Tract`]: pure Rust ([`tract_onnx`]), always available;
//! - [`BackendKind::Ort`]: ONNX Runtime through the `ort` crate, loaded at run time from a shared
//!   library (see [`ort::find_ort_library`] for where it is looked for).
//!
//! A runner loads one graph file once (its ONNX external data, `<file>.data`, is found beside it)
//! and runs it many times; the symbolic dimensions of the graph contract (`batch`, `T`) may change
//! from run to run. Inputs go in [`GraphRunner::input_names`] order and are checked against the
//! graph's declared types and shapes before the backend sees them, so a mismatch is a clear error
//! naming the input, never a panic.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ndarray::ArrayD;

use crate::{Error, Result};

pub mod ep;
pub mod ort;
mod ort_weights;
pub mod pool;
pub mod tract;

pub use ep::{EpConfig, EpKind};
pub use pool::{Checkout, Forker, RunnerPool};

/// A host tensor given to a graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl Tensor {
    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self {
            Tensor::F32(_) => ElemType::F32,
            Tensor::I64(_) => ElemType::I64,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }
}

impl From<ArrayD<f32>> for Tensor {
    fn from(a: ArrayD<f32>) -> Self {
        Tensor::F32(a)
    }
}

impl From<ArrayD<i64>> for Tensor {
    fn from(a: ArrayD<i64>) -> Self {
        Tensor::I64(a)
    }
}

/// The element type of a graph input or output, as declared by the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemType {
    F32,
    I64,
    /// Any other type, by its name (such inputs cannot be fed from a [`Tensor`]).
    Other(String),
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemType::F32 => f.write_str("float32"),
            ElemType::I64 => f.write_str("int64"),
            ElemType::Other(s) => f.write_str(s),
        }
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic dimension (ONNX `dim_param`), e.g. `batch` or `T`: any size, the same for every
    /// input that names it within one run.
    Named(String),
    /// Any size (an unnamed dynamic dimension, or an expression).
    Any,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => f.write_str(s),
            Dim::Any => f.write_str("?"),
        }
    }
}

/// The declared name, element type and shape of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub elem_type: ElemType,
    /// `None` when the graph does not declare the rank.
    pub shape: Option<Vec<Dim>>,
}

impl fmt::Display for IoSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.name, self.elem_type)?;
        match &self.shape {
            Some(dims) => write!(f, " [{}]", join(dims.iter())),
            None => f.write_str(" [unknown rank]"),
        }
    }
}

/// A tensor fed to or returned by a graph: a host array, or a tensor held by the backend that
/// produced it (an ONNX Runtime value, in device memory for a GPU session; a tract tensor), which
/// goes back into the next run of that backend without a copy through host arrays.
#[derive(Debug)]
pub struct Value {
    inner: ValueInner,
    shape: Vec<usize>,
    elem_type: ElemType,
}

#[derive(Debug)]
enum ValueInner {
    Host(Tensor),
    Tract(tract::TractValue),
    Ort(ort::OrtValue),
}

impl Value {
    /// A host tensor.
    pub fn host(t: impl Into<Tensor>) -> Value {
        let t = t.into();
        Value {
            shape: t.shape().to_vec(),
            elem_type: t.elem_type(),
            inner: ValueInner::Host(t),
        }
    }

    pub(crate) fn tract(v: tract::TractValue, shape: Vec<usize>, elem_type: ElemType) -> Value {
        Value {
            inner: ValueInner::Tract(v),
            shape,
            elem_type,
        }
    }

    pub(crate) fn ort(v: ort::OrtValue, shape: Vec<usize>, elem_type: ElemType) -> Value {
        Value {
            inner: ValueInner::Ort(v),
            shape,
            elem_type,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn elem_type(&self) -> &ElemType {
        &self.elem_type
    }

    /// The host tensor, when the value is one.
    pub fn as_host(&self) -> Option<&Tensor> {
        match &self.inner {
            ValueInner::Host(t) => Some(t),
            _ => None,
        }
    }

    /// The backend holding the value (`None`: a host array).
    pub fn backend(&self) -> Option<BackendKind> {
        match &self.inner {
            ValueInner::Host(_) => None,
            ValueInner::Tract(_) => Some(BackendKind::Tract),
            ValueInner::Ort(_) => Some(BackendKind::Ort),
        }
    }

    /// Where the data lies, for messages and `famc doctor`: `host`, `tract`, `ort cpu`, or
    /// `ort cuda:0`.
    pub fn location(&self) -> String {
        match &self.inner {
            ValueInner::Host(_) => "host".into(),
            ValueInner::Tract(_) => "tract".into(),
            ValueInner::Ort(v) => format!("ort {}", v.device()),
        }
    }

    /// The address of the first element, to tell buffers apart (double buffering reuses two);
    /// `None` when the backend does not say.
    pub fn data_address(&self) -> Option<usize> {
        match &self.inner {
            ValueInner::Host(Tensor::F32(a)) => Some(a.as_ptr() as usize),
            ValueInner::Host(Tensor::I64(a)) => Some(a.as_ptr() as usize),
            ValueInner::Tract(v) => Some(v.data_address()),
            ValueInner::Ort(v) => v.data_address(),
        }
    }

    /// A host copy as float32 (copied from device memory when the value lies there).
    pub fn to_host_f32(&self) -> Result<ArrayD<f32>> {
        match &self.inner {
            ValueInner::Host(Tensor::F32(a)) => Ok(a.clone()),
            ValueInner::Host(Tensor::I64(a)) => Ok(a.mapv(|v| v as f32)),
            ValueInner::Tract(v) => v.to_array_f32(),
            ValueInner::Ort(v) => v.to_array_f32(),
        }
    }

    /// As [`Value::to_host_f32`], without a copy when the value is a host float32 array.
    pub fn into_host_f32(self) -> Result<ArrayD<f32>> {
        match self.inner {
            ValueInner::Host(Tensor::F32(a)) => Ok(a),
            _ => self.to_host_f32(),
        }
    }

    /// A host tensor: the value's own when it is one, else a copy (float32).
    pub(crate) fn host_tensor(&self) -> Result<std::borrow::Cow<'_, Tensor>> {
        match &self.inner {
            ValueInner::Host(t) => Ok(std::borrow::Cow::Borrowed(t)),
            _ => Ok(std::borrow::Cow::Owned(Tensor::F32(self.to_host_f32()?))),
        }
    }

    /// Writes `row` (this value's shape with length 1 along `axis`) at index `at` of `axis`. In
    /// place when the data is in host memory (a host array, a tract tensor, an ONNX Runtime CPU
    /// value), so a cache held by the backend takes one row per token; a value in device memory
    /// is brought to the host first and stays there.
    pub fn write_at(&mut self, axis: usize, at: usize, row: &Value) -> Result<()> {
        let mut want = self.shape.clone();
        if axis >= want.len() || at >= want[axis] {
            return Err(Error::Input(format!(
                "cannot write at index {at} of axis {axis} of a value of shape {:?}",
                self.shape
            )));
        }
        want[axis] = 1;
        if row.shape() != want.as_slice() {
            return Err(Error::Input(format!(
                "cannot write a row of shape {:?} into a value of shape {:?} (a row is {want:?})",
                row.shape(),
                self.shape
            )));
        }
        let row = row.host_tensor()?;
        let (Tensor::F32(row), ElemType::F32) = (&*row, &self.elem_type) else {
            return Err(Error::Input(
                "only float32 values take rows written in place".into(),
            ));
        };
        let row = row.index_axis(ndarray::Axis(axis), 0);
        let written = match &mut self.inner {
            ValueInner::Host(Tensor::F32(a)) => {
                a.index_axis_mut(ndarray::Axis(axis), at).assign(&row);
                true
            }
            ValueInner::Host(Tensor::I64(_)) => unreachable!("checked float32 above"),
            ValueInner::Tract(v) => {
                v.write_at(axis, at, &row)?;
                true
            }
            ValueInner::Ort(v) => v.write_at(axis, at, &row)?,
        };
        if !written {
            let mut a = self.to_host_f32()?;
            a.index_axis_mut(ndarray::Axis(axis), at).assign(&row);
            self.inner = ValueInner::Host(Tensor::F32(a));
        }
        Ok(())
    }

    pub(crate) fn as_tract(&self) -> Option<&tract::TractValue> {
        match &self.inner {
            ValueInner::Tract(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_ort(&self) -> Option<&ort::OrtValue> {
        match &self.inner {
            ValueInner::Ort(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn into_ort(self) -> Option<ort::OrtValue> {
        match self.inner {
            ValueInner::Ort(v) => Some(v),
            _ => None,
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::host(t)
    }
}

/// Where [`GraphRunner::run_values`] leaves an output.
#[derive(Debug)]
pub enum OutputTo {
    /// A host float32 array ([`Value::as_host`]).
    Host,
    /// Held by the backend, in the session's own memory (device memory for a GPU session).
    Backend,
    /// Held by the backend, written into this spent value of an earlier run, which must have the
    /// output's shape (double buffering: no allocation per run). Backends that cannot write into
    /// a given buffer (tract) drop it and allocate, as for [`OutputTo::Backend`].
    Reuse(Value),
}

/// A loaded graph, ready to run many times.
pub trait GraphRunner: Send {
    /// The graph's input names, in the order [`GraphRunner::run`] takes them.
    fn input_names(&self) -> &[String];
    /// The graph's output names, in the order [`GraphRunner::run`] returns them.
    fn output_names(&self) -> &[String];
    /// The graph's declared inputs (same order as [`GraphRunner::input_names`]).
    fn input_specs(&self) -> &[IoSpec];
    /// The backend running this graph.
    fn backend(&self) -> BackendKind;
    /// Inputs in input_names() order; returns every output in output_names() order, each where
    /// `outputs` says. Inputs may be host tensors or values this backend returned earlier (values
    /// of the other backend go through the host).
    fn run_values(&mut self, inputs: &[&Value], outputs: Vec<OutputTo>) -> Result<Vec<Value>>;

    /// Opens further runners of this graph that share what it loaded, for callers running at
    /// once ([`RunnerPool`]); `None` where this backend has no cheaper way than opening the
    /// file again.
    fn forker(&self) -> Option<Forker> {
        None
    }

    /// `t` as a value this backend takes without a copy on every run and that
    /// [`Value::write_at`] changes in place (e.g. a decode cache); a host array where the backend
    /// cannot hold it in host memory (a GPU session).
    fn hold(&self, t: Tensor) -> Result<Value> {
        Ok(Value::host(t))
    }

    /// Inputs in input_names() order; returns every output in output_names() order, as f32.
    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<ArrayD<f32>>> {
        let values: Vec<Value> = inputs.into_iter().map(Value::host).collect();
        let refs: Vec<&Value> = values.iter().collect();
        let outputs = (0..self.output_names().len())
            .map(|_| OutputTo::Host)
            .collect();
        self.run_values(&refs, outputs)?
            .into_iter()
            .map(Value::into_host_f32)
            .collect()
    }
}

/// Which backend runs a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// tract (pure Rust, CPU).
    Tract,
    /// ONNX Runtime, loaded dynamically.
    Ort,
}

impl BackendKind {
    /// The backend's name, as in [`Error::Backend`]: `"tract"` or `"ort"`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tract" => Ok(BackendKind::Tract),
            "ort" | "onnxruntime" => Ok(BackendKind::Ort),
            _ => Err(Error::Input(format!(
                "unknown backend `{s}` (expected `tract` or `ort`)"
            ))),
        }
    }
}

/// ONNX Runtime's graph optimisation level (`--ort-opt-level`). Each variant's first paragraph is
/// its `--help` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum OrtOptLevel {
    /// No graph optimisation.
    Disable,
    /// Constant folding, redundant node removal.
    ///
    /// Semantics-preserving rewrites only.
    Basic,
    /// Basic plus node fusions.
    ///
    /// ONNX Runtime calls these fusions complex.
    Extended,
    /// Everything, including layout optimisations (ONNX Runtime's default).
    All,
}

impl OrtOptLevel {
    /// The level's name: `disable`, `basic`, `extended` or `all`.
    pub fn name(self) -> &'static str {
        match self {
            OrtOptLevel::Disable => "disable",
            OrtOptLevel::Basic => "basic",
            OrtOptLevel::Extended => "extended",
            OrtOptLevel::All => "all",
        }
    }
}

impl fmt::Display for OrtOptLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OrtOptLevel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" | "disabled" | "none" | "0" => Ok(OrtOptLevel::Disable),
            "basic" | "1" => Ok(OrtOptLevel::Basic),
            "extended" | "2" => Ok(OrtOptLevel::Extended),
            "all" | "99" => Ok(OrtOptLevel::All),
            _ => Err(Error::Input(format!(
                "unknown ONNX Runtime optimisation level `{s}` (expected disable, basic, extended or all)"
            ))),
        }
    }
}

/// How to load and run a graph. `Default` leaves every choice to the backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Threads used inside one operator: ONNX Runtime's intra-op pool (unset: its default, one
    /// per physical core); tract's rayon pool (unset: every core the process may use; 1:
    /// single-threaded).
    pub intra_threads: Option<usize>,
    /// Threads used across operators (ONNX Runtime only; enables its parallel execution mode
    /// when above 1).
    pub inter_threads: Option<usize>,
    /// ONNX Runtime's graph optimisation level (its default: all).
    pub ort_optimization: Option<OrtOptLevel>,
    /// Symbolic dimensions to plan for at a fixed size as well, e.g. `[("batch", 1), ("T", L)]`
    /// for the block graph run on one stream (tract only; ONNX Runtime ignores it). tract then
    /// builds two plans, the symbolic one and one with these symbols concretised, and runs each
    /// call whose input shapes give every listed symbol its listed size on the latter (at the cost
    /// of optimising twice and holding two plans). Symbols that no graph input names are ignored,
    /// so one `RunOptions` serves graphs with and without them. See [`tract`] for what pays.
    pub fixed_dims: Vec<(String, usize)>,
    /// The ONNX Runtime execution provider and its options (default: the CPU). Anything but the
    /// CPU is refused by tract. See [`ep`].
    pub ep: EpConfig,
    /// Copy a stream's state out to host arrays after every block and back in for the next,
    /// instead of keeping it in the backend's values (a diagnostic, for measuring what keeping
    /// it there saves; `famc bench --host-state`).
    pub host_state: bool,
    /// How many callers may run one graph at once, each on a runner of its own that shares the
    /// weights (unset: tract one per core; ONNX Runtime as many sessions of `intra_threads` as
    /// the cores hold, so one by default; GPU sessions always one). See [`RunnerPool`].
    pub concurrency: Option<usize>,
    /// Score streams in the export's score graph (only the targets' log-probabilities come back
    /// from a block, not its logits) instead of from the logits. Unset: on ONNX Runtime's GPU
    /// providers, where the [T, V] logits are the largest transfer; on its CPU provider the
    /// score graph measured no faster and holds a second session. tract never does (a second
    /// plan would hold the weights twice).
    pub score_in_graph: Option<bool>,
}

impl RunOptions {
    /// These options with `name` also planned for at `size` (see [`RunOptions::fixed_dims`]).
    pub fn with_fixed_dim(mut self, name: impl Into<String>, size: usize) -> Self {
        let name = name.into();
        self.fixed_dims.retain(|(n, _)| *n != name);
        self.fixed_dims.push((name, size));
        self
    }
}

/// The most threads famc starts for one pool (`--threads`, `--inter-threads`): more only makes
/// the system refuse or stall.
pub const MAX_THREADS: usize = 1024;

/// Refuses thread counts above [`MAX_THREADS`]; `what` names the setting.
pub(crate) fn check_threads(what: &str, n: usize) -> Result<()> {
    if n > MAX_THREADS {
        return Err(Error::Input(format!(
            "{what} = {n}: famc runs at most {MAX_THREADS} threads per pool"
        )));
    }
    Ok(())
}

/// Loads the ONNX graph at `path` for `kind`; its external data (`<file>.data`) must lie beside it.
pub fn open_graph(
    kind: BackendKind,
    path: &Path,
    opts: &RunOptions,
) -> Result<Box<dyn GraphRunner>> {
    if !path.is_file() {
        let what = if path.exists() {
            "is not a file"
        } else {
            "does not exist"
        };
        return Err(backend_error(kind, path, format!("graph file {what}")));
    }
    for (what, n) in [
        ("intra-op threads", opts.intra_threads),
        ("inter-op threads", opts.inter_threads),
    ] {
        if let Some(n) = n {
            check_threads(what, n)?;
        }
    }
    match kind {
        BackendKind::Tract => {
            if opts.ep.kind != EpKind::Cpu {
                return Err(Error::Input(format!(
                    "--ep {} needs --backend ort: tract runs on the CPU only",
                    opts.ep.kind
                )));
            }
            opts.ep.check()?;
            Ok(Box::new(tract::TractRunner::open(path, opts)?))
        }
        BackendKind::Ort => Ok(Box::new(ort::OrtRunner::open(path, opts)?)),
    }
}

/// An [`Error::Backend`] naming the backend and the graph file.
pub(crate) fn backend_error(kind: BackendKind, path: &Path, message: impl fmt::Display) -> Error {
    Error::Backend {
        backend: kind.name(),
        message: format!("{}: {message}", path.display()),
    }
}

fn join<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// Checks `inputs` against the graph's declared inputs: count, element types, ranks, fixed sizes
/// and the consistency of named dimensions across inputs.
pub(crate) fn check_inputs(
    kind: BackendKind,
    path: &Path,
    specs: &[IoSpec],
    inputs: &[&Value],
) -> Result<()> {
    if inputs.len() != specs.len() {
        let names = if specs.is_empty() {
            "none".to_string()
        } else {
            join(specs.iter().map(|s| format!("`{}`", s.name)))
        };
        return Err(backend_error(
            kind,
            path,
            format!(
                "the graph takes {} input(s) ({names}), got {}",
                specs.len(),
                inputs.len()
            ),
        ));
    }
    let mut named: Vec<(&str, usize, &str)> = Vec::new(); // (symbol, value, input that set it)
    for (ix, (spec, t)) in specs.iter().zip(inputs).enumerate() {
        let given = || format!("{} [{}]", t.elem_type(), join(t.shape().iter()));
        if spec.elem_type != *t.elem_type() {
            return Err(backend_error(
                kind,
                path,
                format!("input #{ix} {spec} does not accept a {} tensor", given()),
            ));
        }
        let Some(dims) = &spec.shape else { continue };
        if dims.len() != t.shape().len() {
            return Err(backend_error(
                kind,
                path,
                format!(
                    "input #{ix} {spec}: expected rank {}, got a tensor of shape {}",
                    dims.len(),
                    given()
                ),
            ));
        }
        for (axis, (d, &n)) in dims.iter().zip(t.shape()).enumerate() {
            match d {
                Dim::Fixed(want) if *want != n => {
                    return Err(backend_error(
                        kind,
                        path,
                        format!(
                            "input #{ix} {spec}: dimension {axis} must be {want}, got a tensor of shape {}",
                            given()
                        ),
                    ));
                }
                Dim::Named(sym) => match named.iter().find(|(s, _, _)| s == sym) {
                    Some((_, v, by)) if *v != n => {
                        return Err(backend_error(
                            kind,
                            path,
                            format!(
                                "input #{ix} {spec}: dimension {axis} (`{sym}`) is {n}, but input `{by}` has `{sym}` = {v}"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => named.push((sym, n, &spec.name)),
                },
                _ => {}
            }
        }
    }
    Ok(())
}

/// Checks that `outputs` has one entry per graph output.
pub(crate) fn check_outputs(
    kind: BackendKind,
    path: &Path,
    names: &[String],
    outputs: &[OutputTo],
) -> Result<()> {
    if outputs.len() == names.len() {
        return Ok(());
    }
    Err(backend_error(
        kind,
        path,
        format!(
            "the graph has {} output(s), {} placement(s) given",
            names.len(),
            outputs.len()
        ),
    ))
}
