//! `famc inspect`: what a graph or an export holds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::builder::DType;
use crate::error::{Error, Result};
use crate::export::{Manifest, MANIFEST_FILE};
use crate::onnx;

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    /// Each dimension: a number or a symbol.
    pub shape: Vec<String>,
}

/// Summary of one ONNX file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GraphReport {
    pub path: PathBuf,
    pub ir_version: i64,
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub node_count: usize,
    pub ops: BTreeMap<String, usize>,
    pub initializer_count: usize,
    pub weight_bytes: u64,
    pub external_weight_bytes: u64,
    pub metadata: BTreeMap<String, String>,
}

/// Summary of an export directory or a single graph.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub manifest: Option<Manifest>,
    pub graphs: Vec<GraphReport>,
}

fn io_info(v: &onnx::ValueInfoProto) -> IoInfo {
    use onnx::tensor_shape_proto::dimension::Value as D;
    use onnx::type_proto::Value as T;
    let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(T::TensorType(t)) => (
            DType::from_onnx(t.elem_type).map_or_else(
                || format!("type {}", t.elem_type),
                |d| format!("{d:?}").to_lowercase(),
            ),
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(D::DimValue(n)) => n.to_string(),
                            Some(D::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => ("non-tensor".into(), Vec::new()),
    };
    IoInfo {
        name: v.name.clone(),
        dtype,
        shape,
    }
}

/// Reads a graph's structure without loading its external data.
pub fn inspect_graph(path: &Path) -> Result<GraphReport> {
    use prost::Message;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let m = onnx::ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Input(format!("{}: not an ONNX model: {e}", path.display())))?;
    let g = m
        .graph
        .as_ref()
        .ok_or_else(|| Error::Input(format!("{}: no graph", path.display())))?;
    let mut ops = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let mut weight_bytes = 0u64;
    let mut external = 0u64;
    for t in &g.initializer {
        let ext_len: Option<u64> = t
            .external_data
            .iter()
            .find(|e| e.key == "length")
            .and_then(|e| e.value.parse().ok());
        match ext_len {
            Some(n) => {
                external += n;
                weight_bytes += n;
            }
            None => {
                let numel: i64 = t.dims.iter().product();
                let size = DType::from_onnx(t.data_type).map_or(0, |d| d.size_bytes() as u64);
                weight_bytes += if t.raw_data.is_empty() {
                    numel as u64 * size
                } else {
                    t.raw_data.len() as u64
                };
            }
        }
    }
    Ok(GraphReport {
        path: path.to_path_buf(),
        ir_version: m.ir_version,
        opsets: m
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        producer: format!("{} {}", m.producer_name, m.producer_version)
            .trim()
            .to_string(),
        inputs: g.input.iter().map(io_info).collect(),
        outputs: g.output.iter().map(io_info).collect(),
        node_count: g.node.len(),
        ops,
        initializer_count: g.initializer.len(),
        weight_bytes,
        external_weight_bytes: external,
        metadata: m
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
    })
}

/// Inspects an export directory (its manifest and every graph) or one `.onnx` file.
pub fn inspect(path: &Path) -> Result<Report> {
    if path.is_dir() {
        let manifest = Manifest::read(path).map_err(|e| match e {
            Error::Io { .. } if !path.join(MANIFEST_FILE).exists() => Error::Input(format!(
                "{}: no {MANIFEST_FILE}: not a famc export (pass a .onnx file or an export directory)",
                path.display()
            )),
            other => other,
        })?;
        let graphs = manifest
            .graphs
            .names()
            .map(|f| inspect_graph(&path.join(f)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Report {
            manifest: Some(manifest),
            graphs,
        })
    } else {
        Ok(Report {
            manifest: None,
            graphs: vec![inspect_graph(path)?],
        })
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.manifest {
            let d = &m.model;
            writeln!(
                f,
                "FAM: L = {}, F = {}, M = {}; dtype {}; format {}",
                m.fam.block_len, m.fam.fam_len, m.fam.mem_blocks, m.dtype, m.format_version
            )?;
            writeln!(
                f,
                "model: d = {}, layers = {}, heads = {} (kv {}), head_dim = {}, intermediate = {}, vocab = {}, rope_theta = {}",
                d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size, d.vocab_size, d.rope_theta
            )?;
            writeln!(f, "checkpoint sha256: {}", m.checkpoint_sha256)?;
            writeln!(f, "state tensors: {}", m.state.len())?;
        }
        for g in &self.graphs {
            writeln!(f)?;
            writeln!(f, "{}", g.path.display())?;
            let opsets: Vec<String> = g
                .opsets
                .iter()
                .map(|(d, v)| {
                    format!(
                        "{}{v}",
                        if d.is_empty() {
                            String::new()
                        } else {
                            format!("{d} ")
                        }
                    )
                })
                .collect();
            writeln!(
                f,
                "  ir_version {}, opset {}, producer {}",
                g.ir_version,
                opsets.join(", "),
                g.producer
            )?;
            for (label, list) in [("inputs", &g.inputs), ("outputs", &g.outputs)] {
                writeln!(f, "  {label} ({}):", list.len())?;
                for io in list {
                    writeln!(f, "    {} {} [{}]", io.name, io.dtype, io.shape.join(", "))?;
                }
            }
            writeln!(
                f,
                "  weights: {} in {} initializers ({} external)",
                human_bytes(g.weight_bytes),
                g.initializer_count,
                human_bytes(g.external_weight_bytes)
            )?;
            writeln!(f, "  nodes: {}", g.node_count)?;
            for (op, n) in &g.ops {
                writeln!(f, "    {op:<20} {n}")?;
            }
        }
        Ok(())
    }
}

fn attr_text(a: &onnx::AttributeProto) -> String {
    use onnx::attribute_proto::AttributeType as A;
    let v = match A::try_from(a.r#type).unwrap_or(A::Undefined) {
        A::Int => a.i.to_string(),
        A::Float => format!("{:?}", a.f),
        A::String => format!("{:?}", String::from_utf8_lossy(&a.s)),
        A::Ints => format!("{:?}", a.ints),
        A::Floats => format!("{:?}", a.floats),
        A::Tensor => {
            a.t.as_ref()
                .map_or("tensor".into(), |t| format!("tensor{:?}", t.dims))
        }
        other => format!("{other:?}"),
    };
    format!("{}={v}", a.name)
}

/// A readable, deterministic text dump of a graph: inputs, outputs, initializers and every node.
pub fn dump_graph(path: &Path) -> Result<String> {
    use prost::Message;
    use std::fmt::Write;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let m = onnx::ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::Input(format!("{}: not an ONNX model: {e}", path.display())))?;
    let g = m.graph.unwrap_or_default();
    let mut s = String::new();
    let opsets: Vec<String> = m
        .opset_import
        .iter()
        .map(|o| format!("{}:{}", o.domain, o.version))
        .collect();
    writeln!(
        s,
        "graph {} ir_version={} opsets=[{}]",
        g.name,
        m.ir_version,
        opsets.join(", ")
    )
    .ok();
    for (label, list) in [("input", &g.input), ("output", &g.output)] {
        for v in list {
            let io = io_info(v);
            writeln!(
                s,
                "{label} {} {}[{}]",
                io.name,
                io.dtype,
                io.shape.join(", ")
            )
            .ok();
        }
    }
    for t in &g.initializer {
        let dtype = DType::from_onnx(t.data_type).map_or_else(
            || t.data_type.to_string(),
            |d| format!("{d:?}").to_lowercase(),
        );
        let place = if t.external_data.is_empty() {
            ""
        } else {
            " external"
        };
        writeln!(s, "init {} {dtype}{:?}{place}", t.name, t.dims).ok();
    }
    for n in &g.node {
        let attrs: Vec<String> = n.attribute.iter().map(attr_text).collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!("[{}]", attrs.join(", "))
        };
        writeln!(
            s,
            "{} = {}{attrs}({})",
            n.output.join(", "),
            n.op_type,
            n.input.join(", ")
        )
        .ok();
    }
    Ok(s)
}
