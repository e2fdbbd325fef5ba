//! The `famc` binary: the main job end to end, and clear errors with a non-zero exit.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn read_npy(p: &Path) -> ndarray::Array2<f32> {
    use ndarray_npy::ReadNpyExt;
    ndarray::Array2::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap()
}

#[test]
fn run_reference_matches_hugging_face() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.npy");
    let dir = hf_tiny_dir();
    let o = famc(&[
        "run",
        dir.to_str().unwrap(),
        "--backend",
        "reference",
        "--block-len",
        "16",
        "--fam-len",
        "0",
        "--mem-blocks",
        "7",
        "--tokens",
        dir.join("ids.txt").to_str().unwrap(),
        "--logits-out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = read_npy(&out);
    let hf = hf_tiny_logits();
    assert_eq!(ours.dim(), hf.dim());
    let diff = max_abs_diff_f32(ours.iter(), hf.iter());
    assert!(diff < 1e-4, "{diff}");
    // no temporary file left beside the output
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn bad_inputs_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_tiny_dir();
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("o.npy");
    let o_s = out.to_str().unwrap();
    let ids = tmp.path().join("ids.txt");
    let ids_s = ids.to_str().unwrap();

    std::fs::write(&ids, "  \n").unwrap();
    assert_clean_failure(
        &famc(&[
            "run",
            d,
            "--tokens",
            ids_s,
            "--logits-out",
            o_s,
            "--fam-len",
            "0",
        ]),
        "no token ids",
    );

    std::fs::write(&ids, "1 2 3 256 4").unwrap();
    assert_clean_failure(
        &famc(&["run", d, "--tokens", ids_s, "--logits-out", o_s]),
        "token 3: id 256 is out of range (vocab_size 256)",
    );

    std::fs::write(&ids, "1 2 x").unwrap();
    assert_clean_failure(
        &famc(&["run", d, "--tokens", ids_s, "--logits-out", o_s]),
        "token 2: `x`",
    );

    std::fs::write(&ids, "1 2 3").unwrap();
    assert_clean_failure(
        &famc(&[
            "run",
            d,
            "--tokens",
            ids_s,
            "--logits-out",
            o_s,
            "--block-len",
            "0",
        ]),
        "block length L must be at least 1",
    );
    assert_clean_failure(
        &famc(&[
            "run",
            d,
            "--tokens",
            "/nonexistent/ids.txt",
            "--logits-out",
            o_s,
        ]),
        "/nonexistent/ids.txt",
    );
    assert_clean_failure(
        &famc(&[
            "run",
            "/nonexistent/ckpt",
            "--tokens",
            ids_s,
            "--logits-out",
            o_s,
        ]),
        "/nonexistent/ckpt",
    );
    // an output that cannot be written: its directory does not exist, or it is a directory
    assert_clean_failure(
        &famc(&[
            "run",
            d,
            "--tokens",
            ids_s,
            "--logits-out",
            "/nonexistent/dir/o.npy",
        ]),
        "cannot write /nonexistent/dir/o.npy",
    );
    assert_clean_failure(
        &famc(&[
            "run",
            d,
            "--tokens",
            ids_s,
            "--logits-out",
            tmp.path().to_str().unwrap(),
        ]),
        "is a directory",
    );
    assert!(!out.exists());
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ids.txt")]);
}

#[test]
fn an_existing_output_survives_a_failed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.npy");
    std::fs::write(&out, b"precious").unwrap();
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 999").unwrap();
    let d = hf_tiny_dir();
    let o = famc(&[
        "run",
        d.to_str().unwrap(),
        "--tokens",
        ids.to_str().unwrap(),
        "--logits-out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "999");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn export_inspect_and_run_on_each_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec {
        fam_init_rows: Some(2),
        ..Spec::default()
    };
    let ck = tmp.path().join("ckpt");
    write_checkpoint(&ck, &spec);
    let out = tmp.path().join("export");
    let ids = tmp.path().join("ids.txt");
    std::fs::write(
        &ids,
        Rng::new(3)
            .tokens(14, 40)
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = famc(&[
        "export",
        &s(&ck),
        "--block-len",
        "4",
        "--mem-blocks",
        "1",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["block.onnx", "init.onnx", "famc.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let o = famc(&["inspect", &s(&out)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("FAM: L = 4, F = 2, M = 1"),
        "{text}"
    );
    assert!(text.contains("next_fam.0 f32 [batch, 2, 16]"), "{text}");
    // every graph of the export, the decode, FAM-kv and score graphs too
    for want in [
        "new_k.0 f32",
        "fam_k.0 f32",
        "target_logprob f32 [batch, T]",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    let reference = tmp.path().join("ref.npy");
    let o = famc(&[
        "run",
        &s(&ck),
        "--backend",
        "reference",
        "--block-len",
        "4",
        "--mem-blocks",
        "1",
        "--tokens",
        &s(&ids),
        "--logits-out",
        &s(&reference),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = read_npy(&reference);
    let mut backends = vec!["tract"];
    if famc::runtime::ort::find_ort_library().is_ok() {
        backends.push("ort");
    }
    for backend in backends {
        let got_path = tmp.path().join(format!("{backend}.npy"));
        let o = famc(&[
            "run",
            &s(&out),
            "--backend",
            backend,
            "--tokens",
            &s(&ids),
            "--logits-out",
            &s(&got_path),
        ]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        let got = read_npy(&got_path);
        let diff = max_abs_diff_f32(got.iter(), want.iter());
        assert!(diff < 1e-4, "{backend}: {diff}");
    }
    // an export's FAM parameters are fixed
    let o = famc(&[
        "run",
        &s(&out),
        "--block-len",
        "8",
        "--tokens",
        &s(&ids),
        "--logits-out",
        &s(&reference),
    ]);
    assert_clean_failure(&o, "--block-len 8 disagrees with the export's 4");
    // a checkpoint with a learned prompt fixes F
    let o = famc(&["export", &s(&ck), "--fam-len", "3", "--out", &s(&out)]);
    assert_clean_failure(&o, "model.fam_init` has 2 rows");
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3").unwrap();
    let d = hf_tiny_dir();
    let run_with = |dylib: &Path| {
        Command::new(env!("CARGO_BIN_EXE_famc"))
            .env("ORT_DYLIB_PATH", dylib)
            .args([
                "run",
                d.to_str().unwrap(),
                "--backend",
                "ort",
                "--fam-len",
                "0",
            ])
            .args(["--tokens", ids.to_str().unwrap()])
            .args(["--logits-out", tmp.path().join("o.npy").to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = run_with(Path::new("/nonexistent/libonnxruntime.so"));
    assert_clean_failure(&o, "/nonexistent/libonnxruntime.so");
    assert!(stderr(&o).contains("ORT_DYLIB_PATH"), "{}", stderr(&o));

    // a file that is not ONNX Runtime
    let fake = tmp.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a library").unwrap();
    let o = run_with(&fake);
    assert_clean_failure(&o, "libonnxruntime.so.1.31.1");
}

#[test]
fn inspect_rejects_what_is_not_a_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let o = famc(&["inspect", tmp.path().to_str().unwrap()]);
    assert_clean_failure(&o, "not a famc export");
    let f = tmp.path().join("x.onnx");
    std::fs::write(&f, b"\xff\xff garbage").unwrap();
    assert_clean_failure(
        &famc(&["inspect", f.to_str().unwrap()]),
        "not an ONNX model",
    );
}
