//! Emitted FAM graphs on tract and ONNX Runtime against the pure-Rust reference and Hugging Face.

mod common;

use common::*;
use famc::export::{self, ExportOptions};
use famc::model::{Checkpoint, FamParams};
use famc::onnx::Target;
use famc::reference::Reference;
use famc::runtime::{BackendKind, RunOptions};
use famc::session::FamModel;

fn params(l: usize, f: usize, m: usize) -> FamParams {
    FamParams {
        block_len: l,
        fam_len: f,
        mem_blocks: m,
    }
}

fn check_case(spec: Spec, p: FamParams, len: usize) {
    let (_tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let ids = Rng::new(spec.seed + 1).tokens(len, spec.vocab as u32);
    let want = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
    for (target, backend) in every_target_and_backend() {
        let m = FamModel::compile_for(&ck, p, target, backend, &RunOptions::default()).unwrap();
        let got = m.run(&ids).unwrap().mapv(f64::from);
        assert_eq!(got.dim(), want.dim());
        let diff = max_abs_diff(got.iter(), want.iter());
        assert!(
            diff < 1e-4,
            "{target} {backend:?} {spec:?} {p:?}: max abs diff {diff}"
        );
    }
}

#[test]
fn fam_with_memory_gqa() {
    // 6 full blocks and a shorter seventh
    check_case(
        Spec {
            fam_init_rows: Some(3),
            ..Spec::default()
        },
        params(4, 3, 2),
        27,
    );
}

#[test]
fn fam_without_memory_mqa_biases() {
    check_case(
        Spec {
            kv_heads: 1,
            qkv_bias: true,
            fam_init_rows: Some(2),
            seed: 21,
            ..Spec::default()
        },
        params(5, 2, 0),
        33,
    );
}

#[test]
fn bswa_with_memory_tied_embeddings() {
    check_case(
        Spec {
            tie: true,
            seed: 5,
            layers: 3,
            ..Spec::default()
        },
        params(3, 0, 1),
        20,
    );
}

#[test]
fn bswa_without_memory_and_zero_prompt_fam() {
    check_case(
        Spec {
            seed: 8,
            ..Spec::default()
        },
        params(4, 0, 0),
        26,
    );
    // F > 0 with no learned prompt: zeros, as FAM-SPEC says
    check_case(
        Spec {
            seed: 9,
            kv_heads: 4,
            ..Spec::default()
        },
        params(3, 2, 3),
        20,
    );
}

#[test]
fn hugging_face_fixture_on_every_backend() {
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let ids = hf_tiny_ids();
    let hf = hf_tiny_logits();
    for (target, backend) in every_target_and_backend() {
        for l in [16usize, 33] {
            let p = params(l, 0, ids.len().div_ceil(l));
            let got = FamModel::compile_for(&ck, p, target, backend, &RunOptions::default())
                .unwrap()
                .run(&ids)
                .unwrap();
            let diff = max_abs_diff_f32(got.iter(), hf.iter());
            assert!(diff < 1e-4, "{target} {backend:?} L={l}: {diff}");
        }
    }
}

#[test]
fn batch_streams_at_different_blocks_match_each_alone() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (_tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = params(3, 2, 1);
    let r = Reference::new(&ck, p).unwrap();
    let a = Rng::new(1).tokens(9, 40);
    let b = Rng::new(2).tokens(3, 40);
    let m = FamModel::compile(&ck, p, BackendKind::Tract, &RunOptions::default()).unwrap();
    let mut sa = m.new_state();
    for chunk in a[..6].chunks(3) {
        m.step(std::slice::from_mut(&mut sa), &[chunk]).unwrap();
    }
    // stream a is at block 2, stream b at block 0
    let mut batch = vec![sa, m.new_state()];
    let out = m.step(&mut batch, &[&a[6..], &b]).unwrap();
    let want_a = r.forward(&a).unwrap();
    let want_b = r.forward(&b).unwrap();
    let da = max_abs_diff(
        out[0].mapv(f64::from).iter(),
        want_a.slice(ndarray::s![6.., ..]).iter(),
    );
    let db = max_abs_diff(out[1].mapv(f64::from).iter(), want_b.iter());
    assert!(da < 1e-4 && db < 1e-4, "{da} {db}");
    assert_eq!((batch[0].block_index(), batch[1].block_index()), (3, 1));
}

#[test]
fn graph_state_equals_reference_state() {
    let spec = Spec {
        fam_init_rows: Some(2),
        seed: 4,
        ..Spec::default()
    };
    let (_tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = params(3, 2, 2);
    let r = Reference::new(&ck, p).unwrap();
    let ids = Rng::new(3).tokens(6, 40);
    let mut rs = r.initial_state();
    for chunk in ids.chunks(3) {
        rs = r.step(&rs, chunk).unwrap().next.unwrap();
    }
    for backend in backends() {
        let m = FamModel::compile(&ck, p, backend, &RunOptions::default()).unwrap();
        let mut gs = [m.new_state()];
        for chunk in ids.chunks(3) {
            m.step(&mut gs, &[chunk]).unwrap();
        }
        // the state stayed in the backend's own values between blocks
        let want_location = match backend {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort cpu",
        };
        assert_eq!(gs[0].location(), want_location);
        let manifest = m.manifest().clone();
        for (st, value) in manifest.state.iter().zip(gs[0].to_host().unwrap()) {
            let want = match st.kind.name() {
                "fam" => rs.fam[st.layer].clone().into_dyn(),
                "mem_k" => rs.padded_mem_k(st.layer, p.mem_len()).into_dyn(),
                _ => rs.padded_mem_v(st.layer, p.mem_len()).into_dyn(),
            };
            let diff = max_abs_diff(value.mapv(f64::from).iter(), want.iter());
            assert!(diff < 1e-4, "{backend} {}: {diff}", st.input);
        }
    }
}

#[test]
fn emission_is_deterministic() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (_tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    for target in Target::ALL {
        let a = export::compile(&ck, params(4, 2, 1), export::WeightDtype::F32, target).unwrap();
        let b = export::compile(&ck, params(4, 2, 1), export::WeightDtype::F32, target).unwrap();
        assert_eq!(
            famc::builder::encode_model(&a.block),
            famc::builder::encode_model(&b.block)
        );
        assert_eq!(
            famc::builder::encode_model(a.init.as_ref().unwrap()),
            famc::builder::encode_model(b.init.as_ref().unwrap())
        );
    }
    let t = tempfile::tempdir().unwrap();
    export::export(
        &ck,
        params(4, 2, 1),
        &t.path().join("x"),
        &ExportOptions::default(),
    )
    .unwrap();
    export::export(
        &ck,
        params(4, 2, 1),
        &t.path().join("y"),
        &ExportOptions::default(),
    )
    .unwrap();
    for f in ["block.onnx", "init.onnx", "famc.json"] {
        assert_eq!(
            std::fs::read(t.path().join("x").join(f)).unwrap(),
            std::fs::read(t.path().join("y").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn external_data_exports_and_runs() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let p = params(4, 2, 1);
    let out = tmp.path().join("export");
    export::export(
        &ck,
        p,
        &out,
        &ExportOptions {
            external_threshold: 256,
            ..ExportOptions::default()
        },
    )
    .unwrap();
    assert!(out.join(export::WEIGHTS_FILE).exists());
    for g in ["block", "init", "decode", "fam_kv"] {
        assert!(!out.join(format!("{g}.onnx.data")).exists());
    }
    let report = famc::inspect::inspect(&out).unwrap();
    assert!(report.graphs[0].external_weight_bytes > 0);
    let ids = Rng::new(4).tokens(13, 40);
    let want = Reference::new(&ck, p).unwrap().forward(&ids).unwrap();
    for backend in backends() {
        let got = FamModel::open(&out, backend, &RunOptions::default())
            .unwrap()
            .run(&ids)
            .unwrap();
        let diff = max_abs_diff(got.mapv(f64::from).iter(), want.iter());
        assert!(diff < 1e-4, "{backend:?}: {diff}");
    }
}

#[test]
fn broken_exports_are_refused_clearly() {
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let (tmp, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    let out = tmp.path().join("export");
    let p = params(4, 2, 1);
    export::export(&ck, p, &out, &ExportOptions::default()).unwrap();
    let open_err =
        |d: &std::path::Path| match FamModel::open(d, BackendKind::Tract, &RunOptions::default()) {
            Ok(_) => panic!("opened a broken export"),
            Err(e) => e.to_string(),
        };

    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&out).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let d = copy("missing");
    std::fs::remove_file(d.join("block.onnx")).unwrap();
    let e = open_err(&d);
    assert!(e.contains("block.onnx"), "{e}");

    let d = copy("corrupt");
    std::fs::write(d.join("block.onnx"), b"\x08\x07not a protobuf at all").unwrap();
    let e = open_err(&d);
    assert!(e.contains("block.onnx"), "{e}");

    let d = copy("disagree");
    let mpath = d.join("famc.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["fam"]["mem_blocks"] = 3.into();
    m["state"][1]["shape"] = serde_json::json!([2, 12, 4]);
    std::fs::write(&mpath, m.to_string()).unwrap();
    let e = open_err(&d);
    assert!(e.contains("mem_k.0") && e.contains("famc.json"), "{e}");

    let d = copy("version");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("famc.json")).unwrap()).unwrap();
    m["format_version"] = 99.into();
    std::fs::write(d.join("famc.json"), m.to_string()).unwrap();
    assert!(open_err(&d).contains("format_version 99"));

    // famc.json's contract is checked against every graph and against its state list
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = copy(name);
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("famc.json")).unwrap()).unwrap();
        f(&mut m);
        std::fs::write(d.join("famc.json"), m.to_string()).unwrap();
        open_err(&d)
    };
    let e = edit("swapped-roles", &|m| {
        let inputs = m["contract"]["decode"]["inputs"].as_array_mut().unwrap();
        let (a, b) = (inputs[2]["name"].clone(), inputs[3]["name"].clone());
        inputs[2]["name"] = b;
        inputs[3]["name"] = a;
    });
    assert!(
        e.contains("decode.onnx") && e.contains("contract") && e.contains("fam_k.0"),
        "{e}"
    );
    let e = edit("cache-shape", &|m| {
        let inputs = m["contract"]["decode"]["inputs"].as_array_mut().unwrap();
        let cache = inputs
            .iter_mut()
            .find(|io| io["role"] == "cache_k")
            .unwrap();
        cache["shape"][2] = 99.into();
    });
    assert!(e.contains("cache_k.0") && e.contains("99"), "{e}");
    let e = edit("state-role", &|m| {
        m["contract"]["block"]["inputs"][2]["role"] = "mem_v".into();
    });
    assert!(e.contains("state `fam.0`") && e.contains("contract"), "{e}");
    let e = edit("no-fam-kv-contract", &|m| {
        m["contract"].as_object_mut().unwrap().remove("fam_kv");
    });
    assert!(
        e.contains("fam_kv") && e.contains("lacks a contract"),
        "{e}"
    );
    let e = edit("unknown-role", &|m| {
        m["contract"]["decode"]["inputs"][1]["role"] = "timestamp".into();
    });
    assert!(e.contains("famc.json") && e.contains("timestamp"), "{e}");

    let d = copy("noinit");
    std::fs::remove_file(d.join("init.onnx")).unwrap();
    assert!(open_err(&d).contains("init.onnx"));

    let e = open_err(&tmp.path().join("nothing-here"));
    assert!(e.contains("famc.json"), "{e}");
}

#[test]
fn tract_refuses_the_ort_target_with_the_reason() {
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let refused = FamModel::compile_for(
        &ck,
        params(16, 0, 1),
        Target::Ort,
        BackendKind::Tract,
        &RunOptions::default(),
    );
    let err = refused
        .err()
        .expect("tract cannot run the ort target")
        .to_string();
    for part in [
        "target `ort`",
        "SkipSimplifiedLayerNormalization",
        "--target opset23",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}
