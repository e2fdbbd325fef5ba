//! The tract backend: pure Rust, CPU, single-threaded in this build.
//!
//! The graph is loaded with `tract_onnx::onnx().model_for_path` (so ONNX external data beside the
//! file is found), typed and optimised once with its symbolic dimensions (`batch`, `T`) left
//! symbolic, and turned into a plan. Each run binds the symbols from the input shapes, so one
//! runner accepts any batch and T.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::ArrayD;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoRunnable, IntoTValue, TDim, TValue, TVec,
    TypedSimplePlan, TypedSimpleState,
};

use super::{
    backend_error, check_inputs, BackendKind, Dim, ElemType, GraphRunner, IoSpec, RunOptions,
    Tensor,
};
use crate::Result;

const KIND: BackendKind = BackendKind::Tract;

/// A graph loaded by tract.
pub struct TractRunner {
    path: PathBuf,
    plan: Arc<TypedSimplePlan>,
    /// Reused from run to run; dropped after a failed run (it may hold half-bound symbols).
    state: Option<TypedSimpleState>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    input_specs: Vec<IoSpec>,
}

impl std::fmt::Debug for TractRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractRunner")
            .field("path", &self.path)
            .field("inputs", &self.input_specs)
            .field("outputs", &self.output_names)
            .finish()
    }
}

impl TractRunner {
    /// Loads and optimises the graph at `path`. `opts.intra_threads` is ignored: this build of
    /// tract is single-threaded.
    pub fn open(path: &Path, _opts: &RunOptions) -> Result<Self> {
        let err = |what: &str, e: tract_onnx::prelude::TractError| {
            backend_error(KIND, path, format!("{what}: {e:#}"))
        };
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| err("cannot load the ONNX graph", e))?;

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

        let typed = model
            .into_optimized()
            .map_err(|e| err("cannot type and optimise the graph", e))?;
        if typed.inputs.len() != input_names.len() || typed.outputs.len() != output_names.len() {
            return Err(backend_error(
                KIND,
                path,
                format!(
                    "the optimised graph has {} inputs and {} outputs, the ONNX graph {} and {}",
                    typed.inputs.len(),
                    typed.outputs.len(),
                    input_names.len(),
                    output_names.len()
                ),
            ));
        }
        let mut input_specs = Vec::with_capacity(input_names.len());
        for (ix, name) in input_names.iter().enumerate() {
            let fact = typed
                .input_fact(ix)
                .map_err(|e| err("bad graph inputs", e))?;
            input_specs.push(IoSpec {
                name: name.clone(),
                elem_type: elem_type(fact.datum_type),
                shape: Some(fact.shape.iter().map(dim).collect()),
            });
        }
        let plan = typed
            .into_runnable()
            .map_err(|e| err("cannot plan the graph", e))?;
        Ok(TractRunner {
            path: path.to_path_buf(),
            plan,
            state: None,
            input_names,
            output_names,
            input_specs,
        })
    }

    fn run_inner(&mut self, inputs: TVec<TValue>) -> Result<Vec<ArrayD<f32>>> {
        let state = match &mut self.state {
            Some(s) => s,
            None => self.state.insert(self.plan.spawn().map_err(|e| {
                backend_error(KIND, &self.path, format!("cannot start a run: {e:#}"))
            })?),
        };
        let outputs = state
            .run(inputs)
            .map_err(|e| backend_error(KIND, &self.path, format!("run failed: {e:#}")))?;
        outputs
            .into_iter()
            .zip(&self.output_names)
            .map(|(t, name)| {
                let dt = t.datum_type();
                let cast = match dt {
                    DatumType::F32 | DatumType::F16 | DatumType::F64 => t.cast_to::<f32>().ok(),
                    _ => None,
                };
                let Some(cast) = cast else {
                    return Err(backend_error(
                        KIND,
                        &self.path,
                        format!("output `{name}` is {dt:?}, not a float tensor"),
                    ));
                };
                let view = cast.to_plain_array_view::<f32>().map_err(|e| {
                    backend_error(KIND, &self.path, format!("output `{name}`: {e:#}"))
                })?;
                Ok(view.to_owned())
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

    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<ArrayD<f32>>> {
        check_inputs(KIND, &self.path, &self.input_specs, &inputs)?;
        let values: TVec<TValue> = inputs
            .into_iter()
            .map(|t| match t {
                Tensor::F32(a) => a.into_tvalue(),
                Tensor::I64(a) => a.into_tvalue(),
            })
            .collect();
        let result = self.run_inner(values);
        if result.is_err() {
            self.state = None;
        }
        result
    }
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
