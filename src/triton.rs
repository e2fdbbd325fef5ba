//! `famc export --triton REPO`: a Triton Inference Server model repository serving an export's
//! block graph with Triton's sequence batcher and implicit state (docs/serving.md).
//!
//! ```text
//! REPO/NAME/config.pbtxt             platform onnxruntime_onnx, sequence_batching, state
//! REPO/NAME/1/model.onnx             the block graph in Triton's form (emit::triton)
//! REPO/NAME/1/weights.data           the export's weight store
//! REPO/NAME/initial_state/L00.fam    each layer's FAM prompt state, raw little-endian f32
//! REPO/README.md                     how to start Triton on it, what a request looks like
//! REPO/famc-triton.json              what famc wrote, from which export
//! ```

use std::fmt::Write as _;
use std::path::Path;

use prost::Message;

use crate::emit::triton::{self as form, state_name, STEP_IN, STEP_OUT};
use crate::error::{Error, Result};
use crate::export::{ExportDir, WEIGHTS_FILE};
use crate::runtime::{BackendKind, RunOptions};

/// The file that marks a directory as a repository famc wrote (and may replace).
pub const MARKER_FILE: &str = "famc-triton.json";

/// How Triton's sequence batcher forms batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Any ready sequences' requests batch together (dynamic batching across sequences).
    Oldest,
    /// Each sequence keeps one batch slot for its lifetime; idle slots run as null rows.
    Direct,
}

/// TensorRT precision, as Triton's ONNX Runtime backend's `precision_mode` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrtPrecision {
    Fp32,
    Fp16,
}

/// The settings of `config.pbtxt`.
#[derive(Debug, Clone)]
pub struct TritonOptions {
    /// The model's name in the repository (and in request URLs).
    pub model_name: String,
    pub max_batch_size: usize,
    pub strategy: Strategy,
    /// `oldest`: sequences considered for a batch at once.
    pub max_candidate_sequences: usize,
    /// `oldest`: batch sizes Triton prefers to form.
    pub preferred_batch_sizes: Vec<usize>,
    /// `oldest`: how long a request may wait for others to join its batch.
    pub max_queue_delay_us: u64,
    /// A sequence idle this long is ended by Triton.
    pub max_sequence_idle_us: u64,
    /// `instance_group` on the GPU (KIND_GPU) rather than Triton's default placement.
    pub gpu: bool,
    /// Model instances.
    pub instances: usize,
    /// The TensorRT execution accelerator, with this precision.
    pub tensorrt: Option<TrtPrecision>,
}

impl Default for TritonOptions {
    fn default() -> Self {
        TritonOptions {
            model_name: "famc".into(),
            max_batch_size: 8,
            strategy: Strategy::Oldest,
            max_candidate_sequences: 64,
            preferred_batch_sizes: Vec::new(),
            max_queue_delay_us: 1000,
            max_sequence_idle_us: 60_000_000,
            gpu: false,
            instances: 1,
            tensorrt: None,
        }
    }
}

/// Refuses options Triton would reject, before anything is written.
pub fn check_options(opts: &TritonOptions) -> Result<()> {
    let bad = |m: String| Err(Error::Input(m));
    if !crate::io::is_plain_file_name(&opts.model_name) {
        return bad(format!(
            "--triton-model-name {:?} is not a plain directory name",
            opts.model_name
        ));
    }
    if opts.max_batch_size == 0 || opts.instances == 0 || opts.max_candidate_sequences == 0 {
        return bad("--triton-max-batch-size, --triton-instances and --triton-max-candidates must be at least 1".into());
    }
    if let Some(&p) = opts
        .preferred_batch_sizes
        .iter()
        .find(|&&p| p == 0 || p > opts.max_batch_size)
    {
        return bad(format!(
            "--triton-preferred-batch-size {p} is outside 1..={} (--triton-max-batch-size)",
            opts.max_batch_size
        ));
    }
    Ok(())
}

fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `config.pbtxt` of an export's repository.
pub fn config_pbtxt(export: &ExportDir, opts: &TritonOptions) -> String {
    let m = &export.manifest;
    let width = form::layer_width(m.model.num_layers);
    let l_len = m.fam.block_len;
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# written by famc {} from {}",
        env!("CARGO_PKG_VERSION"),
        m.checkpoint_sha256
    );
    let _ = writeln!(c, "name: \"{}\"", opts.model_name);
    let _ = writeln!(c, "platform: \"onnxruntime_onnx\"");
    let _ = writeln!(c, "max_batch_size: {}", opts.max_batch_size);
    let _ = writeln!(
        c,
        "input [\n  {{ name: \"input_ids\" data_type: TYPE_INT64 dims: [ {l_len} ] }}\n]"
    );
    let _ = writeln!(
        c,
        "output [\n  {{ name: \"logits\" data_type: TYPE_FP32 dims: [ {l_len}, {} ] }}\n]",
        m.model.vocab_size
    );
    let _ = writeln!(c, "sequence_batching {{");
    let _ = writeln!(
        c,
        "  max_sequence_idle_microseconds: {}",
        opts.max_sequence_idle_us
    );
    match opts.strategy {
        Strategy::Direct => {
            let _ = writeln!(c, "  direct {{ }}");
        }
        Strategy::Oldest => {
            let _ = writeln!(c, "  oldest {{");
            let _ = writeln!(
                c,
                "    max_candidate_sequences: {}",
                opts.max_candidate_sequences
            );
            if !opts.preferred_batch_sizes.is_empty() {
                let _ = writeln!(
                    c,
                    "    preferred_batch_size: [ {} ]",
                    dims(&opts.preferred_batch_sizes)
                );
            }
            let _ = writeln!(
                c,
                "    max_queue_delay_microseconds: {}",
                opts.max_queue_delay_us
            );
            let _ = writeln!(c, "  }}");
        }
    }
    let _ = writeln!(c, "  control_input [");
    for (name, kind, last) in [
        (form::START, "CONTROL_SEQUENCE_START", false),
        (form::READY, "CONTROL_SEQUENCE_READY", true),
    ] {
        let _ = writeln!(
            c,
            "    {{ name: \"{name}\" control [ {{ kind: {kind} int32_false_true: [ 0, 1 ] }} ] }}{}",
            if last { "" } else { "," }
        );
    }
    let _ = writeln!(c, "  ]");
    let _ = writeln!(c, "  state [");
    let mut entries = Vec::new();
    for st in &m.state {
        let shape = dims(&st.shape);
        let initial = if st.init.is_some() {
            format!(
                "initial_state {{ data_type: TYPE_FP32 dims: [ {shape} ] name: \"FAM prompt\" data_file: \"{}\" }}",
                initial_file(st.layer, st.kind.name(), width)
            )
        } else {
            format!("initial_state {{ data_type: TYPE_FP32 dims: [ {shape} ] name: \"zeros\" zero_data: true }}")
        };
        entries.push(format!(
            "    {{\n      input_name: \"{}\"\n      output_name: \"{}\"\n      data_type: TYPE_FP32\n      dims: [ {shape} ]\n      {initial}\n    }}",
            state_name("in", st.layer, st.kind.name(), width),
            state_name("out", st.layer, st.kind.name(), width),
        ));
    }
    entries.push(format!(
        "    {{\n      input_name: \"{STEP_IN}\"\n      output_name: \"{STEP_OUT}\"\n      data_type: TYPE_INT64\n      dims: [ 1 ]\n      initial_state {{ data_type: TYPE_INT64 dims: [ 1 ] name: \"block 0\" zero_data: true }}\n    }}"
    ));
    let _ = writeln!(c, "{}", entries.join(",\n"));
    let _ = writeln!(c, "  ]");
    let _ = writeln!(c, "}}");
    let kind = if opts.gpu { " kind: KIND_GPU" } else { "" };
    let _ = writeln!(
        c,
        "instance_group [ {{ count: {}{kind} }} ]",
        opts.instances
    );
    if let Some(p) = opts.tensorrt {
        let mode = match p {
            TrtPrecision::Fp32 => "FP32",
            TrtPrecision::Fp16 => "FP16",
        };
        let _ = writeln!(
            c,
            "optimization {{ execution_accelerators {{\n  gpu_execution_accelerator : [ {{\n    name : \"tensorrt\"\n    parameters {{ key: \"precision_mode\" value: \"{mode}\" }}\n    parameters {{ key: \"max_workspace_size_bytes\" value: \"4294967296\" }}\n  }} ]\n}} }}"
        );
    }
    c
}

/// The file under `initial_state/` holding a state's initial value.
pub fn initial_file(layer: usize, kind: &str, width: usize) -> String {
    format!("L{layer:0width$}.{kind}")
}

fn readme(export: &ExportDir, opts: &TritonOptions) -> String {
    let m = &export.manifest;
    let name = &opts.model_name;
    let l_len = m.fam.block_len;
    format!(
        "# Triton model repository for a famc export\n\n\
Model `{name}`: the FAM block graph (L = {l_len}, F = {f}, M = {mb}, {layers} layers, vocabulary {v}), \
driven by Triton's sequence batcher with implicit state (`{strategy:?}` strategy). Written by famc {ver}; \
see famc's docs/serving.md.\n\n\
## Start Triton\n\n\
```sh\n\
docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -v \"$PWD\":/models \\\n\
  nvcr.io/nvidia/tritonserver:25.10-py3 tritonserver --model-repository=/models\n\
```\n\n\
(without a GPU drop `--gpus all`{gpu_note}).\n\n\
## Requests\n\n\
Each request carries one block: `input_ids` INT64 of shape [1, {l_len}], with the sequence's id and \
the flags `sequence_start` (first block) and `sequence_end` (last block). Triton keeps the FAM and \
memory state between a sequence's requests; the response's `logits` [1, {l_len}, {v}] are those of \
the block's tokens. Pad a sequence's last, short block with any ids and ignore the padded rows' \
logits (rows see only the rows before them). A sequence's requests go one after another.\n\n\
```python\n\
import numpy as np, tritonclient.http as http\n\
client = http.InferenceServerClient(\"localhost:8000\")\n\
ids = http.InferInput(\"input_ids\", [1, {l_len}], \"INT64\")\n\
ids.set_data_from_numpy(np.zeros((1, {l_len}), dtype=np.int64))\n\
r = client.infer(\"{name}\", [ids], sequence_id=7, sequence_start=True, sequence_end=False)\n\
logits = r.as_numpy(\"logits\")  # [1, {l_len}, {v}]\n\
```\n\n\
famc's own server (`famc serve EXPORT_DIR`) speaks the same protocol and takes any number of \
tokens per request; famc's `export/triton_client.py` runs against both.\n",
        f = m.fam.fam_len,
        mb = m.fam.mem_blocks,
        layers = m.model.num_layers,
        v = m.model.vocab_size,
        strategy = opts.strategy,
        ver = env!("CARGO_PKG_VERSION"),
        gpu_note = if opts.gpu {
            " and write the repository without --triton-gpu"
        } else {
            ""
        },
    )
}

/// Writes the Triton repository of the export in `export_dir` into `repo` (replacing an earlier
/// one famc wrote there, never anything else, and only once the new one is complete). The FAM
/// prompt state is computed by running the export's init graph on tract.
pub fn write_repository(export_dir: &Path, repo: &Path, opts: &TritonOptions) -> Result<()> {
    check_options(opts)?;
    let export = ExportDir::open(export_dir)?;
    let m = &export.manifest;
    let block_path = export.block_path();
    let bytes = std::fs::read(&block_path).map_err(|e| Error::io(&block_path, e))?;
    let block = crate::onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Export {
        dir: export.dir.clone(),
        message: format!("{}: not an ONNX model: {e}", m.graphs.block),
    })?;
    let graph = form::sequence_graph(block, m)?;
    let initial =
        crate::session::initial_state(&export, BackendKind::Tract, &RunOptions::default())?;
    let width = form::layer_width(m.model.num_layers);
    crate::export::write_dir_with(repo, MARKER_FILE, "Triton repository", |tmp| {
        let model_dir = tmp.join(&opts.model_name);
        let version = model_dir.join("1");
        let init_dir = model_dir.join("initial_state");
        for d in [&version, &init_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let write = |path: &Path, data: &[u8]| crate::io::write_atomic(path, |w| w.write_all(data));
        write(&version.join("model.onnx"), &graph.encode_to_vec())?;
        let store = export.dir.join(WEIGHTS_FILE);
        if store.is_file() {
            let to = version.join(WEIGHTS_FILE);
            // the store is never written after its export: a hard link shares it at no cost
            if std::fs::hard_link(&store, &to).is_err() {
                std::fs::copy(&store, &to).map_err(|e| Error::io(&store, e))?;
            }
        }
        for (st, value) in m.state.iter().zip(&initial) {
            if st.init.is_none() {
                continue;
            }
            let mut raw = Vec::with_capacity(value.len() * 4);
            for x in value.iter() {
                raw.extend_from_slice(&x.to_le_bytes());
            }
            write(
                &init_dir.join(initial_file(st.layer, st.kind.name(), width)),
                &raw,
            )?;
        }
        write(
            &model_dir.join("config.pbtxt"),
            config_pbtxt(&export, opts).as_bytes(),
        )?;
        write(&tmp.join("README.md"), readme(&export, opts).as_bytes())?;
        let marker = serde_json::json!({
            "famc_version": env!("CARGO_PKG_VERSION"),
            "model_name": opts.model_name,
            "export": export.dir.display().to_string(),
            "checkpoint_sha256": m.checkpoint_sha256,
            "fam": m.fam,
        });
        let text = serde_json::to_string_pretty(&marker).expect("serialises");
        write(&tmp.join(MARKER_FILE), text.as_bytes())
    })
}
