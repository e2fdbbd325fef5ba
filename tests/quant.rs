//! q8 and q4 exports: the quantization against an independent dequantization written here from
//! docs/graph-contract.md, and ONNX Runtime's logits against the f64 reference run on the
//! dequantized weights, so that quantization is the only difference from f32.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use famc::builder::load_model;
use famc::emit::quant::{quantize, BLOCK};
use famc::export::{self, Activations, ExportOptions, WeightDtype};
use famc::model::{Checkpoint, FamParams};
use famc::onnx::Target;
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;
use ndarray::Array2;

/// The weight each code stands for, from the documented layout: rows of K/32 blocks, codes low
/// nibble first for 4 bits; `(code - 128) * scale` for 8 bits, `(code - 8) * scale + offset`
/// for 4 bits, the offsets [K/32, N].
fn dequantize(
    bits: u32,
    n: usize,
    k: usize,
    codes: &[u8],
    scales: &[f32],
    offsets: Option<&[f32]>,
) -> Vec<f32> {
    let blocks = k / 32;
    let blob = 32 * bits as usize / 8;
    let mut w = vec![0f32; n * k];
    for r in 0..n {
        for b in 0..blocks {
            let at = r * blocks + b;
            let (mid, offset) = match offsets {
                Some(o) => (8.0, o[b * n + r] as f64),
                None => (128.0, 0.0),
            };
            for i in 0..32 {
                let byte = codes[at * blob + i * bits as usize / 8];
                let code = if bits == 8 {
                    byte
                } else {
                    (byte >> (4 * (i % 2))) & 15
                };
                w[r * k + b * 32 + i] = ((code as f64 - mid) * scales[at] as f64 + offset) as f32;
            }
        }
    }
    w
}

#[test]
fn quantization_error_is_within_half_a_step_and_q4_1_blocks_are_exact() {
    let mut rng = Rng::new(7);
    let (n, k) = (5, 96);
    let w = Array2::from_shape_fn((n, k), |_| rng.uniform() * 2.0 - 1.0);
    for bits in [8, 4] {
        let q = quantize(&w, bits);
        let back = dequantize(bits, n, k, &q.codes, &q.scales, q.offsets.as_deref());
        for r in 0..n {
            for c in 0..k {
                let step = q.scales[r * (k / BLOCK) + c / BLOCK];
                let err = (back[r * k + c] - w[[r, c]]).abs();
                assert!(
                    err <= 0.5 * step * (1.0 + 1e-5),
                    "{bits} bits: [{r}, {c}] off by {err}, step {step}"
                );
            }
        }
    }
    // a block made as GGUF's Q4_1 makes it (codes 0..15 with a scale and a minimum) comes back
    let (d, m) = (
        half::f16::from_f32(0.0123).to_f32(),
        half::f16::from_f32(-0.0871).to_f32(),
    );
    let w = Array2::from_shape_fn((2, 64), |(r, c)| ((r * 7 + c * 5) % 16) as f32 * d + m);
    let q = quantize(&w, 4);
    let back = dequantize(4, 2, 64, &q.codes, &q.scales, q.offsets.as_deref());
    let worst = back
        .iter()
        .zip(w.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-7, "Q4_1 block reproduced within {worst}");
}

/// `graph`'s initializers by name.
fn initializers(graph: &Path) -> BTreeMap<String, famc::onnx::TensorProto> {
    load_model(graph)
        .unwrap()
        .graph
        .unwrap()
        .initializer
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

/// An f32 initializer's values.
fn f32s(t: &famc::onnx::TensorProto) -> Vec<f32> {
    t.raw_data
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The checkpoint's tensors with every matrix replaced by what the export's graph dequantizes
/// it to, read from `graph`'s `<name>.codes`, `.scales` and `.offsets` initializers.
fn dequantized_tensors(graph: &Path, t: &Tensors, bits: u32) -> Tensors {
    let inits = initializers(graph);
    let mut out = t.0.clone();
    for (name, (shape, v)) in out.iter_mut() {
        if shape.len() != 2 || name == "model.fam_init" {
            continue;
        }
        let graph_name = graph_name(name);
        let (packed, before, rows) = stored_rows(&inits, &graph_name, shape[0], t);
        let codes = &inits[&format!("{packed}.codes")];
        // the embedding (and a tied head, which reads it) is always 8-bit
        let b = if graph_name == "embed_tokens" {
            8
        } else {
            bits
        };
        let zp = inits.get(&format!("{packed}.offsets")).map(f32s);
        assert_eq!(zp.is_some(), b == 4, "{packed}");
        let all = dequantize(
            b,
            rows,
            shape[1],
            &codes.raw_data,
            &f32s(&inits[&format!("{packed}.scales")]),
            zp.as_deref(),
        );
        *v = all[before * shape[1]..(before + shape[0]) * shape[1]].to_vec();
    }
    Tensors(out)
}

/// The graph's name for checkpoint matrix `name` (`model.layers.3.self_attn.q_proj.weight` →
/// `layers.3.attn.q_proj`).
fn graph_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => "embed_tokens".to_string(),
        "lm_head.weight" => "head.lm_head".to_string(),
        other => {
            let rest = other.strip_prefix("model.layers.").unwrap();
            let (layer, rest) = rest.split_once('.').unwrap();
            let rest = rest
                .strip_suffix(".weight")
                .unwrap()
                .replace("self_attn.", "attn.");
            format!("layers.{layer}.{rest}")
        }
    }
}

/// Where the graph holds matrix `graph_name` of `rows` rows: the initializers' name, the rows
/// before it there and their rows in all. The `ort` target packs q/k/v and gate/up, so such a
/// matrix is a run of rows of the packed one.
fn stored_rows(
    inits: &BTreeMap<String, famc::onnx::TensorProto>,
    graph_name: &str,
    rows: usize,
    t: &Tensors,
) -> (String, usize, usize) {
    if inits.contains_key(&format!("{graph_name}.codes")) {
        (graph_name.to_string(), 0, rows)
    } else {
        packed_part(graph_name, &t.0)
    }
}

/// For `layers.N.<group>.<part>` of a packed projection: the packed matrix's name, the rows of
/// the parts before this one and the packed matrix's rows (shapes from the checkpoint `t`).
fn packed_part(
    graph_name: &str,
    t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> (String, usize, usize) {
    let (prefix, part) = graph_name.rsplit_once('.').unwrap();
    let (packed, parts, ck_group) = match prefix.rsplit_once('.').unwrap().1 {
        "attn" => (
            "qkv_proj",
            ["q_proj", "k_proj", "v_proj"].as_slice(),
            "self_attn",
        ),
        _ => ("gate_up_proj", ["gate_proj", "up_proj"].as_slice(), "mlp"),
    };
    let layer = prefix.split('.').nth(1).unwrap();
    let rows = |p: &str| t[&format!("model.layers.{layer}.{ck_group}.{p}.weight")].0[0];
    let at = parts.iter().position(|p| *p == part).unwrap();
    let before = parts[..at].iter().map(|p| rows(p)).sum();
    let all = parts.iter().map(|p| rows(p)).sum();
    (format!("{prefix}.{packed}"), before, all)
}

/// The f64 reference's logits for `ids` on `tensors` (with the config of checkpoint `ck_dir`),
/// written as a checkpoint into `at`.
fn reference_on(
    ck_dir: &Path,
    tensors: &Tensors,
    at: &Path,
    p: FamParams,
    ids: &[u32],
) -> ndarray::Array2<f64> {
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(ck_dir.join("config.json"), at.join("config.json")).unwrap();
    write_safetensors(at, tensors, DiskDtype::F32, 1);
    Reference::new(&Checkpoint::load(at).unwrap(), p)
        .unwrap()
        .forward(ids)
        .unwrap()
}

/// A model whose dimensions are whole blocks of 32, as q8 and q4 need.
fn small_model(tie: bool) -> Spec {
    Spec {
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        inter: 96,
        vocab: 80,
        tie,
        fam_init_rows: Some(2),
        ..Spec::default()
    }
}

/// L = 4, F = 2, M = 1.
const SMALL_FAM: FamParams = FamParams {
    block_len: 4,
    fam_len: 2,
    mem_blocks: 1,
};

#[test]
fn q8_and_q4_logits_equal_the_reference_on_the_dequantized_weights() {
    if !backends().contains(&BackendKind::Ort) {
        eprintln!("skipped: ONNX Runtime is not available");
        return;
    }
    for tie in [true, false] {
        let spec = small_model(tie);
        let (tmp, dir, tensors) = temp_checkpoint(&spec);
        let ck = Checkpoint::load(&dir).unwrap();
        let p = SMALL_FAM;
        let ids = Rng::new(5).tokens(15, spec.vocab as u32);
        let f32_logits = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
        let cases = Target::ALL
            .into_iter()
            .flat_map(|t| [(t, WeightDtype::Q8, 8), (t, WeightDtype::Q4, 4)]);
        for (target, dtype, bits) in cases {
            let out = tmp.path().join(format!("export-{}-{target}", dtype.name()));
            export::export(
                &ck,
                p,
                &out,
                &ExportOptions {
                    dtype,
                    accuracy_level: 1,
                    external_threshold: 256,
                    target,
                    ..ExportOptions::default()
                },
            )
            .unwrap();
            let deq = dequantized_tensors(&out.join("block.onnx"), &tensors, bits);
            let deq_dir = tmp
                .path()
                .join(format!("dequantized-{}-{target}", dtype.name()));
            let want = reference_on(&dir, &deq, &deq_dir, p, &ids);
            let got = FamModel::open(&out, BackendKind::Ort, &RunOptions::default())
                .unwrap()
                .run(&ids)
                .unwrap();
            let diff = max_abs_diff(got.mapv(f64::from).iter(), want.iter());
            let from_f32 = max_abs_diff(want.iter(), f32_logits.iter());
            eprintln!(
                "tie {tie}, {}: |ort - reference(dequantized)| {diff:.2e}, |reference(dequantized) - reference(f32)| {from_f32:.2e} (logits up to {:.1})",
                dtype.name(),
                f32_logits.iter().fold(0f64, |m, v| m.max(v.abs()))
            );
            assert!(diff < 1e-4, "tie {tie}, {} {target}: {diff}", dtype.name());
            assert!(
                from_f32 > 1e-6,
                "{}: quantization changed nothing",
                dtype.name()
            );
            // each matrix within half a step of the original: max |w| / 254 for 8 bits,
            // (max - min) / 30 <= max |w| / 15 for 4 bits
            for (name, (shape, v)) in &deq.0 {
                if shape.len() != 2 || name == "model.fam_init" {
                    continue;
                }
                let orig = tensors.get(name);
                let max = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
                let b = if name == "model.embed_tokens.weight" {
                    8
                } else {
                    bits
                };
                let bound = max * if b == 8 { 1.0 / 254.0 } else { 1.0 / 15.0 } * 1.001;
                let err = v
                    .iter()
                    .zip(orig)
                    .map(|(a, o)| (a - o).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err <= bound,
                    "{name} ({b} bits): off by {err}, bound {bound}"
                );
            }

            // tract keeps 4-bit matrices as its Q4_0 (f16 scales, which famc's are) and widens
            // 8-bit ones to f32 at load
            if !runs(target, BackendKind::Tract) {
                continue;
            }
            let got = FamModel::open(&out, BackendKind::Tract, &RunOptions::default())
                .unwrap()
                .run(&ids)
                .unwrap();
            let diff = max_abs_diff(got.mapv(f64::from).iter(), want.iter());
            eprintln!("tie {tie}, {} on tract: {diff:.2e}", dtype.name());
            assert!(diff < 1e-4, "tie {tie}, {} on tract: {diff}", dtype.name());
        }
    }
}

#[test]
fn quantized_exports_need_inputs_in_whole_blocks() {
    let (tmp, dir, _) = temp_checkpoint(&Spec::default());
    let ck = Checkpoint::load(&dir).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 0,
        mem_blocks: 1,
    };
    let err = export::export(
        &ck,
        p,
        &tmp.path().join("q"),
        &ExportOptions {
            dtype: WeightDtype::Q4,
            ..ExportOptions::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("multiples of 32") && err.contains("16 inputs"),
        "{err}"
    );
}

#[test]
fn the_cli_refuses_bad_quantization_requests_before_writing() {
    let (tmp, dir, _) = temp_checkpoint(&Spec::default());
    let out = tmp.path().join("q");
    let base = [
        "export",
        dir.to_str().unwrap(),
        "--block-len",
        "4",
        "--fam-len",
        "0",
        "--mem-blocks",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    // hidden_size 16 is no whole block of 32
    let o = famc(&[&base[..], &["--dtype", "q4"]].concat());
    assert_clean_failure(&o, "multiples of 32");
    let o = famc(&[&base[..], &["--dtype", "q8", "--accuracy-level", "9"]].concat());
    assert_clean_failure(&o, "--accuracy-level 9");
    let o = famc(&[&base[..], &["--dtype", "q3"]].concat());
    assert_clean_failure(&o, "q3");
    let o = famc(&[&base[..], &["--dtype", "q4", "--activations", "int8"]].concat());
    assert_clean_failure(&o, "use --dtype q8");
    let o = famc(&[&base[..], &["--activations", "int4"]].concat());
    assert_clean_failure(&o, "int4");
    assert!(!out.exists(), "a refused export left {}", out.display());
}

/// The checkpoint's tensors with each o_proj, gate and up matrix replaced by what an int8-
/// activation export's `<name>.codes` [K, N] int8 and `.scales` [N] stand for (code · scale of
/// its output row, docs/graph-contract.md), and the other matrices and the embedding by their
/// 8-bit blocks.
fn row_dequantized_tensors(graph: &Path, t: &Tensors) -> Tensors {
    let inits = initializers(graph);
    let mut out = t.0.clone();
    for (name, (shape, v)) in out.iter_mut() {
        if shape.len() != 2 || name == "model.fam_init" {
            continue;
        }
        let (rows, k) = (shape[0], shape[1]);
        if name == "model.embed_tokens.weight" {
            let codes = &inits["embed_tokens.codes"];
            let scales = f32s(&inits["embed_tokens.scales"]);
            *v = dequantize(8, rows, k, &codes.raw_data, &scales, None);
            continue;
        }
        let (packed, before, n) = stored_rows(&inits, &graph_name(name), rows, t);
        let codes = &inits[&format!("{packed}.codes")];
        let scales = f32s(&inits[&format!("{packed}.scales")]);
        // o_proj and gate/up take int8 activations; q/k/v and down_proj keep q8 blocks
        let int8 = ["o_proj", "gate_proj", "up_proj", "gate_up_proj"]
            .iter()
            .any(|p| packed.ends_with(p));
        if !int8 {
            assert_eq!(codes.data_type, 2, "{packed}.codes is uint8 blocks");
            let all = dequantize(8, n, k, &codes.raw_data, &scales, None);
            *v = all[before * k..(before + rows) * k].to_vec();
            continue;
        }
        assert_eq!(codes.data_type, 3, "{packed}.codes is int8");
        assert_eq!(codes.dims, [k as i64, n as i64], "{packed}.codes is [K, N]");
        for r in 0..rows {
            for c in 0..k {
                let code = codes.raw_data[c * n + before + r] as i8;
                v[r * k + c] = (code as f64 * scales[before + r] as f64) as f32;
            }
        }
    }
    Tensors(out)
}

#[test]
fn int8_activations_stay_near_the_reference_and_each_row_stands_alone() {
    let spec = small_model(true);
    let (tmp, dir, tensors) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = SMALL_FAM;
    let ids = Rng::new(5).tokens(15, spec.vocab as u32);
    let other = Rng::new(6).tokens(15, spec.vocab as u32);
    let f32_logits = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
    for target in Target::ALL {
        let out = tmp.path().join(format!("export-int8-{target}"));
        export::export(
            &ck,
            p,
            &out,
            &ExportOptions {
                dtype: WeightDtype::Q8,
                accuracy_level: 1,
                external_threshold: 256,
                target,
                activations: Activations::Int8,
            },
        )
        .unwrap();
        let deq = row_dequantized_tensors(&out.join("block.onnx"), &tensors);
        let deq_dir = tmp.path().join(format!("row-dequantized-{target}"));
        let want = reference_on(&dir, &deq, &deq_dir, p, &ids);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let weights_moved = max_abs_diff(want.iter(), f32_logits.iter());
        let mut seen = Vec::new();
        for backend in backends() {
            if !runs(target, backend) {
                continue;
            }
            let m = FamModel::open(&out, backend, &RunOptions::default()).unwrap();
            let got = m.run(&ids).unwrap();
            let diff = max_abs_diff(got.mapv(f64::from).iter(), want.iter());
            eprintln!(
                "{target} on {backend}: |int8 - reference(dequantized)| {diff:.2e}, |reference(dequantized) - reference(f32)| {weights_moved:.2e} (logits up to {scale:.1})"
            );
            // what is left is the activations' rounding, half a step of each row's max / 127:
            // the same step as the weights' own, so it moves this (sensitive, random) model's
            // logits no more than the weights' rounding did
            assert!(
                diff < weights_moved,
                "{target} on {backend}: {diff} (weights' rounding {weights_moved})"
            );
            assert!(diff > 1e-6, "{target} on {backend}: int8 changed nothing");

            // a row's quantization is its own: batched with another stream, the logits are the
            // ones it has alone
            let mut states = [m.new_state(), m.new_state()];
            let alone = {
                let mut s = [m.new_state()];
                m.step(&mut s, &[&ids[..4]]).unwrap().remove(0)
            };
            let batched = m.step(&mut states, &[&ids[..4], &other[..4]]).unwrap();
            let apart = max_abs_diff_f32(batched[0].iter(), alone.iter());
            assert!(
                apart < 1e-5,
                "{target} on {backend}: batching moved logits by {apart}"
            );
            seen.push((backend, got));
        }
        if let [(_, a), (_, b)] = &seen[..] {
            let diff = max_abs_diff_f32(a.iter(), b.iter());
            eprintln!("{target}: |tract - ort| {diff:.2e}");
            assert!(
                diff < 1e-3 * scale as f32,
                "{target}: tract and ONNX Runtime differ by {diff}"
            );
        }
    }
}
