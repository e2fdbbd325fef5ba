//! The tract backend: pure Rust, CPU.
//!
//! The graph is loaded with `tract_onnx::onnx().model_for_path` (so ONNX external data beside the
//! file is found), typed and decluttered once, then optimised into a plan with its symbolic
//! dimensions (`batch`, `T`) left symbolic: each run binds the symbols from the input shapes, so
//! one runner accepts any batch and T.
//!
//! [`RunOptions::fixed_dims`] asks for a second plan, optimised with some symbols concretised. A
//! run whose input shapes give those symbols exactly those values goes to the specialised plan;
//! any other run (another batch size, a tail block the caller did not pad) goes to the symbolic
//! plan, which is then built on first use (each plan packs its own copy of the weights, so a
//! runner used only on the fixed shapes holds them once). For the FAM
//! block graph, full blocks are the common case: `batch = 1, T = L` (one stream) lets tract fix
//! every shape and pick its kernels ahead (`tests/tract_bench.rs` measures both plans).
//!
//! [`RunOptions::intra_threads`] above 1 runs the plans on a rayon pool of that many threads
//! (tract-linalg's `multithread-mm`: matrix products, element-wise, reductions, softmax and
//! norms split over rows or panels; results are bit-identical to the single-threaded path).
//! Unset: every core the process may use (`available_parallelism`), as ONNX Runtime does; 1:
//! single-threaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ndarray::ArrayD;
use tract_onnx::prelude::multithread::Executor;
use tract_onnx::prelude::{tvec, OutletId, TractResult};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoTValue, RunOptions as TractRunOptions, Symbol,
    TDim, TValue, TVec, TypedModel, TypedSimplePlan, TypedSimpleState,
};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::optim::{Optimizer, CONST_FOLD_MEM_BUDGET};

use super::{
    backend_error, check_inputs, check_outputs, BackendKind, Dim, ElemType, Forker, GraphRunner,
    IoSpec, OutputTo, RunOptions, Tensor, Value,
};
use crate::{Error, Result};

const KIND: BackendKind = BackendKind::Tract;

/// Which of a [`TractRunner`]'s plans ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// The plan with every symbolic dimension left symbolic.
    Symbolic,
    /// The plan built for [`RunOptions::fixed_dims`].
    Fixed,
}

/// The plan for the fixed dimensions, and where the inputs carry each of them.
struct FixedPlan {
    plan: Arc<TypedSimplePlan>,
    state: Option<TypedSimpleState>,
    /// (symbol, value, input index, axis): the run matches when each input axis has the value.
    dims: Vec<(String, usize, usize, usize)>,
}

/// A graph loaded by tract.
pub struct TractRunner {
    path: PathBuf,
    /// The symbolic plan; with a fixed plan, built (from the file again) on the first run that
    /// needs it, so that a model run only on fixed shapes holds its weights once, not twice.
    /// Shared with this runner's forks, like the fixed plan.
    plan: Arc<Mutex<Option<Arc<TypedSimplePlan>>>>,
    /// Reused from run to run; dropped after a failed run (it may hold half-bound symbols).
    state: Option<TypedSimpleState>,
    fixed: Option<FixedPlan>,
    threads: usize,
    last_plan: Option<PlanKind>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    input_specs: Vec<IoSpec>,
    /// Every node's time of the runs since [`TractRunner::set_profiling`] turned profiling on.
    profile: Option<Vec<NodeTime>>,
}

/// One node's evaluation in a profiled run: the node's name in tract's optimised plan (the ONNX
/// node's name, or one derived from it), tract's operator name, and seconds.
#[derive(Debug, Clone)]
pub struct NodeTime {
    pub node: String,
    pub op: String,
    pub seconds: f64,
}

impl std::fmt::Debug for TractRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractRunner")
            .field("path", &self.path)
            .field("inputs", &self.input_specs)
            .field("outputs", &self.output_names)
            .field("fixed_dims", &self.fixed_dims())
            .field("threads", &self.threads)
            .finish()
    }
}

/// One rayon pool per thread count, shared by every runner of the process (a model opens an
/// init and a block graph; they need not each spawn threads). A pool that cannot start (the
/// system refuses threads) is an error.
fn executor(threads: usize) -> Result<Option<Executor>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Executor>>> = OnceLock::new();
    if threads <= 1 {
        return Ok(None);
    }
    super::check_threads("tract threads", threads)?;
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(e) = pools.get(&threads) {
        return Ok(Some(e.clone()));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("famc-tract-{i}"))
        .build()
        .map_err(|e| Error::Input(format!("cannot start {threads} tract threads: {e}")))?;
    let e = Executor::MultiThread(Arc::new(pool));
    pools.insert(threads, e.clone());
    Ok(Some(e))
}

impl TractRunner {
    /// Loads and optimises the graph at `path`; with `opts.fixed_dims` naming symbols of the
    /// graph's inputs, also a plan specialised to those sizes (see the module documentation).
    /// `opts.intra_threads` sets the thread count; the other options are ONNX Runtime's.
    pub fn open(path: &Path, opts: &RunOptions) -> Result<Self> {
        let err = |what: &str, e: tract_onnx::prelude::TractError| {
            backend_error(KIND, path, format!("{what}: {e:#}"))
        };
        if let Some((name, _)) = opts.fixed_dims.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Input(format!(
                "fixed dimension `{name}` = 0: a fixed size must be at least 1"
            )));
        }
        let model = load_inference(path)?;

        let input_outlets = model
            .input_outlets()
            .map_err(|e| err("bad graph inputs", e))?;
        let input_names: Vec<String> = input_outlets
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_outlets = model
            .output_outlets()
            .map_err(|e| err("bad graph outputs", e))?;
        let output_names: Vec<String> = output_outlets
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();

        let mut decluttered = model
            .into_typed()
            .and_then(declutter)
            .map_err(|e| err("cannot type the graph", e))?;
        if decluttered.inputs.len() != input_names.len()
            || decluttered.outputs.len() != output_names.len()
        {
            return Err(backend_error(
                KIND,
                path,
                format!(
                    "the typed graph has {} inputs and {} outputs, the ONNX graph {} and {}",
                    decluttered.inputs.len(),
                    decluttered.outputs.len(),
                    input_names.len(),
                    output_names.len()
                ),
            ));
        }
        let mut input_specs = Vec::with_capacity(input_names.len());
        for (ix, name) in input_names.iter().enumerate() {
            let fact = decluttered
                .input_fact(ix)
                .map_err(|e| err("bad graph inputs", e))?;
            input_specs.push(IoSpec {
                name: name.clone(),
                elem_type: elem_type(fact.datum_type),
                shape: Some(fact.shape.iter().map(dim).collect()),
            });
        }

        let threads = opts.intra_threads.unwrap_or_else(default_threads).max(1);
        let plan_opts = plan_options(threads)?;

        // Where the inputs carry each fixed symbol; symbols no input names are ignored (the
        // same options serve a model's init graph, which has no `T`).
        let mut fixed_dims: Vec<(String, usize, usize, usize)> = Vec::new();
        let mut subs: HashMap<Symbol, TDim> = HashMap::new();
        for (name, value) in &opts.fixed_dims {
            let at = input_specs.iter().enumerate().find_map(|(ix, spec)| {
                let axis = spec
                    .shape
                    .as_ref()?
                    .iter()
                    .position(|d| matches!(d, Dim::Named(s) if s == name))?;
                Some((ix, axis))
            });
            let (Some((ix, axis)), Some(sym)) = (at, decluttered.symbols.get(name)) else {
                continue;
            };
            if fixed_dims.iter().any(|(n, ..)| n == name) {
                continue;
            }
            fixed_dims.push((name.clone(), *value, ix, axis));
            subs.insert(sym, TDim::Val(*value as i64));
        }
        let fixed = if fixed_dims.is_empty() {
            None
        } else {
            let what = || {
                let dims: Vec<String> = fixed_dims
                    .iter()
                    .map(|(n, v, ..)| format!("{n} = {v}"))
                    .collect();
                format!("cannot plan the graph for {}", dims.join(", "))
            };
            let specialised = decluttered
                .set_symbols(&subs)
                .map_err(|e| err(&what(), e))?;
            // the symbolic plan is built from the file when first needed: letting the
            // decluttered model go now lets its weights go as the fixed plan packs them
            drop(std::mem::take(&mut decluttered));
            let plan = untie_shared_weights(specialised)
                .and_then(optimise)
                .and_then(|m| m.into_runnable_with_options(&plan_opts))
                .map_err(|e| err(&what(), e))?;
            Some(FixedPlan {
                plan,
                state: None,
                dims: fixed_dims,
            })
        };
        let plan = match fixed {
            Some(_) => None,
            None => Some(symbolic_plan(path, decluttered, threads)?),
        };
        Ok(TractRunner {
            path: path.to_path_buf(),
            plan: Arc::new(Mutex::new(plan)),
            state: None,
            fixed,
            threads,
            last_plan: None,
            input_names,
            output_names,
            input_specs,
            profile: None,
        })
    }

    /// The symbolic plan, built on first use and then shared by this runner and its forks.
    fn symbolic_plan(&self) -> Result<Arc<TypedSimplePlan>> {
        let mut slot = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(plan) = slot.as_ref() {
            return Ok(plan.clone());
        }
        let model = load_decluttered(&self.path)?;
        let plan = symbolic_plan(&self.path, model, self.threads)?;
        *slot = Some(plan.clone());
        Ok(plan)
    }

    /// Another runner over the same plans, with run states of its own.
    fn fork(&self) -> TractRunner {
        TractRunner {
            path: self.path.clone(),
            plan: self.plan.clone(),
            state: None,
            fixed: self.fixed.as_ref().map(|f| FixedPlan {
                plan: f.plan.clone(),
                state: None,
                dims: f.dims.clone(),
            }),
            threads: self.threads,
            last_plan: None,
            input_names: self.input_names.clone(),
            output_names: self.output_names.clone(),
            input_specs: self.input_specs.clone(),
            profile: None,
        }
    }

    /// Times every node of the runs from now on (`true`), or stops (`false`, dropping the times).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    /// The node times recorded since profiling was turned on or last taken.
    pub fn take_profile(&mut self) -> Vec<NodeTime> {
        self.profile
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The symbols that have a specialised plan, with their sizes (empty when none does).
    pub fn fixed_dims(&self) -> Vec<(String, usize)> {
        self.fixed
            .as_ref()
            .map(|f| f.dims.iter().map(|(n, v, ..)| (n.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// The threads tract runs on (1: single-threaded).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Which plan the last successful run used (`None` before any).
    pub fn last_plan(&self) -> Option<PlanKind> {
        self.last_plan
    }

    fn run_inner(
        &mut self,
        kind: PlanKind,
        inputs: TVec<TValue>,
        places: Vec<OutputTo>,
    ) -> Result<Vec<Value>> {
        let symbolic = match (kind, &self.fixed) {
            (PlanKind::Fixed, Some(_)) => None,
            _ => Some(self.symbolic_plan()?),
        };
        let (plan, state) = match (symbolic, &mut self.fixed) {
            (Some(plan), _) => (plan, &mut self.state),
            (None, Some(f)) => (f.plan.clone(), &mut f.state),
            (None, None) => unreachable!("a fixed kind needs a fixed plan"),
        };
        let state = match state {
            Some(s) => s,
            None => state.insert(plan.spawn().map_err(|e| {
                backend_error(KIND, &self.path, format!("cannot start a run: {e:#}"))
            })?),
        };
        let outputs = match self.profile.as_mut() {
            None => state.run(inputs),
            Some(log) => state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let start = std::time::Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                log.push(NodeTime {
                    node: node.name.clone(),
                    op: node.op().name().into_owned(),
                    seconds: start.elapsed().as_secs_f64(),
                });
                out
            }),
        }
        .map_err(|e| backend_error(KIND, &self.path, format!("run failed: {e:#}")))?;
        outputs
            .into_iter()
            .zip(&self.output_names)
            .zip(places)
            .map(|((t, name), place)| {
                let dt = t.datum_type();
                if !matches!(dt, DatumType::F32 | DatumType::F16 | DatumType::F64) {
                    return Err(backend_error(
                        KIND,
                        &self.path,
                        format!("output `{name}` is {dt:?}, not a float tensor"),
                    ));
                }
                let shape = t.shape().to_vec();
                if !matches!(place, OutputTo::Host) && dt == DatumType::F32 {
                    return Ok(Value::tract(TractValue(t), shape, ElemType::F32));
                }
                let array = TractValue(t).to_array_f32().map_err(|e| {
                    backend_error(KIND, &self.path, format!("output `{name}`: {e}"))
                })?;
                Ok(match place {
                    OutputTo::Host => Value::host(array),
                    _ => Value::tract(TractValue(array.into_tvalue()), shape, ElemType::F32),
                })
            })
            .collect()
    }
}

impl GraphRunner for TractRunner {
    fn input_names(&self) -> &[String] {
        &self.input_names
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn input_specs(&self) -> &[IoSpec] {
        &self.input_specs
    }

    fn backend(&self) -> BackendKind {
        KIND
    }

    fn hold(&self, t: Tensor) -> Result<Value> {
        let (shape, elem) = (t.shape().to_vec(), t.elem_type());
        let v = match t {
            Tensor::F32(a) => a.into_tvalue(),
            Tensor::I64(a) => a.into_tvalue(),
        };
        Ok(Value::tract(TractValue(v), shape, elem))
    }

    fn forker(&self) -> Option<Forker> {
        let template = Mutex::new(self.fork());
        Some(Arc::new(move || {
            let fork = template.lock().unwrap_or_else(|e| e.into_inner()).fork();
            Ok(Box::new(fork) as Box<dyn GraphRunner>)
        }))
    }

    fn run_values(&mut self, inputs: &[&Value], outputs: Vec<OutputTo>) -> Result<Vec<Value>> {
        check_inputs(KIND, &self.path, &self.input_specs, inputs)?;
        check_outputs(KIND, &self.path, &self.output_names, &outputs)?;
        let kind = match &self.fixed {
            Some(f)
                if f.dims
                    .iter()
                    .all(|&(_, v, ix, axis)| inputs[ix].shape()[axis] == v) =>
            {
                PlanKind::Fixed
            }
            _ => PlanKind::Symbolic,
        };
        // tract's own values go back in as they are (shared, no copy); host arrays are copied in
        let values: TVec<TValue> = inputs
            .iter()
            .map(|v| -> Result<TValue> {
                if let Some(t) = v.as_tract() {
                    return Ok(t.0.clone());
                }
                Ok(match &*v.host_tensor()? {
                    Tensor::F32(a) => a.clone().into_tvalue(),
                    Tensor::I64(a) => a.clone().into_tvalue(),
                })
            })
            .collect::<Result<_>>()?;
        let result = self.run_inner(kind, values, outputs);
        match (&result, kind) {
            (Ok(_), _) => self.last_plan = Some(kind),
            (Err(_), PlanKind::Fixed) => {
                if let Some(f) = &mut self.fixed {
                    f.state = None;
                }
            }
            (Err(_), PlanKind::Symbolic) => self.state = None,
        }
        result
    }
}

/// tract's threads when none are asked for: every core this process may use, as ONNX Runtime
/// does.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How a plan runs on `threads` threads.
fn plan_options(threads: usize) -> Result<TractRunOptions> {
    Ok(TractRunOptions {
        executor: executor(threads)?,
        ..Default::default()
    })
}

/// The ONNX graph at `path` as tract reads it.
fn load_inference(path: &Path) -> Result<tract_onnx::prelude::InferenceModel> {
    match widened(path)? {
        // tract has no bfloat16 and no 8-bit MatMulNBits: such graphs are loaded with those
        // weights widened to f32
        Some(bytes) => tract_onnx::onnx().model_for_read(&mut bytes.as_slice()),
        None => tract_onnx::onnx().model_for_path(path),
    }
    .map_err(|e| backend_error(KIND, path, format!("cannot load the ONNX graph: {e:#}")))
}

/// The graph at `path`, typed and decluttered.
fn load_decluttered(path: &Path) -> Result<TypedModel> {
    load_inference(path)?
        .into_typed()
        .and_then(declutter)
        .map_err(|e| backend_error(KIND, path, format!("cannot type the graph: {e:#}")))
}

/// tract's declutter passes, less `ConcatThenEinsum`, which splits a product whose summed axis
/// is a concatenation into one product per part. Attention's values are memory, FAM and the
/// block's own rows concatenated, so tract sliced the block's probabilities into three copies
/// and packed each part again (a block of SmolLM2: 308 ms of slices and 177 ms of packing of
/// 2.8 s).
fn declutter(mut model: TypedModel) -> TractResult<TypedModel> {
    famc_declutter().optimize(&mut model)?;
    Ok(model)
}

/// The pass [`declutter`] leaves out, as tract's `Debug` names it (the pass is a private type);
/// a test fails if tract renames it, which famc would otherwise miss silently (only speed is at
/// stake, not exactness).
const SPLITTING_PASS: &str = "ConcatThenEinsum";

fn famc_declutter() -> Optimizer {
    let mut passes = Optimizer::declutter();
    passes
        .passes
        .retain(|p| !format!("{p:?}").starts_with(SPLITTING_PASS));
    passes
}

/// [`declutter`]ed again (`set_symbols` and famc's own rewrites leave work for it), then
/// tract's codegen: what `into_optimized` does, with famc's declutter.
fn optimise(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = declutter(model)?;
    model.optimize()?;
    Ok(model)
}

/// A product whose other operand has at most this many rows (of the constant's shorter side)
/// packs its shared constant once, into the plan.
const UNTIE_ROWS: i64 = 64;

/// `model` with a large constant that feeds several nodes given a `Const` node of its own for
/// each matrix product with few rows on the other side, over the same tensor (nothing is
/// copied), just before it is optimised (tract's own rewrites, `set_symbols` among them, merge
/// identical constants again). tract folds a product's packing of a constant into the plan only
/// when the constant has a single consumer: SmolLM2's tied embedding feeds the Gather and the
/// head, and its 113 MB were packed again on every run, 49 of a decode token's 116 ms. A plan
/// whose head sees many rows (a full block) keeps packing per run, as the pack held in the plan
/// would cost more memory than the time it saves there (about 2 % of a block).
fn untie_shared_weights(mut model: TypedModel) -> TractResult<TypedModel> {
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(konst) = node.op_as::<Const>() else {
            continue;
        };
        let bytes = konst.val().len() * konst.val().datum_type().size_of();
        let successors = node.outputs[0].successors.clone();
        // smaller shared constants tract folds anyway
        if successors.len() < 2 || bytes as u64 <= CONST_FOLD_MEM_BUDGET {
            continue;
        }
        let side = konst
            .val()
            .shape()
            .iter()
            .copied()
            .min()
            .unwrap_or(1)
            .max(1) as i64;
        let (konst, fact, name) = (
            konst.clone(),
            node.outputs[0].fact.clone(),
            node.name.clone(),
        );
        for inlet in successors {
            let consumer = &model.nodes[inlet.node];
            if !consumer.op_is::<EinSum>() || consumer.inputs.len() != 2 {
                continue;
            }
            let other = consumer.inputs[1 - inlet.slot.min(1)];
            let rows = model.outlet_fact(other)?.shape.volume().as_i64();
            if rows.is_none_or(|v| v > UNTIE_ROWS * side) {
                continue;
            }
            let twin = model.add_node(
                format!("{name}.for.{}", consumer.name),
                konst.clone(),
                tvec!(fact.clone()),
            )?;
            model.add_edge(OutletId::new(twin, 0), inlet)?;
        }
    }
    Ok(model)
}

/// `model` optimised with its symbols left symbolic, planned to run on `threads` threads.
fn symbolic_plan(path: &Path, model: TypedModel, threads: usize) -> Result<Arc<TypedSimplePlan>> {
    let plan_opts = plan_options(threads)?;
    untie_shared_weights(model)
        .and_then(optimise)
        .and_then(|m| m.into_runnable_with_options(&plan_opts))
        .map_err(|e| {
            backend_error(
                KIND,
                path,
                format!("cannot optimise and plan the graph: {e:#}"),
            )
        })
}

fn elem_type(dt: DatumType) -> ElemType {
    match dt {
        DatumType::F32 => ElemType::F32,
        DatumType::I64 => ElemType::I64,
        other => ElemType::Other(format!("{other:?}").to_lowercase()),
    }
}

fn dim(d: &TDim) -> Dim {
    match d {
        TDim::Val(n) if *n >= 0 => Dim::Fixed(*n as usize),
        TDim::Sym(s) => Dim::Named(s.to_string()),
        _ => Dim::Any,
    }
}

/// When the graph at `path` stores bfloat16 initializers or 8-bit `MatMulNBits` weights (which
/// tract 0.23 does not read), its bytes with those widened to f32 (exact: every bfloat16 and
/// every dequantized weight is an f32) and external data read in; `None` otherwise.
fn widened(path: &Path) -> Result<Option<Vec<u8>>> {
    use crate::onnx::tensor_proto::DataType;
    use prost::Message;
    let bytes = std::fs::read(path)
        .map_err(|e| backend_error(KIND, path, format!("cannot read the graph: {e}")))?;
    let Ok(model) = crate::onnx::ModelProto::decode(bytes.as_slice()) else {
        return Ok(None);
    };
    let bf16 = DataType::Bfloat16 as i32;
    let Some(g) = model.graph.as_ref() else {
        return Ok(None);
    };
    let has_bf16 = g.initializer.iter().any(|t| t.data_type == bf16);
    let has_nbits8 = g.node.iter().any(is_nbits8);
    if !has_bf16 && !has_nbits8 {
        return Ok(None);
    }
    let mut model =
        crate::builder::load_model(path).map_err(|e| backend_error(KIND, path, e.to_string()))?;
    if let Some(g) = model.graph.as_mut() {
        for t in g.initializer.iter_mut().filter(|t| t.data_type == bf16) {
            let raw = std::mem::take(&mut t.raw_data);
            t.raw_data = raw
                .chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            t.data_type = DataType::Float as i32;
        }
        widen_nbits8(g).map_err(|m| backend_error(KIND, path, m))?;
    }
    Ok(Some(crate::builder::encode_model(&model)))
}

/// An 8-bit `com.microsoft.MatMulNBits` node, which tract 0.23 does not read.
fn is_nbits8(n: &crate::onnx::NodeProto) -> bool {
    n.domain == "com.microsoft"
        && n.op_type == "MatMulNBits"
        && n.attribute.iter().any(|a| a.name == "bits" && a.i == 8)
}

/// Replaces every 8-bit `MatMulNBits` (no zero points: a code stands for `(code - 128) *
/// scale`, docs/graph-contract.md) by a `MatMul` against its weight widened to f32 [K, N].
fn widen_nbits8(g: &mut crate::onnx::GraphProto) -> std::result::Result<(), String> {
    use crate::onnx::tensor_proto::DataType;
    let mut added = Vec::new();
    for n in g.node.iter_mut().filter(|n| is_nbits8(n)) {
        let attr = |name: &str| {
            n.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.i as usize)
                .ok_or_else(|| format!("MatMulNBits {}: no attribute {name}", n.name))
        };
        let (k, big_n, block) = (attr("K")?, attr("N")?, attr("block_size")?);
        if n.input.len() != 3 || block == 0 || !k.is_multiple_of(block) {
            return Err(format!(
                "MatMulNBits {}: tract runs 8-bit weights widened to f32, for nodes with codes and scales only and K a multiple of block_size",
                n.name
            ));
        }
        let find = |name: &str| g.initializer.iter().find(|t| t.name == name);
        let (Some(codes), Some(scales)) = (find(&n.input[1]), find(&n.input[2])) else {
            return Err(format!(
                "MatMulNBits {}: codes and scales must be initializers",
                n.name
            ));
        };
        let blocks = k / block;
        if codes.raw_data.len() != big_n * k || scales.raw_data.len() != big_n * blocks * 4 {
            return Err(format!(
                "MatMulNBits {}: codes or scales of the wrong size",
                n.name
            ));
        }
        let scale = |i: usize| {
            f32::from_le_bytes(
                scales.raw_data[4 * i..4 * i + 4]
                    .try_into()
                    .expect("4 bytes"),
            )
        };
        let mut w = vec![0f32; k * big_n];
        for col in 0..big_n {
            for kk in 0..k {
                let code = codes.raw_data[col * k + kk] as f32;
                w[kk * big_n + col] = (code - 128.0) * scale(col * blocks + kk / block);
            }
        }
        let name = format!("{}.widened", n.input[1]);
        if !added
            .iter()
            .any(|t: &crate::onnx::TensorProto| t.name == name)
        {
            added.push(crate::onnx::TensorProto {
                name: name.clone(),
                dims: vec![k as i64, big_n as i64],
                data_type: DataType::Float as i32,
                raw_data: w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            });
        }
        n.domain = String::new();
        n.op_type = "MatMul".into();
        n.attribute.clear();
        n.input = vec![n.input[0].clone(), name];
    }
    g.initializer.extend(added);
    Ok(())
}

/// A tensor tract returned, kept to feed a later run (shared, not copied).
#[derive(Debug, Clone)]
pub struct TractValue(TValue);

impl TractValue {
    pub(crate) fn data_address(&self) -> usize {
        self.0.as_bytes().as_ptr() as usize
    }

    /// Writes `row` at index `at` of `axis`, in place unless a run still shares the tensor; on
    /// an error the tensor is left as it was.
    pub(crate) fn write_at(
        &mut self,
        axis: usize,
        at: usize,
        row: &ndarray::ArrayViewD<'_, f32>,
    ) -> Result<()> {
        let fail = |e: tract_onnx::prelude::TractError| Error::Backend {
            backend: KIND.name(),
            message: format!("cannot write into a tract tensor: {e:#}"),
        };
        use tract_onnx::prelude::IntoTensor;
        let taken = std::mem::replace(
            &mut self.0,
            tract_onnx::prelude::tensor0(0f32).into_tvalue(),
        );
        let mut t = taken.into_tensor();
        let written = t
            .to_plain_array_view_mut::<f32>()
            .map(|mut a| a.index_axis_mut(ndarray::Axis(axis), at).assign(row));
        // the tensor goes back whether or not the write took
        self.0 = t.into_tvalue();
        written.map_err(fail)
    }

    pub(crate) fn to_array_f32(&self) -> Result<ArrayD<f32>> {
        let fail = |e: tract_onnx::prelude::TractError| Error::Backend {
            backend: KIND.name(),
            message: format!("cannot read a tract tensor as float32: {e:#}"),
        };
        let cast = self.0.cast_to::<f32>().map_err(fail)?;
        let view = cast.to_plain_array_view::<f32>().map_err(fail)?;
        Ok(view.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn famc_declutter_drops_exactly_the_splitting_pass() {
        let all = Optimizer::declutter().passes.len();
        let kept = famc_declutter().passes;
        assert_eq!(
            kept.len() + 1,
            all,
            "tract no longer has a declutter pass named {SPLITTING_PASS}: find its new name"
        );
        assert!(kept
            .iter()
            .all(|p| !format!("{p:?}").starts_with(SPLITTING_PASS)));
    }
}
