//! Drives an export's graphs block by block, looping the state between calls.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{concatenate, Array1, Array2, ArrayD, Axis, IxDyn};

use crate::contract::{GraphContract, Role};
use crate::error::{Error, Result};
use crate::export::{self, ExportDir, Manifest};
use crate::model::{Checkpoint, FamParams, MAX_POSITION};
use crate::onnx::Target;
use crate::runtime::{open_graph, BackendKind, OutputTo, RunOptions, RunnerPool, Tensor, Value};

/// Each state tensor's value at block 0 (without the batch dimension), in the order of the
/// manifest's `state` list: the init graph's FAM rows, zeros for memory.
pub fn initial_state(
    export: &ExportDir,
    backend: BackendKind,
    opts: &RunOptions,
) -> Result<Vec<ArrayD<f32>>> {
    let manifest = &export.manifest;
    let mut init_outputs = Vec::new();
    if let Some(init_path) = export.init_path() {
        let mut init = open_graph(backend, &init_path, opts)?;
        init_outputs = init.run(Vec::new())?;
    }
    let mut initial = Vec::with_capacity(manifest.state.len());
    for st in &manifest.state {
        let value = match &st.init {
            Some(name) => {
                let v = manifest
                    .contract
                    .init
                    .as_ref()
                    .and_then(|c| c.output_index(Role::InitFam, Some(st.layer)))
                    .and_then(|i| init_outputs.get(i))
                    .ok_or_else(|| Error::Export {
                        dir: export.dir.clone(),
                        message: format!(
                            "the init graph has no output `{name}` for layer {}",
                            st.layer
                        ),
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
    Ok(initial)
}

/// One stream's state between blocks: the block index and each state tensor of the manifest.
///
/// The tensors stay where the backend left them (ONNX Runtime values, on the GPU for a GPU
/// session; tract tensors), so a block's state goes into the next block without a copy through
/// host arrays; [`StreamState::to_host`] copies them out when needed (snapshots). A new stream
/// starts from host arrays. The previous block's buffers are kept and written over by the next
/// full block (double buffering), so a stream allocates no state after its second block.
#[derive(Debug)]
pub struct StreamState {
    block_index: usize,
    /// In the order of the manifest's `state` list, each with its batch dimension (1).
    current: Vec<Value>,
    /// The buffers of the state before `current`, written over by the next full block.
    spare: Vec<Value>,
}

impl StreamState {
    /// A state from host arrays (without the batch dimension), e.g. read from a snapshot. Shapes
    /// are checked against the model when it is first stepped.
    pub fn from_host(block_index: usize, tensors: Vec<ArrayD<f32>>) -> Self {
        StreamState {
            block_index,
            current: tensors
                .into_iter()
                .map(|a| Value::host(a.insert_axis(Axis(0))))
                .collect(),
            spare: Vec::new(),
        }
    }

    /// Index τ of the next block.
    pub fn block_index(&self) -> usize {
        self.block_index
    }

    /// The state tensors, in the order of the manifest's `state` list, each with its batch
    /// dimension (1), where the backend holds them.
    pub fn values(&self) -> &[Value] {
        &self.current
    }

    /// Host copies of the state tensors, without the batch dimension.
    pub fn to_host(&self) -> Result<Vec<ArrayD<f32>>> {
        self.current
            .iter()
            .map(|v| Ok(v.to_host_f32()?.index_axis_move(Axis(0), 0)))
            .collect()
    }

    /// Where the state lies: `host`, `tract`, `ort cpu`, `ort cuda:0` (that of its first tensor).
    pub fn location(&self) -> String {
        self.current
            .first()
            .map_or_else(|| "host".into(), Value::location)
    }
}

/// The states of several streams held together, each tensor with a batch dimension of one row
/// per stream, so that a batch stepped again and again keeps its state in the backend (as a
/// [`StreamState`] does for one stream).
#[derive(Debug)]
pub struct BatchState {
    block_indices: Vec<usize>,
    current: Vec<Value>,
    spare: Vec<Value>,
}

impl BatchState {
    /// Joins streams into one batch (through host arrays).
    pub fn from_streams(streams: &[StreamState]) -> Result<Self> {
        if streams.is_empty() {
            return Err(Error::Input("a batch needs at least one stream".into()));
        }
        let host: Vec<Vec<ArrayD<f32>>> = streams
            .iter()
            .map(StreamState::to_host)
            .collect::<Result<_>>()?;
        let mut current = Vec::with_capacity(host[0].len());
        for i in 0..host[0].len() {
            let views: Vec<_> = host
                .iter()
                .map(|h| h[i].view().insert_axis(Axis(0)))
                .collect();
            current.push(Value::host(concatenate(Axis(0), &views).map_err(|e| {
                Error::Input(format!("state tensor #{i} differs between streams: {e}"))
            })?));
        }
        Ok(BatchState {
            block_indices: streams.iter().map(|s| s.block_index).collect(),
            current,
            spare: Vec::new(),
        })
    }

    /// The number of streams.
    pub fn len(&self) -> usize {
        self.block_indices.len()
    }

    /// Whether the batch holds no stream.
    pub fn is_empty(&self) -> bool {
        self.block_indices.is_empty()
    }

    /// Index τ of each stream's next block.
    pub fn block_indices(&self) -> &[usize] {
        &self.block_indices
    }

    /// Splits the batch into its streams (through host arrays).
    pub fn into_streams(self) -> Result<Vec<StreamState>> {
        let host: Vec<ArrayD<f32>> = self
            .current
            .iter()
            .map(Value::to_host_f32)
            .collect::<Result<_>>()?;
        Ok(self
            .block_indices
            .iter()
            .enumerate()
            .map(|(s, &tau)| {
                StreamState::from_host(
                    tau,
                    host.iter()
                        .map(|a| a.index_axis(Axis(0), s).to_owned())
                        .collect(),
                )
            })
            .collect())
    }

    /// Keeps only the streams `keep` selects, in order (through host arrays).
    pub fn retain(&mut self, keep: impl Fn(usize) -> bool) -> Result<()> {
        let rows: Vec<usize> = (0..self.len()).filter(|&s| keep(s)).collect();
        if rows.len() == self.len() {
            return Ok(());
        }
        let mut current = Vec::with_capacity(self.current.len());
        for v in &self.current {
            current.push(Value::host(v.to_host_f32()?.select(Axis(0), &rows)));
        }
        self.block_indices = rows.iter().map(|&s| self.block_indices[s]).collect();
        self.current = current;
        self.spare.clear();
        Ok(())
    }
}

/// What one run of the block graph gives: each stream's logits [T, V], and the next state when
/// the block was full and the state advances.
type BlockRun = (Vec<Array2<f32>>, Option<Vec<Value>>);

/// The decode and FAM-kv graphs of a model, opened once and shared by all its decoders, each
/// decoder running on a runner of its own (see [`RunnerPool`]).
pub struct DecodeGraphs {
    pub decode: RunnerPool,
    pub fam_kv: Option<RunnerPool>,
}

/// Where a block-graph input comes from.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Ids,
    BlockIndex,
    /// Each row's target token (score graph).
    Targets,
    /// The stream state's tensor at this index of famc.json's `state` list.
    State(usize),
}

/// How the block graph's inputs and outputs meet a stream, bound once by the roles of famc.json's
/// contract.
#[derive(Debug)]
struct BlockBinding {
    /// Per graph input, in graph order.
    inputs: Vec<Feed>,
    /// How many outputs the graph has.
    outputs: usize,
    /// The index of the output each row gives: the logits, or the target's log-probability.
    head: usize,
    /// Per state tensor (famc.json's order): the output index of its next value.
    next: Vec<usize>,
}

impl BlockBinding {
    /// The binding of contract `c`, the block graph (`head` [`Role::Logits`]) or the score
    /// graph ([`Role::TargetLogprob`]).
    fn new(m: &Manifest, c: &GraphContract, head: Role, dir: &Path) -> Result<Self> {
        let err = |message: String| Error::Export {
            dir: dir.to_path_buf(),
            message,
        };
        let inputs = c
            .inputs
            .iter()
            .map(|io| match io.role {
                Role::InputIds => Ok(Feed::Ids),
                Role::BlockIndex => Ok(Feed::BlockIndex),
                Role::Targets if head == Role::TargetLogprob => Ok(Feed::Targets),
                role => m.state_index(role, io.layer).map(Feed::State).ok_or_else(|| {
                    err(format!(
                        "block graph input `{}` has role {role}, which is no state tensor famc.json lists",
                        io.name
                    ))
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let head_at = c.output_index(head, None).ok_or_else(|| {
            err(format!(
                "famc.json's contract gives the graph no {head} output"
            ))
        })?;
        let next = m
            .state
            .iter()
            .map(|st| {
                st.kind
                    .next()
                    .and_then(|r| c.output_index(r, Some(st.layer)))
                    .ok_or_else(|| {
                        err(format!(
                            "famc.json's contract gives state `{}` no next value",
                            st.input
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BlockBinding {
            inputs,
            outputs: c.outputs.len(),
            head: head_at,
            next,
        })
    }
}

/// A graph of the block's shape (the block graph, or the score graph): its runners and how a
/// stream meets its inputs and outputs.
struct BlockGraph {
    runners: RunnerPool,
    binding: BlockBinding,
}

impl BlockGraph {
    /// Opens graph `file` of the export in `dir`, bound by its contract `c` and `head` output
    /// (see [`BlockBinding::new`]). tract plans single-stream full blocks separately: a quarter
    /// faster than the symbolic plan.
    fn open(
        m: &Manifest,
        c: &GraphContract,
        head: Role,
        dir: &Path,
        file: &str,
        backend: BackendKind,
        opts: &RunOptions,
    ) -> Result<Self> {
        let binding = BlockBinding::new(m, c, head, dir)?;
        let opts = opts
            .clone()
            .with_fixed_dim("batch", 1)
            .with_fixed_dim("T", m.fam.block_len);
        let runners = RunnerPool::open(backend, &dir.join(file), &opts)?;
        Ok(BlockGraph { runners, binding })
    }
}

/// A FAM model loaded on a backend: its block graph and initial state.
///
/// The model is immutable once opened and may be shared across threads (`&FamModel` is `Sync`);
/// each stream's state is a separate [`StreamState`] value, and streams stepping at once run on
/// runners of their own that share the weights ([`FamModel::block_runners`]).
pub struct FamModel {
    manifest: Manifest,
    backend: BackendKind,
    /// The block graph: streams run it at once, each on a runner of its own.
    block: BlockGraph,
    initial: Vec<ArrayD<f32>>,
    dir: std::path::PathBuf,
    opts: RunOptions,
    /// The decode graphs, opened by the first [`crate::generate::FamDecoder`].
    decode: Mutex<Option<std::sync::Arc<DecodeGraphs>>>,
    /// The score graph, opened by the first scored step.
    score: Mutex<Option<std::sync::Arc<BlockGraph>>>,
    /// The temporary export of a compiled checkpoint, removed with the model (or on a signal).
    _tempdir: Option<(tempfile::TempDir, crate::signal::TempGuard)>,
}

impl FamModel {
    /// Opens an export directory on `backend`, running the init graph once.
    pub fn open(dir: &Path, backend: BackendKind, opts: &RunOptions) -> Result<Self> {
        let export = ExportDir::open(dir)?;
        Self::from_export(export, backend, opts, None)
    }

    /// Compiles a checkpoint into a temporary export for [`best_target`] and opens it.
    pub fn compile(
        ck: &Checkpoint,
        fam: FamParams,
        backend: BackendKind,
        opts: &RunOptions,
    ) -> Result<Self> {
        Self::compile_for(ck, fam, best_target(backend, opts), backend, opts)
    }

    /// Compiles a checkpoint into a temporary export for `target` and opens it.
    pub fn compile_for(
        ck: &Checkpoint,
        fam: FamParams,
        target: Target,
        backend: BackendKind,
        opts: &RunOptions,
    ) -> Result<Self> {
        let (export, temp) = Self::export_to_temp(ck, fam, target)?;
        Self::from_export(export, backend, opts, Some(temp))
    }

    /// Exports `ck` into a temporary directory that is removed with the model (or on a signal).
    fn export_to_temp(
        ck: &Checkpoint,
        fam: FamParams,
        target: Target,
    ) -> Result<(ExportDir, (tempfile::TempDir, crate::signal::TempGuard))> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let guard = crate::signal::register(tmp.path());
        let dir = tmp.path().join("export");
        let opts = export::ExportOptions {
            target,
            ..Default::default()
        };
        export::export(ck, fam, &dir, &opts)?;
        Ok((ExportDir::open(&dir)?, (tmp, guard)))
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
            let (export, temp) = Self::export_to_temp(&ck, fam, best_target(backend, opts))?;
            // the runtime loads the weights from the export: the checkpoint's copy can go
            drop(ck);
            Self::from_export(export, backend, opts, Some(temp))
        }
    }

    fn from_export(
        export: ExportDir,
        backend: BackendKind,
        opts: &RunOptions,
        tempdir: Option<(tempfile::TempDir, crate::signal::TempGuard)>,
    ) -> Result<Self> {
        let manifest = export.manifest.clone();
        if manifest.target.ort_only() && backend != BackendKind::Ort {
            return Err(Error::Export {
                dir: export.dir.clone(),
                message: format!(
                    "target `{}` uses ONNX Runtime's contrib operators (SkipSimplifiedLayerNormalization), which {backend} does not run; export with --target opset23 or opset17 for {backend}",
                    manifest.target
                ),
            });
        }
        let block = BlockGraph::open(
            &manifest,
            &manifest.contract.block,
            Role::Logits,
            &export.dir,
            &manifest.graphs.block,
            backend,
            opts,
        )?;
        let initial = initial_state(&export, backend, opts)?;
        Ok(FamModel {
            manifest,
            backend,
            block,
            initial,
            dir: export.dir.clone(),
            opts: opts.clone(),
            decode: Mutex::new(None),
            score: Mutex::new(None),
            _tempdir: tempdir,
        })
    }

    /// The decode graphs, opened on the first call and then shared (for TensorRT an engine
    /// build per graph and model, not per stream).
    pub fn decode_graphs(&self) -> Result<std::sync::Arc<DecodeGraphs>> {
        let mut slot = self.decode.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        let m = &self.manifest;
        let decode_file = m.graphs.decode.as_ref().ok_or_else(|| Error::Export {
            dir: self.dir.clone(),
            message: "the export has no decode graph: re-export it with this famc".into(),
        })?;
        // a decoder is one stream: tract plans the graphs for batch 1 (1.06x its decode rate on
        // SmolLM2 against the symbolic plan)
        let opts = self.opts.clone().with_fixed_dim("batch", 1);
        let decode = RunnerPool::open(self.backend, &self.dir.join(decode_file), &opts)?;
        let fam_kv = match &m.graphs.fam_kv {
            Some(f) => Some(RunnerPool::open(self.backend, &self.dir.join(f), &opts)?),
            None => None,
        };
        let graphs = std::sync::Arc::new(DecodeGraphs { decode, fam_kv });
        *slot = Some(graphs.clone());
        Ok(graphs)
    }

    /// The block graph's runners: streams that step at once each take one.
    pub fn block_runners(&self) -> &RunnerPool {
        &self.block.runners
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

    /// Copy the state out to host arrays after every block (and the decoder's caches after
    /// every token) instead of keeping it in the backend: [`RunOptions::host_state`]. For
    /// measuring what keeping it there saves, on one model side by side.
    pub fn set_host_state(&mut self, on: bool) {
        self.opts.host_state = on;
    }

    /// The FAM parameters.
    pub fn fam_params(&self) -> FamParams {
        self.manifest.fam
    }

    /// A new stream: block 0, initial FAM, empty memory.
    pub fn new_state(&self) -> StreamState {
        StreamState::from_host(0, self.initial.clone())
    }

    /// A new batch of `streams` streams, each as [`FamModel::new_state`].
    pub fn new_batch(&self, streams: usize) -> Result<BatchState> {
        let states: Vec<StreamState> = (0..streams).map(|_| self.new_state()).collect();
        BatchState::from_streams(&states)
    }

    /// Runs one block for each stream of a batch. All blocks hold the same number T of tokens,
    /// 1 ≤ T ≤ L. Streams whose block is full advance; returns each stream's logits [T, V].
    ///
    /// One stream keeps its state in the backend; several are joined and split through host
    /// arrays on every call (use a [`BatchState`] and [`FamModel::step_batch`] to keep a batch's
    /// state in the backend).
    pub fn step(&self, states: &mut [StreamState], blocks: &[&[u32]]) -> Result<Vec<Array2<f32>>> {
        if states.len() != blocks.len() || states.is_empty() {
            return Err(Error::Input(format!(
                "a batch needs one block per stream: {} states, {} blocks",
                states.len(),
                blocks.len()
            )));
        }
        if let [state] = states {
            return self.advance(
                std::slice::from_mut(&mut state.block_index),
                &mut state.current,
                &mut state.spare,
                blocks,
                None,
            );
        }
        let mut batch = BatchState::from_streams(states)?;
        let logits = self.step_batch(&mut batch, blocks)?;
        if blocks[0].len() == self.manifest.fam.block_len {
            for (state, next) in states.iter_mut().zip(batch.into_streams()?) {
                *state = next;
            }
        }
        Ok(logits)
    }

    /// [`FamModel::step`] for a batch held together: its state stays in the backend from call to
    /// call. `blocks` holds one block per stream of the batch.
    pub fn step_batch(
        &self,
        batch: &mut BatchState,
        blocks: &[&[u32]],
    ) -> Result<Vec<Array2<f32>>> {
        if batch.len() != blocks.len() || batch.is_empty() {
            return Err(Error::Input(format!(
                "a batch needs one block per stream: {} streams, {} blocks",
                batch.len(),
                blocks.len()
            )));
        }
        self.advance(
            &mut batch.block_indices,
            &mut batch.current,
            &mut batch.spare,
            blocks,
            None,
        )
    }

    /// Runs one block over a state (one row per stream) and, when the block is full, makes its
    /// output the current state and the previous one the spare buffers.
    fn advance(
        &self,
        block_indices: &mut [usize],
        current: &mut Vec<Value>,
        spare: &mut Vec<Value>,
        blocks: &[&[u32]],
        targets: Option<&[&[u32]]>,
    ) -> Result<Vec<Array2<f32>>> {
        let (logits, next) =
            self.run_block(block_indices, current, Some(spare), blocks, targets)?;
        if let Some(next) = next {
            *spare = std::mem::replace(current, next);
            for tau in block_indices {
                *tau += 1;
            }
        }
        Ok(logits)
    }

    /// The logits [T, V] of one stream's next (possibly full) block, without advancing it.
    pub fn preview(&self, state: &StreamState, block: &[u32]) -> Result<Array2<f32>> {
        let (mut logits, _) =
            self.run_block(&[state.block_index], &state.current, None, &[block], None)?;
        Ok(logits.remove(0))
    }

    /// Whether [`FamModel::step_scored`] can run: the export has a score graph and the backend
    /// is ONNX Runtime (whose sessions share the block graph's weights; a second tract plan
    /// would hold them twice).
    pub fn has_score_graph(&self) -> bool {
        self.manifest.graphs.score.is_some() && self.backend == BackendKind::Ort
    }

    /// Whether streams are scored in the score graph ([`RunOptions::score_in_graph`]).
    pub fn scores_in_graph(&self) -> bool {
        let gpu = self.opts.ep.kind != crate::runtime::EpKind::Cpu;
        self.has_score_graph() && self.opts.score_in_graph.unwrap_or(gpu)
    }

    /// The score graph and its binding, opened on first use.
    fn score_graph(&self) -> Result<std::sync::Arc<BlockGraph>> {
        let mut slot = self.score.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        let (Some(file), Some(c), true) = (
            &self.manifest.graphs.score,
            &self.manifest.contract.score,
            self.has_score_graph(),
        ) else {
            return Err(Error::Input(format!(
                "{} has no score graph for {} (FamModel::has_score_graph): score from the logits",
                self.dir.display(),
                self.backend
            )));
        };
        let g = std::sync::Arc::new(BlockGraph::open(
            &self.manifest,
            c,
            Role::TargetLogprob,
            &self.dir,
            file,
            self.backend,
            &self.opts,
        )?);
        *slot = Some(g.clone());
        Ok(g)
    }

    /// [`FamModel::step`] for one stream, scored in the graph: the log-probability of
    /// `targets[i]` (the token after `block[i]`) for each row, instead of the logits. Needs
    /// [`FamModel::has_score_graph`].
    pub fn step_scored(
        &self,
        state: &mut StreamState,
        block: &[u32],
        targets: &[u32],
    ) -> Result<Array1<f32>> {
        let mut rows = self.advance(
            std::slice::from_mut(&mut state.block_index),
            &mut state.current,
            &mut state.spare,
            &[block],
            Some(&[targets]),
        )?;
        Ok(rows.remove(0).column(0).to_owned())
    }

    /// [`FamModel::preview`] scored in the graph, like [`FamModel::step_scored`].
    pub fn preview_scored(
        &self,
        state: &StreamState,
        block: &[u32],
        targets: &[u32],
    ) -> Result<Array1<f32>> {
        let (mut rows, _) = self.run_block(
            &[state.block_index],
            &state.current,
            None,
            &[block],
            Some(&[targets]),
        )?;
        Ok(rows.remove(0).column(0).to_owned())
    }

    /// Each stream's targets as the score graph's int64 [B, T] input, padded with id 0 to
    /// `t_run` rows like the block.
    fn targets_tensor(&self, targets: &[&[u32]], blocks: &[&[u32]], t_run: usize) -> Result<Value> {
        let vocab = self.manifest.model.vocab_size;
        if targets.len() != blocks.len() {
            return Err(Error::Input(format!(
                "{} target lists for {} streams",
                targets.len(),
                blocks.len()
            )));
        }
        let mut ids = Vec::with_capacity(blocks.len() * t_run);
        for (s, (row, block)) in targets.iter().zip(blocks).enumerate() {
            if row.len() != block.len() {
                return Err(Error::Input(format!(
                    "stream {s}: {} targets for a block of {} tokens",
                    row.len(),
                    block.len()
                )));
            }
            for (i, &id) in row.iter().enumerate() {
                if id as usize >= vocab {
                    return Err(Error::Input(format!(
                        "stream {s}: target token id {id} for row {i} is out of range (vocab_size {vocab})"
                    )));
                }
                ids.push(id as i64);
            }
            ids.resize(ids.len() + t_run - row.len(), 0);
        }
        Ok(Value::host(Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[blocks.len(), t_run]), ids).expect("sized"),
        )))
    }

    /// Runs the block graph over a batch of states (one row per stream). `spare`: the buffers to
    /// write the next state into, or `None` not to advance (the next state is not returned).
    fn run_block(
        &self,
        block_indices: &[usize],
        state: &[Value],
        spare: Option<&mut Vec<Value>>,
        blocks: &[&[u32]],
        targets: Option<&[&[u32]]>,
    ) -> Result<BlockRun> {
        let l_len = self.manifest.fam.block_len;
        let vocab = self.manifest.model.vocab_size;
        let t = blocks[0].len();
        if t == 0 || t > l_len || blocks.iter().any(|b| b.len() != t) {
            return Err(Error::Input(format!(
                "every block of a batch holds the same 1 to {l_len} tokens; got lengths {:?}",
                blocks.iter().map(|b| b.len()).collect::<Vec<_>>()
            )));
        }
        for (s, &tau) in block_indices.iter().enumerate() {
            check_position(s, tau, l_len)?;
        }
        let batch = blocks.len();
        let mut ids = Vec::with_capacity(batch * t);
        for (s, block) in blocks.iter().enumerate() {
            for (i, &id) in block.iter().enumerate() {
                if id as usize >= vocab {
                    return Err(Error::Input(format!(
                        "stream {s}: token id {id} at position {} (block {}, offset {i}) is out of range (vocab_size {vocab})",
                        block_indices[s] * l_len + i,
                        block_indices[s]
                    )));
                }
                ids.push(id as i64);
            }
        }
        if state.len() != self.manifest.state.len() {
            return Err(Error::Input(format!(
                "the stream state holds {} tensors, the model {}",
                state.len(),
                self.manifest.state.len()
            )));
        }
        for (st, v) in self.manifest.state.iter().zip(state) {
            if v.shape().len() != st.shape.len() + 1
                || v.shape()[0] != batch
                || v.shape()[1..] != st.shape[..]
            {
                return Err(Error::Input(format!(
                    "state `{}` has shape {:?}, the model needs [{batch}, {}]",
                    st.input,
                    v.shape(),
                    st.shape
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        // A lone stream's short block runs as a full one padded with id 0 on tract, whose plan
        // for full single-stream blocks then serves every block (a second, symbolic plan would
        // pack the weights again). Exact: a row's logits depend only on the rows before it, and
        // a short block's next state is never kept.
        let t_run = if batch == 1 && t < l_len && self.backend == BackendKind::Tract {
            ids.resize(l_len, 0);
            l_len
        } else {
            t
        };
        let ids = Value::host(Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[batch, t_run]), ids).expect("sized"),
        ));
        let targets = targets
            .map(|targets| self.targets_tensor(targets, blocks, t_run))
            .transpose()?;
        let score = targets.as_ref().map(|_| self.score_graph()).transpose()?;
        let graph = score.as_deref().unwrap_or(&self.block);
        let bind = &graph.binding;
        // a row gives V logits, or its target's log-probability
        let width = if score.is_some() { 1 } else { vocab };
        let tau = Value::host(Tensor::I64(
            ArrayD::from_shape_vec(
                IxDyn(&[batch]),
                block_indices.iter().map(|&b| b as i64).collect(),
            )
            .expect("sized"),
        ));
        let inputs: Vec<&Value> = bind
            .inputs
            .iter()
            .map(|feed| match (*feed, &targets) {
                (Feed::Ids, _) => Ok(&ids),
                (Feed::BlockIndex, _) => Ok(&tau),
                (Feed::Targets, Some(targets)) => Ok(targets),
                (Feed::Targets, None) => Err(self.backend_error("the block graph takes targets")),
                (Feed::State(i), _) => Ok(&state[i]),
            })
            .collect::<Result<_>>()?;
        let advance = t == l_len && spare.is_some();
        let mut spare = spare.map(std::mem::take).unwrap_or_default().into_iter();
        let mut places: Vec<Option<OutputTo>> = (0..bind.outputs).map(|_| None).collect();
        places[bind.head] = Some(OutputTo::Host);
        for &o in &bind.next {
            places[o] = Some(match (advance, self.opts.host_state, spare.next()) {
                (true, true, _) => OutputTo::Host,
                (true, false, Some(buffer)) => OutputTo::Reuse(buffer),
                _ => OutputTo::Backend,
            });
        }
        let places = places
            .into_iter()
            .map(|p| p.unwrap_or(OutputTo::Backend))
            .collect();
        let outputs = graph.runners.checkout()?.run_values(&inputs, places)?;
        if outputs.len() != bind.outputs {
            return Err(self.backend_error(&format!(
                "the block graph returned {} outputs, famc.json's contract lists {}",
                outputs.len(),
                bind.outputs
            )));
        }
        let mut outputs: Vec<Option<Value>> = outputs.into_iter().map(Some).collect();
        let logits = outputs[bind.head]
            .take()
            .expect("each output taken once")
            .into_host_f32()?;
        let want = if score.is_some() {
            vec![batch, t_run]
        } else {
            vec![batch, t_run, vocab]
        };
        if logits.shape() != want.as_slice() {
            return Err(self.backend_error(&format!(
                "the graph's {} output has shape {:?}, expected {want:?}",
                if score.is_some() {
                    "log-probability"
                } else {
                    "logits"
                },
                logits.shape()
            )));
        }
        let mut logits = logits
            .into_shape_with_order(IxDyn(&[batch, t_run, width]))
            .expect("sized");
        if t_run > t {
            logits = logits.slice_axis(Axis(1), (0..t).into()).to_owned();
        }
        if let Some(flat) = logits.iter().position(|v| !v.is_finite()) {
            let (s, i) = (flat / (t * width), flat / width % t);
            return Err(self.backend_error(&format!(
                "non-finite logit or log-probability ({}) for stream {s} at position {} (block {}): the computation overflowed float32",
                logits.iter().nth(flat).copied().unwrap_or(f32::NAN),
                block_indices[s] * l_len + i,
                block_indices[s]
            )));
        }
        let next = if advance {
            let next: Vec<Value> = bind
                .next
                .iter()
                .map(|&o| outputs[o].take().expect("each output taken once"))
                .collect();
            if next.len() != state.len()
                || next.iter().zip(state).any(|(n, v)| n.shape() != v.shape())
            {
                return Err(self.backend_error(
                    "the block graph's state outputs do not match its state inputs (famc.json)",
                ));
            }
            Some(next)
        } else {
            None
        };
        let logits = (0..batch)
            .map(|s| {
                logits
                    .index_axis(Axis(0), s)
                    .to_owned()
                    .into_dimensionality()
                    .expect("rank 2")
            })
            .collect();
        Ok((logits, next))
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

/// The target an in-memory compile emits for `backend` with `opts`: the fastest where the targets
/// were measured side by side (docs/BENCHMARKS.md, "Targets": `ort` on ONNX Runtime's CPU
/// provider, opset 17 on tract), and the portable opset 17 on the GPU providers, where no
/// comparison has run (TensorRT parses opset 23 only from 10.15, and not the contrib operators).
pub fn best_target(backend: BackendKind, opts: &RunOptions) -> Target {
    match (backend, opts.ep.kind) {
        (BackendKind::Ort, crate::runtime::EpKind::Cpu) => Target::Ort,
        _ => Target::Opset17,
    }
}

/// Refuses block `tau` of stream `stream` when its last position reaches [`MAX_POSITION`], past
/// which the graphs' rotary angles are no longer exact.
pub(crate) fn check_position(stream: usize, tau: usize, block_len: usize) -> Result<()> {
    let end = (tau as u64)
        .checked_add(1)
        .and_then(|n| n.checked_mul(block_len as u64));
    match end {
        Some(end) if end <= MAX_POSITION => Ok(()),
        _ => Err(Error::Input(format!(
            "stream {stream}: block {tau} (block length {block_len}) reaches past position 2^36 = {MAX_POSITION}, the last one famc's rotary embedding computes exactly"
        ))),
    }
}
