//! Checkpoint loading: layouts, dtypes, ties, biases, RoPE fields and clear errors.

mod common;

use common::*;
use famc::model::{Checkpoint, FamDefaults, FamParams};
use famc::reference::Reference;

fn logits(dir: &std::path::Path, ids: &[u32]) -> ndarray::Array2<f64> {
    let ck = Checkpoint::load(dir).unwrap();
    let p = FamParams {
        block_len: 4,
        fam_len: 2,
        mem_blocks: 1,
    };
    Reference::new(&ck, p).unwrap().forward(ids).unwrap()
}

#[test]
fn reads_the_hugging_face_fixture() {
    let ck = Checkpoint::load(&hf_tiny_dir()).unwrap();
    let c = &ck.config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (32, 2, 4, 2, 8)
    );
    assert_eq!((c.vocab_size, c.intermediate_size), (256, 64));
    assert_eq!(c.rope_theta, 10000.0);
    assert!(ck.weights.lm_head.is_some());
    assert!(ck.weights.fam_init.is_none());
    assert_eq!(ck.hash.len(), 64);
}

#[test]
fn sharded_equals_single_file() {
    let ids = Rng::new(5).tokens(11, 40);
    let (_a, single, t1) = temp_checkpoint(&Spec::default());
    let (_b, sharded, t2) = temp_checkpoint(&Spec {
        shards: 3,
        ..Spec::default()
    });
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(sharded.join("model-00003-of-00003.safetensors").exists());
    assert_eq!(t1.0, t2.0);
    assert_eq!(logits(&single, &ids), logits(&sharded, &ids));
}

#[test]
fn half_precision_on_disk_is_converted_exactly() {
    for dtype in [DiskDtype::F16, DiskDtype::BF16] {
        let spec = Spec {
            dtype,
            ..Spec::default()
        };
        let (_t, dir, tensors) = temp_checkpoint(&spec);
        let ck = Checkpoint::load(&dir).unwrap();
        let q = &ck.weights.layers[1].attn.q_proj;
        let want = tensors.get("model.layers.1.self_attn.q_proj.weight");
        assert_eq!(q.as_slice().unwrap(), want, "{dtype:?}");
        // same values stored as f32 give the same logits
        let (_t2, dir32) = {
            let tmp = tempfile::tempdir().unwrap();
            let d = tmp.path().join("f32");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("config.json"),
                serde_json::to_string(&config_json(&spec)).unwrap(),
            )
            .unwrap();
            write_safetensors(&d, &tensors, DiskDtype::F32, 1);
            (tmp, d)
        };
        let ids = [1, 5, 9, 30, 2, 2, 7];
        assert_eq!(logits(&dir, &ids), logits(&dir32, &ids));
    }
}

#[test]
fn tied_embeddings_use_the_embedding_as_output() {
    let spec = Spec {
        tie: true,
        ..Spec::default()
    };
    let (_t, dir, tensors) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    assert!(ck.weights.lm_head.is_none());
    assert_eq!(
        ck.weights.output_weight().as_slice().unwrap(),
        tensors.get("model.embed_tokens.weight")
    );
}

#[test]
fn biases_are_loaded_and_change_the_result() {
    let with = Spec {
        qkv_bias: true,
        ..Spec::default()
    };
    let (_a, dir, tensors) = temp_checkpoint(&with);
    let ck = Checkpoint::load(&dir).unwrap();
    let b = ck.weights.layers[0].attn.k_bias.as_ref().unwrap();
    assert_eq!(
        b.as_slice().unwrap(),
        tensors.get("model.layers.0.self_attn.k_proj.bias")
    );
    assert!(ck.weights.layers[0].attn.o_bias.is_none());
    let (_b, plain, _) = temp_checkpoint(&Spec::default());
    let ids = [3, 4, 5];
    assert_ne!(logits(&dir, &ids), logits(&plain, &ids));
}

#[test]
fn rope_base_in_either_place() {
    let ids = Rng::new(9).tokens(9, 40);
    let (_a, top, _) = temp_checkpoint(&Spec {
        rope: RopeField::TopLevel,
        rope_theta: 500.0,
        ..Spec::default()
    });
    let (_b, params, _) = temp_checkpoint(&Spec {
        rope: RopeField::Parameters,
        rope_theta: 500.0,
        ..Spec::default()
    });
    let (_c, absent, _) = temp_checkpoint(&Spec {
        rope: RopeField::Absent,
        ..Spec::default()
    });
    let (_d, default, _) = temp_checkpoint(&Spec {
        rope: RopeField::TopLevel,
        rope_theta: 10000.0,
        ..Spec::default()
    });
    assert_eq!(Checkpoint::load(&top).unwrap().config.rope_theta, 500.0);
    assert_eq!(Checkpoint::load(&params).unwrap().config.rope_theta, 500.0);
    assert_eq!(
        Checkpoint::load(&absent).unwrap().config.rope_theta,
        10000.0
    );
    assert_eq!(logits(&top, &ids), logits(&params, &ids));
    assert_eq!(logits(&absent, &ids), logits(&default, &ids));
    assert_ne!(logits(&top, &ids), logits(&default, &ids));
}

#[test]
fn fam_prompt_and_fam_defaults() {
    let spec = Spec {
        fam_init_rows: Some(3),
        extra_config: vec![(
            "fam".into(),
            serde_json::json!({"block_len": 8, "mem_blocks": 2}),
        )],
        ..Spec::default()
    };
    let (_t, dir, _) = temp_checkpoint(&spec);
    let ck = Checkpoint::load(&dir).unwrap();
    assert_eq!(
        ck.weights.fam_init.as_ref().unwrap().dim(),
        (3, spec.hidden)
    );
    let p = ck.fam_params(FamDefaults::default()).unwrap();
    assert_eq!(
        p,
        FamParams {
            block_len: 8,
            fam_len: 3,
            mem_blocks: 2
        }
    );
    let p = ck
        .fam_params(FamDefaults {
            block_len: Some(5),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p.block_len, 5);
    let e = ck
        .fam_params(FamDefaults {
            fam_len: Some(4),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("model.fam_init") && e.to_string().contains("3 rows"),
        "{e}"
    );
    let e = ck
        .fam_params(FamDefaults {
            block_len: Some(0),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("block length"), "{e}");
}

fn load_err(dir: &std::path::Path) -> String {
    Checkpoint::load(dir).unwrap_err().to_string()
}

fn edit_config(
    dir: &std::path::Path,
    f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn bad_configs_are_named() {
    let (_t, dir, _) = temp_checkpoint(&Spec::default());
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_err(&dir).contains("no config.json"));

    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );

    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&config_json(&Spec::default())).unwrap(),
    )
    .unwrap();
    edit_config(&dir, |c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    assert!(load_err(&dir).contains("unsupported hidden_act `gelu`"));

    edit_config(&dir, |c| {
        c.insert("hidden_act".into(), "silu".into());
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unsupported RoPE scaling") && e.contains("llama3"),
        "{e}"
    );

    edit_config(&dir, |c| {
        c.remove("rope_parameters");
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "linear", "factor": 2.0}),
        );
    });
    assert!(load_err(&dir).contains("linear"));

    edit_config(&dir, |c| {
        c.remove("rope_scaling");
        c.remove("hidden_size");
    });
    assert!(load_err(&dir).contains("missing field `hidden_size`"));
}

#[test]
fn bad_tensors_are_named() {
    let (_t, dir, mut tensors) = temp_checkpoint(&Spec::default());
    // a missing tensor
    tensors.0.remove("model.layers.1.mlp.up_proj.weight");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_safetensors(&dir, &tensors, DiskDtype::F32, 1);
    let e = load_err(&dir);
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{e}"
    );

    // a wrong shape
    let (_t2, dir2, mut tensors2) = temp_checkpoint(&Spec::default());
    tensors2
        .0
        .insert("model.norm.weight".into(), (vec![15], vec![1.0; 15]));
    write_safetensors(&dir2, &tensors2, DiskDtype::F32, 1);
    let e = load_err(&dir2);
    assert!(
        e.contains("`model.norm.weight`") && e.contains("expected shape [16], found [15]"),
        "{e}"
    );

    // a truncated file
    let (_t3, dir3, _) = temp_checkpoint(&Spec::default());
    let p = dir3.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = load_err(&dir3);
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated"),
        "{e}"
    );

    // garbage
    std::fs::write(&p, b"garbage").unwrap();
    assert!(load_err(&dir3).contains("corrupt or truncated"));

    // an index naming a tensor its shard lacks
    let (_t4, dir4, _) = temp_checkpoint(&Spec {
        shards: 2,
        ..Spec::default()
    });
    let ip = dir4.join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ip).unwrap()).unwrap();
    idx["weight_map"]["model.extra"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&ip, idx.to_string()).unwrap();
    assert!(load_err(&dir4).contains("`model.extra`"));

    // not a directory
    assert!(load_err(&dir.join("nope")).contains("not a directory"));
}
