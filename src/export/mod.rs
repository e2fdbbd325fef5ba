//! `famc export`: a checkpoint compiled into graph files and a manifest (docs/graph-contract.md).

mod manifest;

pub use manifest::{GraphFiles, Manifest, ModelDims, StateTensor, FORMAT_VERSION, MANIFEST_FILE};

use std::path::{Path, PathBuf};

use crate::builder::save_model;
pub use crate::emit::WeightDtype;
use crate::emit::{self, names, EmitSpec};
use crate::error::{Error, Result};
use crate::model::{Checkpoint, FamParams};
use crate::onnx::{self, DEFAULT_OPSET, IR_VERSION};

/// Initializers larger than this go to `<graph>.onnx.data` by default: well under protobuf's
/// 2 GiB message limit, whatever the model's size.
pub const DEFAULT_EXTERNAL_THRESHOLD: usize = 1 << 20;

/// Block graph file name.
pub const BLOCK_FILE: &str = "block.onnx";
/// Init graph file name.
pub const INIT_FILE: &str = "init.onnx";
/// Decode graph file name.
pub const DECODE_FILE: &str = "decode.onnx";
/// FAM keys/values graph file name.
pub const FAM_KV_FILE: &str = "fam_kv.onnx";

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Initializers of more bytes than this are written as external data.
    pub external_threshold: usize,
    /// How weight matrices are stored.
    pub dtype: WeightDtype,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            external_threshold: DEFAULT_EXTERNAL_THRESHOLD,
            dtype: WeightDtype::F32,
        }
    }
}

/// The emitted graphs of a model, in memory.
pub struct Compiled {
    pub manifest: Manifest,
    pub block: onnx::ModelProto,
    pub init: Option<onnx::ModelProto>,
    pub decode: onnx::ModelProto,
    pub fam_kv: Option<onnx::ModelProto>,
}

impl Compiled {
    /// Every graph with its file name, in a fixed order.
    pub fn graphs(&self) -> Vec<(&'static str, &onnx::ModelProto)> {
        let mut v = vec![(BLOCK_FILE, &self.block)];
        if let Some(g) = &self.init {
            v.push((INIT_FILE, g));
        }
        v.push((DECODE_FILE, &self.decode));
        if let Some(g) = &self.fam_kv {
            v.push((FAM_KV_FILE, g));
        }
        v
    }
}

/// The state tensors of the block graph, in input order.
pub fn state_tensors(ck: &Checkpoint, fam: FamParams) -> Vec<StateTensor> {
    let c = &ck.config;
    let mut out = Vec::new();
    for l in 0..c.num_layers {
        if fam.fam_len > 0 {
            out.push(StateTensor {
                input: names::fam(l),
                output: names::next(&names::fam(l)),
                init: Some(names::init_fam(l)),
                shape: vec![fam.fam_len, c.hidden_size],
                layer: l,
                kind: "fam".into(),
            });
        }
        if fam.mem_blocks > 0 {
            for (kind, input) in [("mem_k", names::mem_k(l)), ("mem_v", names::mem_v(l))] {
                out.push(StateTensor {
                    output: names::next(&input),
                    input,
                    init: None,
                    shape: vec![c.num_kv_heads, fam.mem_len(), c.head_dim],
                    layer: l,
                    kind: kind.into(),
                });
            }
        }
    }
    out
}

/// Emits the graphs and the manifest of `ck` with FAM parameters `fam`.
pub fn compile(ck: &Checkpoint, fam: FamParams, dtype: WeightDtype) -> Result<Compiled> {
    fam.validate()?;
    let c = &ck.config;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        famc_version: env!("CARGO_PKG_VERSION").to_string(),
        fam,
        model: ModelDims {
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rope_theta: c.rope_theta,
            rms_norm_eps: c.rms_norm_eps,
        },
        dtype: dtype.name().into(),
        opset: DEFAULT_OPSET,
        ir_version: IR_VERSION,
        checkpoint_sha256: ck.hash.clone(),
        graphs: GraphFiles {
            block: BLOCK_FILE.into(),
            init: (fam.fam_len > 0).then(|| INIT_FILE.into()),
            decode: Some(DECODE_FILE.into()),
            fam_kv: (fam.fam_len > 0).then(|| FAM_KV_FILE.into()),
        },
        state: state_tensors(ck, fam),
    };
    let spec = EmitSpec {
        config: c,
        weights: &ck.weights,
        fam,
        weight_dtype: dtype,
    };
    let mut block = emit::block_graph(&spec)?;
    let mut init = if fam.fam_len > 0 {
        Some(emit::init_graph(&spec)?)
    } else {
        None
    };
    let mut decode = emit::decode_graph(&spec)?;
    let mut fam_kv = if fam.fam_len > 0 {
        Some(emit::fam_kv_graph(&spec)?)
    } else {
        None
    };
    for g in [
        Some(&mut block),
        init.as_mut(),
        Some(&mut decode),
        fam_kv.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        stamp(g, &manifest);
    }
    Ok(Compiled {
        manifest,
        block,
        init,
        decode,
        fam_kv,
    })
}

/// Mirrors the manifest into `metadata_props`, sorted by key.
fn stamp(model: &mut onnx::ModelProto, m: &Manifest) {
    let json = serde_json::to_string(m).expect("manifest serialises");
    let props = [
        ("famc.block_len", m.fam.block_len.to_string()),
        ("famc.checkpoint_sha256", m.checkpoint_sha256.clone()),
        ("famc.dtype", m.dtype.clone()),
        ("famc.fam_len", m.fam.fam_len.to_string()),
        ("famc.format_version", m.format_version.to_string()),
        ("famc.manifest", json),
        ("famc.mem_blocks", m.fam.mem_blocks.to_string()),
    ];
    model.metadata_props = props
        .into_iter()
        .map(|(key, value)| onnx::StringStringEntryProto {
            key: key.into(),
            value,
        })
        .collect();
}

/// Writes the compiled graphs and `famc.json` into `dir` (created if needed); each file is
/// written to a temporary name and renamed.
pub fn write(compiled: &Compiled, dir: &Path, opts: &ExportOptions) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let graphs = compiled.graphs();
    for (file, g) in &graphs {
        save_model((*g).clone(), &dir.join(file), Some(opts.external_threshold))?;
    }
    // a re-export into the same directory must not leave graphs of another configuration behind
    for file in [INIT_FILE, FAM_KV_FILE] {
        if !graphs.iter().any(|(f, _)| *f == file) {
            for stale in [dir.join(file), dir.join(format!("{file}.data"))] {
                if stale.exists() {
                    std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
                }
            }
        }
    }
    compiled.manifest.write(dir)
}

/// Compiles `ck` and writes the export into `dir`.
pub fn export(
    ck: &Checkpoint,
    fam: FamParams,
    dir: &Path,
    opts: &ExportOptions,
) -> Result<Manifest> {
    let compiled = compile(ck, fam, opts.dtype)?;
    write(&compiled, dir, opts)?;
    Ok(compiled.manifest)
}

/// An export directory checked against its manifest: the graphs exist, parse, and declare the
/// inputs and outputs the manifest promises.
pub struct ExportDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ExportDir {
    /// Opens and checks `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let err = |message: String| Error::Export {
            dir: dir.to_path_buf(),
            message,
        };
        if !dir.join(MANIFEST_FILE).exists() {
            return Err(err(format!("no {MANIFEST_FILE}: not a famc export")));
        }
        let manifest = Manifest::read(dir)?;
        let block_path = dir.join(&manifest.graphs.block);
        let block = read_structure(&block_path)
            .map_err(|e| err(format!("{}: {e}", manifest.graphs.block)))?;
        check_block_graph(&block, &manifest)
            .map_err(|m| err(format!("{}: {m}", manifest.graphs.block)))?;
        if let Some(init) = &manifest.graphs.init {
            let g = read_structure(&dir.join(init)).map_err(|e| err(format!("{init}: {e}")))?;
            let outs: Vec<String> = graph_io(&g).1;
            for st in &manifest.state {
                if let Some(name) = &st.init {
                    if !outs.contains(name) {
                        return Err(err(format!(
                            "{init} has no output `{name}` that famc.json names"
                        )));
                    }
                }
            }
        } else if manifest.fam.fam_len > 0 {
            return Err(err("famc.json has F > 0 but names no init graph".into()));
        }
        Ok(ExportDir {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn block_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.graphs.block)
    }

    pub fn init_path(&self) -> Option<PathBuf> {
        self.manifest.graphs.init.as_ref().map(|f| self.dir.join(f))
    }
}

/// A graph's structure without its external data: checking an export must not read gigabytes.
fn read_structure(path: &Path) -> std::result::Result<onnx::ModelProto, String> {
    use prost::Message;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| format!("not an ONNX model: {e}"))
}

fn graph_io(m: &onnx::ModelProto) -> (Vec<String>, Vec<String>) {
    let g = m.graph.as_ref();
    let names = |v: Option<&Vec<onnx::ValueInfoProto>>| {
        v.map(|v| v.iter().map(|i| i.name.clone()).collect())
            .unwrap_or_default()
    };
    (names(g.map(|g| &g.input)), names(g.map(|g| &g.output)))
}

fn dims_of(vi: &onnx::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use onnx::tensor_shape_proto::dimension::Value as D;
    use onnx::type_proto::Value as T;
    let Some(T::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(D::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect(),
    )
}

fn check_block_graph(m: &onnx::ModelProto, manifest: &Manifest) -> std::result::Result<(), String> {
    let g = m.graph.as_ref().ok_or("no graph")?;
    let (inputs, outputs) = graph_io(m);
    let mut want_in = vec![names::INPUT_IDS.to_string(), names::BLOCK_INDEX.to_string()];
    want_in.extend(manifest.state.iter().map(|s| s.input.clone()));
    if inputs != want_in {
        return Err(format!(
            "inputs {inputs:?} disagree with famc.json, which implies {want_in:?}"
        ));
    }
    let mut want_out = vec![names::LOGITS.to_string()];
    want_out.extend(manifest.state.iter().map(|s| s.output.clone()));
    if outputs != want_out {
        return Err(format!(
            "outputs {outputs:?} disagree with famc.json, which implies {want_out:?}"
        ));
    }
    for st in &manifest.state {
        let vi = g
            .input
            .iter()
            .find(|i| i.name == st.input)
            .expect("checked above");
        let dims =
            dims_of(vi).ok_or_else(|| format!("input `{}` has no tensor shape", st.input))?;
        let want: Vec<Option<i64>> = std::iter::once(None)
            .chain(st.shape.iter().map(|&d| Some(d as i64)))
            .collect();
        if dims != want {
            return Err(format!(
                "input `{}` has shape {dims:?}, famc.json says [batch] + {:?}",
                st.input, st.shape
            ));
        }
    }
    let logits = g
        .output
        .iter()
        .find(|o| o.name == names::LOGITS)
        .expect("checked above");
    if let Some(dims) = dims_of(logits) {
        if dims.last().copied().flatten() != Some(manifest.model.vocab_size as i64) {
            return Err(format!(
                "logits have shape {dims:?}, famc.json says vocab_size {}",
                manifest.model.vocab_size
            ));
        }
    }
    Ok(())
}
