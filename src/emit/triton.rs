//! The block graph as Triton Inference Server's sequence batcher drives it (implicit state):
//! the same computation, with the interface Triton's ONNX Runtime backend needs.
//!
//! - The block index comes from a step-counter state (`state_in.step`), reset by START, not
//!   from the client.
//! - Control inputs START and READY are `[batch, 1]` int32. A row with READY = 0 (a null slot
//!   of the `direct` strategy) keeps its state and its step: it leaves no trace.
//! - State tensors are named `state_in.L03.fam` / `state_out.L03.fam` with zero-padded layers,
//!   so that inputs and outputs sort in the same order (Triton pairs them by sorted position,
//!   triton-inference-server/server#8586).
//! - A request holds exactly one block of L tokens.

use crate::builder::{value_info, DType, Dim};
use crate::emit::names;
use crate::error::{Error, Result};
use crate::export::Manifest;
use crate::onnx::{self, tensor_proto::DataType};

/// The control input of a sequence's first request.
pub const START: &str = "START";
/// The control input that is 0 on the null rows of the `direct` strategy.
pub const READY: &str = "READY";
/// The step counter (the next block's index) before and after a block.
pub const STEP_IN: &str = "state_in.step";
pub const STEP_OUT: &str = "state_out.step";

/// Digits of the layer in state names: two, or more for 100 layers and over.
pub fn layer_width(num_layers: usize) -> usize {
    num_layers.saturating_sub(1).to_string().len().max(2)
}

/// The Triton name of a state tensor: `state_in.L03.fam` (`dir` "in") or `state_out.L03.fam`.
pub fn state_name(dir: &str, layer: usize, kind: &str, width: usize) -> String {
    format!("state_{dir}.L{layer:0width$}.{kind}")
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<onnx::AttributeProto>,
) -> onnx::NodeProto {
    onnx::NodeProto {
        op_type: op.into(),
        name: format!("triton/{name}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn const_i64(name: &str, values: &[i64]) -> onnx::NodeProto {
    let t = onnx::TensorProto {
        dims: vec![values.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    };
    let attr = onnx::AttributeProto {
        name: "value".into(),
        r#type: onnx::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    };
    node("Constant", name, &[], name, vec![attr])
}

/// Sets dimension `axis` of a tensor value's shape to `n`.
fn fix_dim(v: &mut onnx::ValueInfoProto, axis: usize, n: usize) {
    use onnx::tensor_shape_proto::dimension::Value;
    if let Some(onnx::TypeProto {
        value: Some(onnx::type_proto::Value::TensorType(t)),
        ..
    }) = v.r#type.as_mut()
    {
        if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.get_mut(axis)) {
            d.value = Some(Value::DimValue(n as i64));
        }
    }
}

fn rank(v: &onnx::ValueInfoProto) -> usize {
    match &v.r#type {
        Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(t)),
            ..
        }) => t.shape.as_ref().map_or(0, |s| s.dim.len()),
        _ => 0,
    }
}

/// The Triton form of an export's block graph (see the module's documentation).
pub fn sequence_graph(
    mut model: onnx::ModelProto,
    manifest: &Manifest,
) -> Result<onnx::ModelProto> {
    let bad =
        |message: String| Error::Input(format!("the block graph cannot serve Triton: {message}"));
    let l_len = manifest.fam.block_len;
    let width = layer_width(manifest.model.num_layers);
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| bad("it has no graph".into()))?;
    let take = |list: &mut Vec<onnx::ValueInfoProto>, what: &str, name: &str| {
        list.iter()
            .position(|i| i.name == name)
            .map(|p| list.remove(p))
            .ok_or_else(|| bad(format!("no {what} `{name}`")))
    };
    let take_input = |g: &mut onnx::GraphProto, name: &str| take(&mut g.input, "input", name);
    let take_output = |g: &mut onnx::GraphProto, name: &str| take(&mut g.output, "output", name);
    let mut ids = take_input(g, names::INPUT_IDS)?;
    fix_dim(&mut ids, 1, l_len);
    take_input(g, names::BLOCK_INDEX)?;
    let mut logits = take_output(g, names::LOGITS)?;
    fix_dim(&mut logits, 1, l_len);
    let batch = Dim::Sym(crate::emit::BATCH.into());
    let control =
        |name: &str, dtype| value_info(name, dtype, Some(&[batch.clone(), Dim::Fixed(1)]));

    let mut inputs = vec![ids, control(START, DType::I32), control(READY, DType::I32)];
    let mut outputs = vec![logits];
    let mut prologue = vec![
        node(
            "Cast",
            "start",
            &[START],
            "triton.start",
            vec![int_attr("to", DataType::Int64 as i32 as i64)],
        ),
        const_i64("triton.one", &[1]),
        node(
            "Sub",
            "keep",
            &["triton.one", "triton.start"],
            "triton.keep",
            vec![],
        ),
        node(
            "Mul",
            "step",
            &[STEP_IN, "triton.keep"],
            "triton.step",
            vec![],
        ),
        const_i64("triton.axis1", &[1]),
        node(
            "Squeeze",
            "block_index",
            &["triton.step", "triton.axis1"],
            names::BLOCK_INDEX,
            vec![],
        ),
        node(
            "Cast",
            "ready",
            &[READY],
            "triton.ready",
            vec![int_attr("to", DataType::Bool as i32 as i64)],
        ),
        node("Cast", "ready64", &[READY], "triton.ready64", vec![]),
    ];
    prologue[7]
        .attribute
        .push(int_attr("to", DataType::Int64 as i32 as i64));
    let mut epilogue = Vec::new();
    let mut ready_ranks = std::collections::BTreeSet::new();
    for st in &manifest.state {
        let mut input = take_input(g, &st.input)?;
        let mut output = take_output(g, &st.output)?;
        let (tin, tout) = (
            state_name("in", st.layer, st.kind.name(), width),
            state_name("out", st.layer, st.kind.name(), width),
        );
        let r = rank(&input);
        if r < 2 {
            return Err(bad(format!("state `{}` has rank {r}", st.input)));
        }
        ready_ranks.insert(r);
        prologue.push(node("Identity", &tin, &[&tin], &st.input, vec![]));
        epilogue.push(node(
            "Where",
            &tout,
            &[&format!("triton.ready{r}"), &st.output, &tin],
            &tout,
            vec![],
        ));
        input.name = tin;
        output.name = tout;
        inputs.push(input);
        outputs.push(output);
    }
    for r in ready_ranks {
        // READY [B, 1] broadcast over a state of rank r
        let axes: Vec<i64> = (2..r as i64).collect();
        let axes_name = format!("triton.axes{r}");
        prologue.push(const_i64(&axes_name, &axes));
        prologue.push(node(
            "Unsqueeze",
            &format!("ready{r}"),
            &["triton.ready", &axes_name],
            &format!("triton.ready{r}"),
            vec![],
        ));
    }
    let step_info =
        |name: &str| value_info(name, DType::I64, Some(&[batch.clone(), Dim::Fixed(1)]));
    inputs.push(step_info(STEP_IN));
    outputs.push(step_info(STEP_OUT));
    epilogue.push(node(
        "Add",
        "next_step",
        &["triton.step", "triton.ready64"],
        STEP_OUT,
        vec![],
    ));
    if !g.input.is_empty() || !g.output.is_empty() {
        let left: Vec<&str> = g
            .input
            .iter()
            .chain(&g.output)
            .map(|v| v.name.as_str())
            .collect();
        return Err(bad(format!("famc.json does not describe {left:?}")));
    }
    g.input = inputs;
    g.output = outputs;
    let body = std::mem::take(&mut g.node);
    g.node = prologue.into_iter().chain(body).chain(epilogue).collect();
    g.name = "famc_triton_block".into();
    Ok(model)
}
