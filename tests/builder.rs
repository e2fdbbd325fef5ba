//! Tests of the ONNX graph builder and external-data save/load.

use famc::builder::{
    encode_model, load_model, save_model, Attr, BuildError, DType, Dim, GraphBuilder, TensorData,
    EXTERNAL_DATA_ALIGNMENT,
};
use famc::onnx::{self, tensor_proto::DataLocation, DEFAULT_OPSET, IR_VERSION};
use tract_onnx::prelude::*;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const D: usize = 64;

/// y = Softmax(x @ W + b), x: [2, D], W: [D, D], b: [D].
fn softmax_linear(w: &[f32], bias: &[f32]) -> onnx::ModelProto {
    let mut b = GraphBuilder::new("linear", DEFAULT_OPSET);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(2), Dim::Fixed(D as i64)]);
    let (wv, bv) = b.scoped("proj", |b| {
        let wv = b.weight("weight", TensorData::from_f32(w, &[D as i64, D as i64]));
        let bv = b.weight("bias", TensorData::from_f32(bias, &[D as i64]));
        (wv.unwrap(), bv.unwrap())
    });
    let h = b.matmul(&x, &wv);
    let h = b.add(&h, &bv);
    let y = b.softmax(&h, -1);
    b.output_with_shape(&y, "y", vec![Dim::Fixed(2), Dim::Fixed(D as i64)]);
    b.set_metadata("zeta", "last");
    b.set_metadata("alpha", "first");
    b.finish().unwrap()
}

fn expected_softmax_linear(x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    for row in x.chunks(D) {
        let logits: Vec<f64> = (0..D)
            .map(|j| {
                bias[j] as f64
                    + (0..D)
                        .map(|k| row[k] as f64 * w[k * D + j] as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / s) as f32));
    }
    out
}

fn run_tract(path: &std::path::Path, x: &[f32]) -> TractResult<Vec<f32>> {
    let model = tract_onnx::onnx()
        .model_for_path(path)?
        .into_optimized()?
        .into_runnable()?;
    let input = Tensor::from_shape::<f32>(&[2, D], x)?;
    let out = model.run(tvec!(input.into()))?;
    Ok(out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect())
}

fn all_names(m: &onnx::ModelProto) -> Vec<String> {
    let g = m.graph.as_ref().unwrap();
    let mut names = Vec::new();
    for n in &g.node {
        names.push(n.name.clone());
        names.extend(n.input.iter().cloned());
        names.extend(n.output.iter().cloned());
    }
    names.extend(g.initializer.iter().map(|t| t.name.clone()));
    names.extend(g.input.iter().map(|v| v.name.clone()));
    names.extend(g.output.iter().map(|v| v.name.clone()));
    names
}

#[test]
fn model_header_and_metadata() {
    let m = softmax_linear(&values(D * D, 1), &values(D, 2));
    assert_eq!(m.ir_version, IR_VERSION);
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(m.opset_import[0].domain, "");
    assert_eq!(m.opset_import[0].version, DEFAULT_OPSET);
    assert_eq!(m.producer_name, "famc");
    assert_eq!(m.producer_version, env!("CARGO_PKG_VERSION"));
    let keys: Vec<_> = m.metadata_props.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["alpha", "zeta"]);
    // The softmax node's output was renamed to "y": no Identity needed.
    let g = m.graph.as_ref().unwrap();
    assert!(g.node.iter().all(|n| n.op_type != "Identity"));
    assert_eq!(g.node.last().unwrap().output, ["y"]);
}

#[test]
fn deterministic_encoding() {
    let (w, bias) = (values(D * D, 1), values(D, 2));
    let a = encode_model(&softmax_linear(&w, &bias));
    let b = encode_model(&softmax_linear(&w, &bias));
    assert_eq!(a, b);
}

#[test]
fn constants_are_deduplicated_and_unscoped() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let c0 = b.const_i64(&[1, 2, 3], &[3]);
    let c1 = b.scoped("deep.scope", |b| b.vec_i64(&[1, 2, 3]));
    let c2 = b.const_i64(&[1, 2, 3], &[3, 1]);
    let s0 = b.scalar_f32(0.5);
    let s1 = b.scalar(DType::F32, 0.5);
    let s2 = b.scalar(DType::F16, 0.5);
    assert_eq!(c0.name, "const.0");
    assert_eq!(c1.name, "const.0");
    assert_eq!(c2.name, "const.1");
    assert_eq!((s0.name.as_str(), s1.name.as_str()), ("const.2", "const.2"));
    assert_eq!(s2.name, "const.3");
    assert_eq!(s2.dtype, DType::F16);
    let y = b.add(&s0, &s1);
    b.output(&y, "y");
    let m = b.finish().unwrap();
    let g = m.graph.unwrap();
    assert_eq!(g.initializer.len(), 4);
    assert!(g.node.iter().all(|n| n.op_type != "Constant"));
}

#[test]
fn scoped_names() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let x = b.input(
        "x",
        DType::F32,
        vec![Dim::Sym("batch".into()), Dim::Fixed(4)],
    );
    b.push_scope("layers.3");
    let (m0, m1, w) = b.scoped("attn", |b| {
        let w = b
            .weight("q_proj.weight", TensorData::from_f32(&[0.0; 16], &[4, 4]))
            .unwrap();
        let m0 = b.matmul(&x, &w);
        let m1 = b.matmul(&m0, &w);
        (m0, m1, w)
    });
    assert_eq!(b.scope(), "layers.3");
    let m2 = b.matmul(&m1, &w);
    let named = b.op_named("q", "Identity", &[&m2], vec![], DType::F32);
    let named2 = b.op_named("q", "Identity", &[&named], vec![], DType::F32);
    assert_eq!(b.pop_scope().as_deref(), Some("layers.3"));
    let weird = b.scoped("a:b,c", |b| b.neg(&named2));
    let top = b.neg(&weird);
    b.output(&top, "out");
    assert_eq!(w.name, "layers.3.attn.q_proj.weight");
    assert_eq!(m0.name, "layers.3.attn.MatMul_0");
    assert_eq!(m1.name, "layers.3.attn.MatMul_1");
    assert_eq!(m2.name, "layers.3.MatMul_0");
    assert_eq!(named.name, "layers.3.q");
    assert_eq!(named2.name, "layers.3.q_0");
    assert_eq!(weird.name, "a_b_c.Neg_0");
    assert_eq!(top.name, "Neg_0");
    let m = b.finish().unwrap();
    for n in all_names(&m) {
        assert!(!n.contains(':') && !n.contains(','), "bad name {n:?}");
    }
}

#[test]
fn explicit_names_with_separators_are_rejected() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    assert!(matches!(
        b.weight("w:0", TensorData::from_f32(&[1.0], &[1])),
        Err(BuildError::InvalidName { .. })
    ));
    let x = b.input("x,y", DType::F32, vec![Dim::Fixed(1)]);
    b.output(&x, "out");
    assert!(matches!(b.finish(), Err(BuildError::InvalidName { .. })));
}

#[test]
fn weight_name_collisions() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let w1 = b
        .weight("w", TensorData::from_f32(&[1.0, 2.0], &[2]))
        .unwrap();
    let w2 = b
        .weight("w", TensorData::from_f32(&[1.0, 2.0], &[2]))
        .unwrap();
    assert_eq!(w1, w2);
    let err = b
        .weight("w", TensorData::from_f32(&[1.0, 3.0], &[2]))
        .unwrap_err();
    assert!(matches!(err, BuildError::DuplicateName { .. }));
    assert!(err.to_string().contains("\"w\""));
    let bad = TensorData {
        dtype: DType::F32,
        dims: vec![3],
        raw: vec![0; 8],
    };
    assert!(matches!(
        b.weight("bad", bad),
        Err(BuildError::TensorSize { .. })
    ));
    b.output(&w1, "out");
    let m = b.finish().unwrap();
    assert_eq!(m.graph.unwrap().initializer.len(), 1);
}

#[test]
fn outputs_rename_or_identity() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(2)]);
    let y = b.neg(&x);
    let z = b.sqrt(&y);
    // y already feeds z: renaming must patch z's input; later uses of the
    // stale handle must resolve to the new name.
    b.output(&y, "y_out");
    let w = b.add(&y, &z);
    b.output(&w, "w_out");
    b.output(&w, "w_again");
    b.output(&x, "x_out");
    let m = b.finish().unwrap();
    let g = m.graph.unwrap();
    let neg = g.node.iter().find(|n| n.op_type == "Neg").unwrap();
    assert_eq!(neg.output, ["y_out"]);
    let sqrt = g.node.iter().find(|n| n.op_type == "Sqrt").unwrap();
    assert_eq!(sqrt.input, ["y_out"]);
    let add = g.node.iter().find(|n| n.op_type == "Add").unwrap();
    assert_eq!(add.input[0], "y_out");
    assert_eq!(add.output, ["w_out"]);
    let ids: Vec<_> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Identity")
        .map(|n| (n.name.as_str(), n.input[0].as_str()))
        .collect();
    assert_eq!(ids, [("w_again", "w_out"), ("x_out", "x")]);
    let outs: Vec<_> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs, ["y_out", "w_out", "w_again", "x_out"]);

    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(2)]);
    b.output(&x, "x");
    b.output(&x, "x");
    assert!(matches!(b.finish(), Err(BuildError::DuplicateName { .. })));
}

#[test]
fn axes_follow_opset() {
    fn reduce_nodes(opset: i64) -> Vec<onnx::NodeProto> {
        let mut b = GraphBuilder::new("g", opset);
        let x = b.input("x", DType::F32, vec![Dim::Fixed(2), Dim::Fixed(3)]);
        let a = b.reduce_mean(&x, &[-1], true);
        let s = b.reduce_sum(&a, &[-1], false);
        let u = b.unsqueeze(&s, &[0]);
        b.output(&u, "y");
        b.finish().unwrap().graph.unwrap().node
    }
    let n17 = reduce_nodes(17);
    assert_eq!(n17[0].op_type, "ReduceMean");
    assert_eq!(n17[0].input.len(), 1);
    assert!(n17[0].attribute.iter().any(|a| a.name == "axes"));
    assert_eq!(n17[1].op_type, "ReduceSum");
    assert_eq!(n17[1].input.len(), 2);
    assert_eq!(n17[2].input.len(), 2);
    let n18 = reduce_nodes(18);
    assert_eq!(n18[0].input.len(), 2);
    assert!(n18[0].attribute.iter().all(|a| a.name != "axes"));

    let mut b = GraphBuilder::new("g", 11);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(1)]);
    b.output(&x, "y");
    assert!(matches!(b.finish(), Err(BuildError::UnsupportedOpset(11))));
}

#[test]
fn optional_inputs_and_multi_outputs() {
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(4), Dim::Fixed(4)]);
    let y = b.slice(&x, &[0], &[2], &[0], None);
    let parts = b.op_multi(
        "Split",
        &[Some(&y), None],
        vec![Attr::int("axis", 1)],
        &[DType::F32, DType::F32],
    );
    let clip = b.op_opt(
        "Clip",
        &[Some(&parts[0]), None, Some(&parts[1])],
        vec![],
        DType::F32,
    );
    b.output(&clip, "y");
    let g = b.finish().unwrap().graph.unwrap();
    let slice = &g.node[0];
    assert_eq!(slice.input.len(), 4, "trailing None is dropped");
    let split = &g.node[1];
    assert_eq!(split.input.len(), 1);
    assert_eq!(split.output, ["Split_0_out0", "Split_0_out1"]);
    let clip = &g.node[2];
    assert_eq!(clip.input, ["Split_0_out0", "", "Split_0_out1"]);
}

#[test]
fn foreign_values_are_reported() {
    let mut other = GraphBuilder::new("other", DEFAULT_OPSET);
    let foreign = other.input("foreign", DType::F32, vec![Dim::Fixed(1)]);
    let mut b = GraphBuilder::new("g", DEFAULT_OPSET);
    let y = b.neg(&foreign);
    b.output(&y, "y");
    let err = b.finish().unwrap_err();
    assert!(matches!(err, BuildError::UndefinedValue { .. }), "{err}");
}

#[test]
fn tract_matches_hand_computation() {
    let (w, bias, x) = (values(D * D, 1), values(D, 2), values(2 * D, 3));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linear.onnx");
    save_model(softmax_linear(&w, &bias), &path, None).unwrap();
    assert!(!dir.path().join("linear.onnx.data").exists());
    let got = run_tract(&path, &x).unwrap();
    let want = expected_softmax_linear(&x, &w, &bias);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
fn external_data_round_trip() {
    let (w, bias, x) = (values(D * D, 1), values(D, 2), values(2 * D, 3));
    let model = softmax_linear(&w, &bias);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.onnx");
    let data_path = dir.path().join("x.onnx.data");
    save_model(model.clone(), &path, Some(1024)).unwrap();
    assert!(path.exists() && data_path.exists());
    // Only the model and its data file: temporary files were renamed away.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

    // The weight (16 KiB) moved out; the bias (256 B) stayed inline.
    let raw = onnx::ModelProto::decode_file(&path);
    let g = raw.graph.as_ref().unwrap();
    let weight = g
        .initializer
        .iter()
        .find(|t| t.name == "proj.weight")
        .unwrap();
    assert!(weight.raw_data.is_empty());
    assert_eq!(weight.data_location, DataLocation::External as i32);
    let entry = |k: &str| {
        weight
            .external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    assert_eq!(entry("location").as_deref(), Some("x.onnx.data"));
    let offset: u64 = entry("offset").unwrap().parse().unwrap();
    assert_eq!(offset % EXTERNAL_DATA_ALIGNMENT, 0);
    assert_eq!(entry("length").as_deref(), Some("16384"));
    let bias_t = g
        .initializer
        .iter()
        .find(|t| t.name == "proj.bias")
        .unwrap();
    assert_eq!(bias_t.raw_data.len(), D * 4);

    let loaded = load_model(&path).unwrap();
    assert_eq!(loaded, model);
    assert_eq!(encode_model(&loaded), encode_model(&model));

    // tract finds the data file beside the model.
    let got = run_tract(&path, &x).unwrap();
    let want = expected_softmax_linear(&x, &w, &bias);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }

    // A truncated data file is an error naming the file and the tensor.
    let len = std::fs::metadata(&data_path).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&data_path)
        .unwrap();
    f.set_len(len - 1).unwrap();
    drop(f);
    let err = load_model(&path).unwrap_err();
    assert!(
        matches!(err, BuildError::ExternalDataTruncated { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("x.onnx.data") && msg.contains("proj.weight"),
        "{msg}"
    );

    // A missing data file is an I/O error naming it.
    std::fs::remove_file(&data_path).unwrap();
    let msg = load_model(&path).unwrap_err().to_string();
    assert!(msg.contains("x.onnx.data"), "{msg}");
}

#[test]
fn external_data_rejects_escaping_locations() {
    let mut m = softmax_linear(&values(D * D, 1), &values(D, 2));
    let g = m.graph.as_mut().unwrap();
    let t = &mut g.initializer[0];
    t.raw_data.clear();
    t.data_location = DataLocation::External as i32;
    t.external_data = vec![onnx::StringStringEntryProto {
        key: "location".into(),
        value: "../secret".into(),
    }];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    save_model(m, &path, None).unwrap();
    let err = load_model(&path).unwrap_err();
    assert!(matches!(err, BuildError::ExternalData { .. }), "{err}");
}

#[test]
fn garbage_model_is_a_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.onnx");
    std::fs::write(&path, b"\xff\xff\xff not a model").unwrap();
    let err = load_model(&path).unwrap_err();
    assert!(matches!(err, BuildError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("bad.onnx"));
}

trait DecodeFile {
    fn decode_file(path: &std::path::Path) -> Self;
}

impl DecodeFile for onnx::ModelProto {
    fn decode_file(path: &std::path::Path) -> Self {
        use prost::Message;
        onnx::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
    }
}

#[test]
fn tensor_data_encodings() {
    let h = TensorData::from_f16(&[half::f16::from_f32(1.0), half::f16::from_f32(-2.0)], &[2]);
    assert_eq!(h.raw, [0x00, 0x3c, 0x00, 0xc0]);
    let b = TensorData::from_bf16(&[half::bf16::from_f32(1.0)], &[1, 1]);
    assert_eq!(b.raw, [0x80, 0x3f]);
    assert_eq!(TensorData::from_i64(&[1], &[]).raw, 1i64.to_le_bytes());
    assert_eq!(TensorData::from_bool(&[true, false], &[2]).raw, [1, 0]);
    assert_eq!(TensorData::scalar(DType::BF16, 1.0), b_scalar());
    assert!(TensorData::new(DType::F32, vec![2], vec![0; 7]).is_err());
    for (d, code, size) in [
        (DType::F32, 1, 4),
        (DType::F16, 10, 2),
        (DType::BF16, 16, 2),
        (DType::I64, 7, 8),
        (DType::I32, 6, 4),
        (DType::Bool, 9, 1),
    ] {
        assert_eq!(d.onnx() as i32, code);
        assert_eq!(DType::from_onnx(code), Some(d));
        assert_eq!(d.size_bytes(), size);
    }
}

fn b_scalar() -> TensorData {
    TensorData::from_bf16(&[half::bf16::from_f32(1.0)], &[])
}
