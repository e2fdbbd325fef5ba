//! A small ONNX graph builder in the style of onnxscript's `GraphBuilder`.
//!
//! Values are typed handles; every call appends nodes in call order, so the
//! graph is topologically sorted by construction. Names are derived from a
//! scope stack plus per-name counters, never from hashing, so identical call
//! sequences produce byte-identical models.

mod external;
mod tensor;

/// A weight store that several graph builders write into, one after the other.
pub type SharedStore = std::rc::Rc<std::cell::RefCell<StoreWriter>>;

pub use external::{encode_model, load_model, save_model, StoreWriter, EXTERNAL_DATA_ALIGNMENT};
pub use tensor::TensorData;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::onnx::{self, tensor_proto::DataType};

/// Oldest opset the op helpers are written for (axes-as-input Unsqueeze,
/// Squeeze and ReduceSum; opset-13 Softmax semantics).
pub const MIN_OPSET: i64 = 13;

/// Element types famc emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `float`.
    F32,
    /// `float16`.
    F16,
    /// `bfloat16`.
    BF16,
    /// `int64`.
    I64,
    /// `int32`.
    I32,
    /// `bool` (one byte per element).
    Bool,
    /// `uint8` (packed quantized weights, quantized activations).
    U8,
    /// `int8` (per-channel quantized weights).
    I8,
}

impl DType {
    /// The ONNX `TensorProto.DataType` of this type.
    pub fn onnx(self) -> DataType {
        match self {
            DType::F32 => DataType::Float,
            DType::F16 => DataType::Float16,
            DType::BF16 => DataType::Bfloat16,
            DType::I64 => DataType::Int64,
            DType::I32 => DataType::Int32,
            DType::Bool => DataType::Bool,
            DType::U8 => DataType::Uint8,
            DType::I8 => DataType::Int8,
        }
    }

    /// The type for an ONNX `TensorProto.DataType` code, if famc supports it.
    pub fn from_onnx(code: i32) -> Option<Self> {
        match DataType::try_from(code).ok()? {
            DataType::Float => Some(DType::F32),
            DataType::Float16 => Some(DType::F16),
            DataType::Bfloat16 => Some(DType::BF16),
            DataType::Int64 => Some(DType::I64),
            DataType::Int32 => Some(DType::I32),
            DataType::Bool => Some(DType::Bool),
            DataType::Uint8 => Some(DType::U8),
            DataType::Int8 => Some(DType::I8),
            _ => None,
        }
    }

    /// Bytes per element in `raw_data`.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::Bool | DType::U8 | DType::I8 => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

/// One dimension of a value's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A symbolic size (`dim_param`), e.g. `"batch"`.
    Sym(String),
}

impl From<i64> for Dim {
    fn from(d: i64) -> Self {
        Dim::Fixed(d)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Self {
        Dim::Sym(s.to_string())
    }
}

/// A typed handle to a value (graph input, initializer or node output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    /// Name of the value in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, when known to the builder (inputs, constants, weights).
    pub shape: Option<Vec<Dim>>,
}

impl Value {
    /// The same value with `shape` recorded (the builder does no shape
    /// inference; callers may annotate what they know).
    pub fn with_shape(mut self, shape: Vec<Dim>) -> Self {
        self.shape = Some(shape);
        self
    }
}

/// A node attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// `INT`.
    Int(i64),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOAT`.
    Float(f32),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRING` (UTF-8).
    String(String),
    /// `TENSOR`.
    Tensor(TensorData),
}

/// A named node attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    /// Attribute name, e.g. `"axis"`.
    pub name: String,
    /// Attribute value.
    pub value: AttrValue,
}

impl Attr {
    /// An `INT` attribute.
    pub fn int(name: &str, v: i64) -> Self {
        Self::new(name, AttrValue::Int(v))
    }

    /// An `INTS` attribute.
    pub fn ints(name: &str, v: &[i64]) -> Self {
        Self::new(name, AttrValue::Ints(v.to_vec()))
    }

    /// A `FLOAT` attribute.
    pub fn float(name: &str, v: f32) -> Self {
        Self::new(name, AttrValue::Float(v))
    }

    /// A `FLOATS` attribute.
    pub fn floats(name: &str, v: &[f32]) -> Self {
        Self::new(name, AttrValue::Floats(v.to_vec()))
    }

    /// A `STRING` attribute.
    pub fn string(name: &str, v: &str) -> Self {
        Self::new(name, AttrValue::String(v.to_string()))
    }

    /// A `TENSOR` attribute.
    pub fn tensor(name: &str, v: TensorData) -> Self {
        Self::new(name, AttrValue::Tensor(v))
    }

    fn new(name: &str, value: AttrValue) -> Self {
        Attr {
            name: name.to_string(),
            value,
        }
    }

    fn into_proto(self) -> onnx::AttributeProto {
        use onnx::attribute_proto::AttributeType as T;
        let mut a = onnx::AttributeProto {
            name: self.name,
            ..Default::default()
        };
        let ty = match self.value {
            AttrValue::Int(v) => {
                a.i = v;
                T::Int
            }
            AttrValue::Ints(v) => {
                a.ints = v;
                T::Ints
            }
            AttrValue::Float(v) => {
                a.f = v;
                T::Float
            }
            AttrValue::Floats(v) => {
                a.floats = v;
                T::Floats
            }
            AttrValue::String(v) => {
                a.s = v.into_bytes();
                T::String
            }
            AttrValue::Tensor(v) => {
                a.t = Some(v.into_proto(""));
                T::Tensor
            }
        };
        a.r#type = ty as i32;
        a
    }
}

/// Errors from building, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An explicit name is empty or contains `:` or `,`.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A name is already taken by another value in the graph.
    #[error("name {name:?} is already used in graph {graph:?}")]
    DuplicateName { name: String, graph: String },
    /// A tensor's byte length does not match its dtype and dims.
    #[error("tensor {tensor:?}: {bytes} bytes do not match {dtype:?} with dims {dims:?}")]
    TensorSize {
        tensor: String,
        dims: Vec<i64>,
        dtype: DType,
        bytes: usize,
    },
    /// The builder's opset is older than [`MIN_OPSET`].
    #[error("opset {0} is not supported: the builder emits opset {MIN_OPSET} or later")]
    UnsupportedOpset(i64),
    /// A node input was not produced earlier in this graph.
    #[error("node {node:?} uses value {value:?}, which is not defined before it (a value from another builder?)")]
    UndefinedValue { node: String, value: String },
    /// A graph output names no value of this graph.
    #[error("graph output {0:?} is not defined")]
    UndefinedOutput(String),
    /// `finish` was called before any output was declared.
    #[error("graph {0:?} has no outputs")]
    NoOutputs(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not a protobuf `ModelProto`.
    #[error("{}: not a valid ONNX model: {source}", .path.display())]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    /// Two nodes of one graph ask for different versions of one operator set.
    #[error("operator set {domain}: version {want} asked for, the graph already imports {have}")]
    DomainVersion {
        domain: String,
        have: i64,
        want: i64,
    },
    /// An external data file is shorter than a tensor's reference into it.
    #[error("{}: tensor {tensor:?} needs bytes {offset}..{end} but the file has only {file_len} bytes (truncated?)", .file.display())]
    ExternalDataTruncated {
        file: PathBuf,
        tensor: String,
        offset: u64,
        end: u64,
        file_len: u64,
    },
    /// A tensor's external data entries are malformed or point outside the model directory.
    #[error("tensor {tensor:?}: bad external data reference: {reason}")]
    ExternalData { tensor: String, reason: String },
    /// The model protobuf would be 2 GiB or more.
    #[error("{}: the model encodes to {bytes} bytes, over protobuf's 2 GiB limit; save it with an external data threshold", .path.display())]
    ModelTooLarge { path: PathBuf, bytes: usize },
    /// The save path has no usable file name.
    #[error("{}: not a file path", .0.display())]
    InvalidPath(PathBuf),
}

/// Replaces the characters ONNX tooling treats as separators.
fn sanitize(s: &str) -> String {
    s.replace([':', ','], "_")
}

fn check_name(name: &str) -> Result<(), BuildError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.contains([':', ',']) {
        "contains ':' or ','"
    } else {
        return Ok(());
    };
    Err(BuildError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// A graph input or output of `dtype`, with `shape` when known.
pub fn value_info(name: &str, dtype: DType, shape: Option<&[Dim]>) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension, Dimension};
    let shape = shape.map(|dims| onnx::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => dimension::Value::DimValue(*n),
                    Dim::Sym(s) => dimension::Value::DimParam(s.clone()),
                }),
                ..Default::default()
            })
            .collect(),
    });
    onnx::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type: dtype.onnx() as i32,
                    shape,
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds one ONNX graph (and its model) call by call.
///
/// Structural mistakes in calls that return a [`Value`] (a duplicate input or
/// output name, a malformed constant) are recorded and reported by
/// [`GraphBuilder::finish`], so op chains need no `?` at every step.
pub struct GraphBuilder {
    graph_name: String,
    opset: i64,
    ir_version: i64,
    /// Where initializers over the threshold go as they are added (see [`Self::set_store`]).
    store: Option<(SharedStore, usize)>,
    /// The SHA-256 of each initializer (by index) whose bytes went to the store.
    stored_hashes: BTreeMap<usize, [u8; 32]>,
    /// Operator sets of other domains the graph's nodes use, with their versions.
    domains: BTreeMap<String, i64>,
    doc_string: Option<String>,
    metadata: BTreeMap<String, String>,
    scopes: Vec<String>,
    nodes: Vec<onnx::NodeProto>,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
    initializers: Vec<onnx::TensorProto>,
    initializer_index: BTreeMap<String, usize>,
    /// Every value name ever handed out, including renamed-away ones, so a
    /// stale [`Value`] can never alias a new one.
    names: BTreeSet<String>,
    node_names: BTreeSet<String>,
    counters: BTreeMap<String, usize>,
    consts: BTreeMap<TensorData, Value>,
    const_count: usize,
    producers: BTreeMap<String, usize>,
    aliases: BTreeMap<String, String>,
    output_names: BTreeSet<String>,
    errors: Vec<BuildError>,
}

impl GraphBuilder {
    /// A builder for graph `graph_name` importing the default domain at `opset`
    /// (see [`crate::onnx::DEFAULT_OPSET`]).
    pub fn new(graph_name: &str, opset: i64) -> Self {
        GraphBuilder {
            graph_name: graph_name.to_string(),
            opset,
            ir_version: onnx::IR_VERSION,
            store: None,
            stored_hashes: BTreeMap::new(),
            domains: BTreeMap::new(),
            doc_string: None,
            metadata: BTreeMap::new(),
            scopes: Vec::new(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            initializer_index: BTreeMap::new(),
            names: BTreeSet::new(),
            node_names: BTreeSet::new(),
            counters: BTreeMap::new(),
            consts: BTreeMap::new(),
            const_count: 0,
            producers: BTreeMap::new(),
            aliases: BTreeMap::new(),
            output_names: BTreeSet::new(),
            errors: Vec::new(),
        }
    }

    /// The default-domain opset this builder targets.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Declares IR version `v` in the model (default [`onnx::IR_VERSION`]).
    pub fn set_ir_version(&mut self, v: i64) {
        self.ir_version = v;
    }

    /// Sets a `metadata_props` entry (entries are emitted sorted by key).
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Sets the model's `doc_string`.
    pub fn set_doc_string(&mut self, doc: &str) {
        self.doc_string = Some(doc.to_string());
    }

    // ---- scopes and names -------------------------------------------------

    /// Enters a name scope; `name` may itself be dotted (`"layers.3"`).
    pub fn push_scope(&mut self, name: &str) {
        self.scopes.push(sanitize(name));
    }

    /// Leaves the innermost scope, returning its name.
    pub fn pop_scope(&mut self) -> Option<String> {
        self.scopes.pop()
    }

    /// Runs `f` inside scope `name`.
    pub fn scoped<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.push_scope(name);
        let r = f(self);
        self.pop_scope();
        r
    }

    /// The current dotted scope (`""` at top level).
    pub fn scope(&self) -> String {
        self.scopes
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(".")
    }

    fn scoped_name(&self, name: &str) -> String {
        let scope = self.scope();
        if scope.is_empty() {
            name.to_string()
        } else {
            format!("{scope}.{name}")
        }
    }

    fn is_taken(&self, name: &str) -> bool {
        self.names.contains(name) || self.node_names.contains(name)
    }

    /// `<scope>.<base>_<n>` with the first free `n` for that base.
    fn fresh(&mut self, base: &str) -> String {
        let base = self.scoped_name(&sanitize(base));
        loop {
            let n = self.counters.entry(base.clone()).or_insert(0);
            let name = format!("{base}_{n}");
            *n += 1;
            if !self.is_taken(&name) {
                return name;
            }
        }
    }

    fn resolve(&self, name: &str) -> String {
        let mut name = name;
        while let Some(next) = self.aliases.get(name) {
            name = next;
        }
        name.to_string()
    }

    fn fail(&mut self, e: BuildError) {
        self.errors.push(e);
    }

    // ---- graph inputs and outputs -----------------------------------------

    /// Declares a graph input (its name is global, not scoped).
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) -> Value {
        if let Err(e) = check_name(name) {
            self.fail(e);
        } else if self.names.contains(name) {
            self.fail(BuildError::DuplicateName {
                name: name.to_string(),
                graph: self.graph_name.clone(),
            });
        } else {
            self.names.insert(name.to_string());
            self.inputs.push(value_info(name, dtype, Some(&shape)));
        }
        Value {
            name: name.to_string(),
            dtype,
            shape: Some(shape),
        }
    }

    /// Declares `v` as graph output `name`, with `v`'s shape if known.
    pub fn output(&mut self, v: &Value, name: &str) {
        self.add_output(v, name, v.shape.clone());
    }

    /// Declares `v` as graph output `name` with an explicit shape.
    pub fn output_with_shape(&mut self, v: &Value, name: &str, shape: Vec<Dim>) {
        self.add_output(v, name, Some(shape));
    }

    fn add_output(&mut self, v: &Value, name: &str, shape: Option<Vec<Dim>>) {
        if let Err(e) = check_name(name) {
            return self.fail(e);
        }
        let src = self.resolve(&v.name);
        let duplicate = if src == name {
            self.output_names.contains(name)
        } else {
            self.is_taken(name)
        };
        if duplicate {
            return self.fail(BuildError::DuplicateName {
                name: name.to_string(),
                graph: self.graph_name.clone(),
            });
        }
        if src != name {
            match self.producers.get(&src).copied() {
                // Renaming the producing node's output avoids an Identity node;
                // consumers so far are patched, later ones go through `aliases`.
                Some(idx) if !self.output_names.contains(&src) => {
                    for node in &mut self.nodes {
                        for n in node.input.iter_mut().chain(node.output.iter_mut()) {
                            if *n == src {
                                *n = name.to_string();
                            }
                        }
                    }
                    self.producers.remove(&src);
                    self.producers.insert(name.to_string(), idx);
                    self.aliases.insert(src, name.to_string());
                }
                _ => {
                    self.node_names.insert(name.to_string());
                    self.producers.insert(name.to_string(), self.nodes.len());
                    self.nodes.push(onnx::NodeProto {
                        name: name.to_string(),
                        op_type: "Identity".to_string(),
                        input: vec![src],
                        output: vec![name.to_string()],
                        ..Default::default()
                    });
                }
            }
            self.names.insert(name.to_string());
        }
        self.output_names.insert(name.to_string());
        self.outputs
            .push(value_info(name, v.dtype, shape.as_deref()));
    }

    // ---- initializers -------------------------------------------------------

    /// Adds a weight initializer named `<scope>.<name>`.
    ///
    /// Adding the same name twice with identical content returns the existing
    /// value; with different content it is a [`BuildError::DuplicateName`].
    pub fn weight(&mut self, name: &str, t: TensorData) -> Result<Value, BuildError> {
        check_name(name)?;
        let full = self.scoped_name(name);
        t.check(&full)?;
        let value = Value {
            name: full.clone(),
            dtype: t.dtype,
            shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        };
        if let Some(&i) = self.initializer_index.get(&full) {
            let old = &self.initializers[i];
            let same_bytes = match self.stored_hashes.get(&i) {
                Some(h) => {
                    use sha2::Digest;
                    <[u8; 32]>::from(sha2::Sha256::digest(&t.raw)) == *h
                }
                None => old.raw_data == t.raw,
            };
            if old.data_type == t.dtype.onnx() as i32 && old.dims == t.dims && same_bytes {
                return Ok(value);
            }
        }
        if self.is_taken(&full) {
            return Err(BuildError::DuplicateName {
                name: full,
                graph: self.graph_name.clone(),
            });
        }
        self.add_initializer(&full, t);
        Ok(value)
    }

    /// The initializer named `name` exactly (no scope applied), if the graph has one.
    pub fn initializer_value(&self, name: &str) -> Option<Value> {
        let &i = self.initializer_index.get(name)?;
        let t = &self.initializers[i];
        let dtype = DType::from_onnx(t.data_type)?;
        Some(Value {
            name: name.to_string(),
            dtype,
            shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        })
    }

    /// Sends every initializer of more than `threshold` bytes added from now on straight into
    /// `store` (ONNX external data), so that a graph's weights are not held in memory as a
    /// whole while it is built.
    pub fn set_store(&mut self, store: SharedStore, threshold: usize) {
        self.store = Some((store, threshold));
    }

    fn add_initializer(&mut self, name: &str, t: TensorData) {
        self.names.insert(name.to_string());
        let i = self.initializers.len();
        self.initializer_index.insert(name.to_string(), i);
        let mut proto = t.into_proto(name);
        if let Some((store, threshold)) = &self.store {
            if proto.raw_data.len() > *threshold {
                match store.borrow_mut().externalize_tensor(&mut proto) {
                    Ok(h) => {
                        self.stored_hashes.insert(i, h);
                    }
                    Err(e) => self.errors.push(e),
                }
            }
        }
        self.initializers.push(proto);
    }

    /// A constant, stored as an initializer `const.<n>` (global, unscoped).
    /// Identical (dtype, dims, bytes) share one initializer.
    pub fn constant(&mut self, t: TensorData) -> Value {
        if let Some(v) = self.consts.get(&t) {
            return v.clone();
        }
        if let Err(e) = t.check("const") {
            self.fail(e);
        }
        let name = loop {
            let name = format!("const.{}", self.const_count);
            self.const_count += 1;
            if !self.is_taken(&name) {
                break name;
            }
        };
        let v = Value {
            name: name.clone(),
            dtype: t.dtype,
            shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        };
        self.consts.insert(t.clone(), v.clone());
        self.add_initializer(&name, t);
        v
    }

    /// An `i64` constant of shape `dims`.
    pub fn const_i64(&mut self, values: &[i64], dims: &[i64]) -> Value {
        self.constant(TensorData::from_i64(values, dims))
    }

    /// A 1-D `i64` constant (shapes, axes, indices).
    pub fn vec_i64(&mut self, values: &[i64]) -> Value {
        self.const_i64(values, &[values.len() as i64])
    }

    /// An `f32` constant of shape `dims`.
    pub fn const_f32(&mut self, values: &[f32], dims: &[i64]) -> Value {
        self.constant(TensorData::from_f32(values, dims))
    }

    /// A scalar `f32` constant.
    pub fn scalar_f32(&mut self, x: f32) -> Value {
        self.const_f32(&[x], &[])
    }

    /// A scalar `i64` constant.
    pub fn scalar_i64(&mut self, x: i64) -> Value {
        self.const_i64(&[x], &[])
    }

    /// A scalar constant of `dtype` (e.g. an epsilon matching activations).
    pub fn scalar(&mut self, dtype: DType, x: f64) -> Value {
        self.constant(TensorData::scalar(dtype, x))
    }

    // ---- generic ops --------------------------------------------------------

    /// Appends a single-output node of `op_type`.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&Value],
        attrs: Vec<Attr>,
        out_dtype: DType,
    ) -> Value {
        let inputs: Vec<Option<&Value>> = inputs.iter().map(|v| Some(*v)).collect();
        self.op_opt(op_type, &inputs, attrs, out_dtype)
    }

    /// Like [`Self::op`], naming the node and its output `<scope>.<name>`
    /// (suffixed with a counter if that is taken).
    pub fn op_named(
        &mut self,
        name: &str,
        op_type: &str,
        inputs: &[&Value],
        attrs: Vec<Attr>,
        out_dtype: DType,
    ) -> Value {
        let inputs: Vec<Option<&Value>> = inputs.iter().map(|v| Some(*v)).collect();
        self.node(op_type, Some(name), &inputs, attrs, &[out_dtype])
            .remove(0)
    }

    /// A node of operator set `domain` (version `version`, imported by the model), otherwise
    /// as [`Self::op_opt`]; e.g. ONNX Runtime's `com.microsoft` contrib operators.
    pub fn op_in_domain(
        &mut self,
        domain: &str,
        version: i64,
        op_type: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<Attr>,
        out_dtype: DType,
    ) -> Value {
        self.op_multi_in_domain(domain, version, op_type, inputs, attrs, &[out_dtype])
            .remove(0)
    }

    /// [`Self::op_in_domain`] with one output per entry of `out_dtypes`.
    pub fn op_multi_in_domain(
        &mut self,
        domain: &str,
        version: i64,
        op_type: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<Attr>,
        out_dtypes: &[DType],
    ) -> Vec<Value> {
        let have = *self.domains.entry(domain.to_string()).or_insert(version);
        if have != version {
            self.errors.push(BuildError::DomainVersion {
                domain: domain.to_string(),
                have,
                want: version,
            });
        }
        let out = self.op_multi(op_type, inputs, attrs, out_dtypes);
        if let Some(n) = self.nodes.last_mut() {
            n.domain = domain.to_string();
        }
        out
    }

    /// Like [`Self::op`] with optional inputs: `None` becomes an empty input name.
    pub fn op_opt(
        &mut self,
        op_type: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<Attr>,
        out_dtype: DType,
    ) -> Value {
        self.node(op_type, None, inputs, attrs, &[out_dtype])
            .remove(0)
    }

    /// Appends a node with one output per entry of `out_dtypes`.
    pub fn op_multi(
        &mut self,
        op_type: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<Attr>,
        out_dtypes: &[DType],
    ) -> Vec<Value> {
        self.node(op_type, None, inputs, attrs, out_dtypes)
    }

    fn node(
        &mut self,
        op_type: &str,
        name: Option<&str>,
        inputs: &[Option<&Value>],
        attrs: Vec<Attr>,
        out_dtypes: &[DType],
    ) -> Vec<Value> {
        let node_name = match name {
            Some(n) => {
                let full = self.scoped_name(&sanitize(n));
                if self.is_taken(&full) {
                    self.fresh(n)
                } else {
                    full
                }
            }
            None => self.fresh(op_type),
        };
        self.node_names.insert(node_name.clone());
        let outputs: Vec<String> = if out_dtypes.len() == 1 {
            vec![node_name.clone()]
        } else {
            (0..out_dtypes.len())
                .map(|i| {
                    let mut n = format!("{node_name}_out{i}");
                    while self.is_taken(&n) {
                        n.push('_');
                    }
                    self.names.insert(n.clone());
                    n
                })
                .collect()
        };
        for o in &outputs {
            self.names.insert(o.clone());
            self.producers.insert(o.clone(), self.nodes.len());
        }
        let mut input: Vec<String> = inputs
            .iter()
            .map(|v| v.map(|v| self.resolve(&v.name)).unwrap_or_default())
            .collect();
        while input.last().is_some_and(|s| s.is_empty()) {
            input.pop();
        }
        self.nodes.push(onnx::NodeProto {
            name: node_name,
            op_type: op_type.to_string(),
            input,
            output: outputs.clone(),
            attribute: attrs.into_iter().map(Attr::into_proto).collect(),
            ..Default::default()
        });
        outputs
            .into_iter()
            .zip(out_dtypes)
            .map(|(name, &dtype)| Value {
                name,
                dtype,
                shape: None,
            })
            .collect()
    }

    fn unary(&mut self, op_type: &str, x: &Value) -> Value {
        let mut y = self.op(op_type, &[x], vec![], x.dtype);
        y.shape = x.shape.clone();
        y
    }

    fn binary(&mut self, op_type: &str, a: &Value, b: &Value) -> Value {
        let mut y = self.op(op_type, &[a, b], vec![], a.dtype);
        if a.shape == b.shape {
            y.shape = a.shape.clone();
        }
        y
    }

    fn compare(&mut self, op_type: &str, a: &Value, b: &Value) -> Value {
        self.op(op_type, &[a, b], vec![], DType::Bool)
    }

    /// Axes as an input from `input_since` on, as an attribute before; empty
    /// axes are omitted (meaning all axes for reductions).
    fn with_axes(
        &mut self,
        op_type: &str,
        x: &Value,
        axes: &[i64],
        mut attrs: Vec<Attr>,
        input_since: i64,
    ) -> Value {
        if axes.is_empty() {
            self.op(op_type, &[x], attrs, x.dtype)
        } else if self.opset >= input_since {
            let a = self.vec_i64(axes);
            self.op(op_type, &[x, &a], attrs, x.dtype)
        } else {
            attrs.insert(0, Attr::ints("axes", axes));
            self.op(op_type, &[x], attrs, x.dtype)
        }
    }

    // ---- op helpers ---------------------------------------------------------

    /// `MatMul(a, b)`.
    pub fn matmul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("MatMul", &[a, b], vec![], a.dtype)
    }

    /// `Add(a, b)`.
    pub fn add(&mut self, a: &Value, b: &Value) -> Value {
        self.binary("Add", a, b)
    }

    /// `Sub(a, b)`.
    pub fn sub(&mut self, a: &Value, b: &Value) -> Value {
        self.binary("Sub", a, b)
    }

    /// `Mul(a, b)`.
    pub fn mul(&mut self, a: &Value, b: &Value) -> Value {
        self.binary("Mul", a, b)
    }

    /// `Div(a, b)`.
    pub fn div(&mut self, a: &Value, b: &Value) -> Value {
        self.binary("Div", a, b)
    }

    /// `Pow(a, b)`.
    pub fn pow(&mut self, a: &Value, b: &Value) -> Value {
        self.binary("Pow", a, b)
    }

    /// `Sqrt(x)`.
    pub fn sqrt(&mut self, x: &Value) -> Value {
        self.unary("Sqrt", x)
    }

    /// `Reciprocal(x)`.
    pub fn reciprocal(&mut self, x: &Value) -> Value {
        self.unary("Reciprocal", x)
    }

    /// `Neg(x)`.
    pub fn neg(&mut self, x: &Value) -> Value {
        self.unary("Neg", x)
    }

    /// `Sigmoid(x)`.
    pub fn sigmoid(&mut self, x: &Value) -> Value {
        self.unary("Sigmoid", x)
    }

    /// `Exp(x)`.
    pub fn exp(&mut self, x: &Value) -> Value {
        self.unary("Exp", x)
    }

    /// `Sin(x)`.
    pub fn sin(&mut self, x: &Value) -> Value {
        self.unary("Sin", x)
    }

    /// `Cos(x)`.
    pub fn cos(&mut self, x: &Value) -> Value {
        self.unary("Cos", x)
    }

    /// `Identity(x)`.
    pub fn identity(&mut self, x: &Value) -> Value {
        self.unary("Identity", x)
    }

    /// `ReduceMean` over `axes` (attribute before opset 18, input from 18).
    pub fn reduce_mean(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let attrs = vec![Attr::int("keepdims", keepdims.into())];
        self.with_axes("ReduceMean", x, axes, attrs, 18)
    }

    /// `ReduceMax` over `axes` (attribute before opset 18, input from 18).
    pub fn reduce_max(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let attrs = vec![Attr::int("keepdims", keepdims.into())];
        self.with_axes("ReduceMax", x, axes, attrs, 18)
    }

    /// `ReduceSum` over `axes` (an input since opset 13).
    pub fn reduce_sum(&mut self, x: &Value, axes: &[i64], keepdims: bool) -> Value {
        let attrs = vec![Attr::int("keepdims", keepdims.into())];
        self.with_axes("ReduceSum", x, axes, attrs, 13)
    }

    /// `Softmax(x, axis)`.
    pub fn softmax(&mut self, x: &Value, axis: i64) -> Value {
        let mut y = self.op("Softmax", &[x], vec![Attr::int("axis", axis)], x.dtype);
        y.shape = x.shape.clone();
        y
    }

    /// `Cast(x, to)`.
    pub fn cast(&mut self, x: &Value, to: DType) -> Value {
        let mut y = self.op("Cast", &[x], vec![Attr::int("to", to.onnx() as i64)], to);
        y.shape = x.shape.clone();
        y
    }

    /// `Reshape(x, shape)` with a constant target shape (`0` copies, `-1` infers).
    pub fn reshape(&mut self, x: &Value, shape: &[i64]) -> Value {
        let s = self.vec_i64(shape);
        self.reshape_to(x, &s)
    }

    /// `Reshape(x, shape)` with a computed target shape.
    pub fn reshape_to(&mut self, x: &Value, shape: &Value) -> Value {
        self.op("Reshape", &[x, shape], vec![], x.dtype)
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Value {
        self.op("Transpose", &[x], vec![Attr::ints("perm", perm)], x.dtype)
    }

    /// `x` cut along `axis` into consecutive parts of `sizes`.
    pub fn split(&mut self, x: &Value, axis: i64, sizes: &[i64]) -> Vec<Value> {
        let dtypes = vec![x.dtype; sizes.len()];
        let sizes = self.vec_i64(sizes);
        self.op_multi(
            "Split",
            &[Some(x), Some(&sizes)],
            vec![Attr::int("axis", axis)],
            &dtypes,
        )
    }

    /// `Concat(xs, axis)`; the output takes the first input's dtype.
    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Value {
        let dtype = xs.first().map_or(DType::F32, |v| v.dtype);
        self.op("Concat", xs, vec![Attr::int("axis", axis)], dtype)
    }

    /// `Slice(x, starts, ends, axes, steps)` with constant `i64` bounds.
    pub fn slice(
        &mut self,
        x: &Value,
        starts: &[i64],
        ends: &[i64],
        axes: &[i64],
        steps: Option<&[i64]>,
    ) -> Value {
        let s = self.vec_i64(starts);
        let e = self.vec_i64(ends);
        let a = self.vec_i64(axes);
        let st = steps.map(|st| self.vec_i64(st));
        self.op_opt(
            "Slice",
            &[Some(x), Some(&s), Some(&e), Some(&a), st.as_ref()],
            vec![],
            x.dtype,
        )
    }

    /// `Gather(data, indices, axis)`.
    pub fn gather(&mut self, data: &Value, indices: &Value, axis: i64) -> Value {
        self.op(
            "Gather",
            &[data, indices],
            vec![Attr::int("axis", axis)],
            data.dtype,
        )
    }

    /// `Unsqueeze(x, axes)` (axes an input since opset 13).
    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        self.with_axes("Unsqueeze", x, axes, vec![], 13)
    }

    /// `Squeeze(x, axes)` (axes an input since opset 13; empty = all size-1 axes).
    pub fn squeeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        self.with_axes("Squeeze", x, axes, vec![], 13)
    }

    /// `Expand(x, shape)`.
    pub fn expand(&mut self, x: &Value, shape: &Value) -> Value {
        self.op("Expand", &[x, shape], vec![], x.dtype)
    }

    /// `Where(cond, x, y)`.
    pub fn where_(&mut self, cond: &Value, x: &Value, y: &Value) -> Value {
        self.op("Where", &[cond, x, y], vec![], x.dtype)
    }

    /// `Equal(a, b)` (bool output).
    pub fn equal(&mut self, a: &Value, b: &Value) -> Value {
        self.compare("Equal", a, b)
    }

    /// `Less(a, b)` (bool output).
    pub fn less(&mut self, a: &Value, b: &Value) -> Value {
        self.compare("Less", a, b)
    }

    /// `Greater(a, b)` (bool output).
    pub fn greater(&mut self, a: &Value, b: &Value) -> Value {
        self.compare("Greater", a, b)
    }

    /// `Range(start, limit, delta)` (scalars of one dtype).
    pub fn range(&mut self, start: &Value, limit: &Value, delta: &Value) -> Value {
        self.op("Range", &[start, limit, delta], vec![], start.dtype)
    }

    /// `Shape(x)` (`i64` output).
    pub fn shape(&mut self, x: &Value) -> Value {
        self.op("Shape", &[x], vec![], DType::I64)
    }

    // ---- finishing ----------------------------------------------------------

    /// Validates the graph and assembles the model.
    pub fn finish(self) -> Result<onnx::ModelProto, BuildError> {
        if let Some(e) = self.errors.into_iter().next() {
            return Err(e);
        }
        if self.opset < MIN_OPSET {
            return Err(BuildError::UnsupportedOpset(self.opset));
        }
        if self.outputs.is_empty() {
            return Err(BuildError::NoOutputs(self.graph_name));
        }
        let mut defined: BTreeSet<&str> = self.inputs.iter().map(|v| v.name.as_str()).collect();
        defined.extend(self.initializers.iter().map(|t| t.name.as_str()));
        for node in &self.nodes {
            if let Some(missing) = node
                .input
                .iter()
                .find(|n| !n.is_empty() && !defined.contains(n.as_str()))
            {
                return Err(BuildError::UndefinedValue {
                    node: node.name.clone(),
                    value: missing.clone(),
                });
            }
            defined.extend(node.output.iter().map(String::as_str));
        }
        if let Some(o) = self
            .outputs
            .iter()
            .find(|o| !defined.contains(o.name.as_str()))
        {
            return Err(BuildError::UndefinedOutput(o.name.clone()));
        }
        Ok(onnx::ModelProto {
            ir_version: self.ir_version,
            opset_import: std::iter::once(onnx::OperatorSetIdProto {
                domain: String::new(),
                version: self.opset,
            })
            .chain(
                self.domains
                    .iter()
                    .map(|(domain, &version)| onnx::OperatorSetIdProto {
                        domain: domain.clone(),
                        version,
                    }),
            )
            .collect(),
            producer_name: "famc".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc_string: self.doc_string.unwrap_or_default(),
            graph: Some(onnx::GraphProto {
                name: self.graph_name,
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: self
                .metadata
                .into_iter()
                .map(|(key, value)| onnx::StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        })
    }
}
