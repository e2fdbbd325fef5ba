//! Drives an export's graphs block by block, looping the state between calls.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{concatenate, Array2, ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::export::{self, ExportDir, Manifest};
use crate::model::{Checkpoint, FamParams};
use crate::runtime::{open_graph, BackendKind, GraphRunner, RunOptions, Tensor};

/// One stream's state between blocks: the block index and each state tensor of the manifest,
/// without the batch dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// Index τ of the next block.
    pub block_index: usize,
    /// In the order of the manifest's `state` list.
    pub tensors: Vec<ArrayD<f32>>,
}

/// A FAM model loaded on a backend: its block graph and initial state.
///
/// The model is immutable once opened and may be shared across threads (`&FamModel` is `Sync`);
/// each stream's state is a separate [`StreamState`] value.
pub struct FamModel {
    manifest: Manifest,
    backend: BackendKind,
    block: Mutex<Box<dyn GraphRunner>>,
    initial: Vec<ArrayD<f32>>,
    dir: std::path::PathBuf,
    opts: RunOptions,
    _tempdir: Option<tempfile::TempDir>,
}

impl FamModel {
    /// Opens an export directory on `backend`, running the init graph once.
    pub fn open(dir: &Path, backend: BackendKind, opts: &RunOptions) -> Result<Self> {
        let export = ExportDir::open(dir)?;
        Self::from_export(export, backend, opts, None)
    }

    /// Compiles a checkpoint into a temporary export and opens it.
    pub fn compile(
        ck: &Checkpoint,
        fam: FamParams,
        backend: BackendKind,
        opts: &RunOptions,
    ) -> Result<Self> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        export::export(ck, fam, tmp.path(), &export::ExportOptions::default())?;
        let export = ExportDir::open(tmp.path())?;
        Self::from_export(export, backend, opts, Some(tmp))
    }

    /// Opens `path` as an export directory when it has a `famc.json`, else compiles it as a
    /// checkpoint with the FAM parameters resolved from `flags`.
    pub fn open_any(
        path: &Path,
        flags: crate::model::FamDefaults,
        backend: BackendKind,
        opts: &RunOptions,
    ) -> Result<Self> {
        if path.join(export::MANIFEST_FILE).exists() {
            let m = FamModel::open(path, backend, opts)?;
            let p = m.manifest.fam;
            for (flag, given, have) in [
                ("--block-len", flags.block_len, p.block_len),
                ("--fam-len", flags.fam_len, p.fam_len),
                ("--mem-blocks", flags.mem_blocks, p.mem_blocks),
            ] {
                if let Some(g) = given {
                    if g != have {
                        return Err(Error::Export {
                            dir: path.to_path_buf(),
                            message: format!("{flag} {g} disagrees with the export's {have}; re-export to change it"),
                        });
                    }
                }
            }
            Ok(m)
        } else {
            let ck = Checkpoint::load(path)?;
            let fam = ck.fam_params(flags)?;
            FamModel::compile(&ck, fam, backend, opts)
        }
    }

    fn from_export(
        export: ExportDir,
        backend: BackendKind,
        opts: &RunOptions,
        tempdir: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        let manifest = export.manifest.clone();
        // tract plans single-stream full blocks separately: a quarter faster than the symbolic plan
        let block_opts = opts
            .clone()
            .with_fixed_dim("batch", 1)
            .with_fixed_dim("T", manifest.fam.block_len);
        let block = open_graph(backend, &export.block_path(), &block_opts)?;
        let mut init_outputs = Vec::new();
        if let Some(init_path) = export.init_path() {
            let mut init = open_graph(backend, &init_path, opts)?;
            let outs = init.run(Vec::new())?;
            init_outputs = init.output_names().iter().cloned().zip(outs).collect();
        }
        let mut initial = Vec::with_capacity(manifest.state.len());
        for st in &manifest.state {
            let value = match &st.init {
                Some(name) => {
                    let (_, v) = init_outputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .ok_or_else(|| Error::Export {
                            dir: export.dir.clone(),
                            message: format!("the init graph has no output `{name}`"),
                        })?;
                    if v.shape() != st.shape.as_slice() {
                        return Err(Error::Export {
                            dir: export.dir.clone(),
                            message: format!(
                                "init output `{name}` has shape {:?}, famc.json says {:?}",
                                v.shape(),
                                st.shape
                            ),
                        });
                    }
                    v.clone()
                }
                None => ArrayD::zeros(IxDyn(&st.shape)),
            };
            initial.push(value);
        }
        Ok(FamModel {
            manifest,
            backend,
            block: Mutex::new(block),
            initial,
            dir: export.dir.clone(),
            opts: opts.clone(),
            _tempdir: tempdir,
        })
    }

    /// The export's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The backend running the graphs.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The export directory the graphs were loaded from (a temporary one for a compiled
    /// checkpoint, kept alive as long as the model).
    pub fn export_dir(&self) -> &Path {
        &self.dir
    }

    /// The options the graphs were opened with.
    pub fn run_options(&self) -> &RunOptions {
        &self.opts
    }

    /// The FAM parameters.
    pub fn fam_params(&self) -> FamParams {
        self.manifest.fam
    }

    /// A new stream: block 0, initial FAM, empty memory.
    pub fn new_state(&self) -> StreamState {
        StreamState {
            block_index: 0,
            tensors: self.initial.clone(),
        }
    }

    /// Runs one block for each stream of a batch. All blocks hold the same number T of tokens,
    /// 1 ≤ T ≤ L. Streams whose block is full advance; returns each stream's logits [T, V].
    pub fn step(&self, states: &mut [StreamState], blocks: &[&[u32]]) -> Result<Vec<Array2<f32>>> {
        let l_len = self.manifest.fam.block_len;
        let vocab = self.manifest.model.vocab_size;
        if states.len() != blocks.len() || states.is_empty() {
            return Err(Error::Input(format!(
                "a batch needs one block per stream: {} states, {} blocks",
                states.len(),
                blocks.len()
            )));
        }
        let t = blocks[0].len();
        if t == 0 || t > l_len || blocks.iter().any(|b| b.len() != t) {
            return Err(Error::Input(format!(
                "every block of a batch holds the same 1 to {l_len} tokens; got lengths {:?}",
                blocks.iter().map(|b| b.len()).collect::<Vec<_>>()
            )));
        }
        let batch = states.len();
        let mut ids = Vec::with_capacity(batch * t);
        for (s, block) in blocks.iter().enumerate() {
            for (i, &id) in block.iter().enumerate() {
                if id as usize >= vocab {
                    return Err(Error::Input(format!(
                        "stream {s}: token id {id} at block position {i} is out of range (vocab_size {vocab})"
                    )));
                }
                ids.push(id as i64);
            }
        }
        let mut inputs = vec![
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, t]), ids).expect("sized")),
            Tensor::I64(
                ArrayD::from_shape_vec(
                    IxDyn(&[batch]),
                    states.iter().map(|s| s.block_index as i64).collect(),
                )
                .expect("sized"),
            ),
        ];
        for i in 0..self.manifest.state.len() {
            let views: Vec<_> = states
                .iter()
                .map(|s| s.tensors[i].view().insert_axis(Axis(0)))
                .collect();
            inputs.push(Tensor::F32(concatenate(Axis(0), &views).map_err(|e| {
                Error::Input(format!("state `{}`: {e}", self.manifest.state[i].input))
            })?));
        }
        let outputs = {
            // a poisoned lock only means another stream's call panicked; the runner itself is intact
            let mut runner = self.block.lock().unwrap_or_else(|e| e.into_inner());
            runner.run(inputs)?
        };
        let mut outputs = outputs.into_iter();
        let logits = outputs
            .next()
            .ok_or_else(|| self.backend_error("no logits output"))?;
        if logits.shape() != [batch, t, vocab] {
            return Err(self.backend_error(&format!(
                "logits have shape {:?}, expected [{batch}, {t}, {vocab}]",
                logits.shape()
            )));
        }
        if t == l_len {
            let next: Vec<ArrayD<f32>> = outputs.collect();
            if next.len() != self.manifest.state.len() {
                return Err(self.backend_error(
                    "the block graph returned fewer state outputs than famc.json lists",
                ));
            }
            for (s, state) in states.iter_mut().enumerate() {
                state.tensors = next
                    .iter()
                    .map(|a| a.index_axis(Axis(0), s).to_owned())
                    .collect();
                state.block_index += 1;
            }
        }
        Ok((0..batch)
            .map(|s| {
                logits
                    .index_axis(Axis(0), s)
                    .to_owned()
                    .into_dimensionality()
                    .expect("rank 2")
            })
            .collect())
    }

    fn backend_error(&self, message: &str) -> Error {
        Error::Backend {
            backend: self.backend.name(),
            message: message.to_string(),
        }
    }

    /// Runs a whole sequence as one stream from a new state; logits [len, V].
    pub fn run(&self, ids: &[u32]) -> Result<Array2<f32>> {
        let mut state = [self.new_state()];
        let mut rows = Vec::new();
        for block in ids.chunks(self.manifest.fam.block_len) {
            rows.extend(self.step(&mut state, &[block])?);
        }
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        concatenate(Axis(0), &views).map_err(|_| Error::Input("no token ids".into()))
    }
}
