//! Faults and hostile input against the `famc` binary: outputs are never destroyed, exports are
//! never mixed, sizes are bounded before anything is allocated, signals and closed pipes end the
//! process cleanly, and every error names what is wrong. Each test is one case of issue 15's list.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn famc_bin() -> &'static str {
    env!("CARGO_BIN_EXE_famc")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_ids() -> PathBuf {
    hf_tiny_dir().join("ids.txt")
}

/// `famc run` of the tiny checkpoint (compiled in memory) writing its logits to `out`.
fn run_tiny(out: &Path) -> Output {
    famc(&[
        "run",
        s(&hf_tiny_dir()),
        "--block-len",
        "16",
        "--fam-len",
        "4",
        "--mem-blocks",
        "2",
        "--tokens",
        s(&tiny_ids()),
        "--logits-out",
        s(out),
    ])
}

fn export_tiny(out: &Path, block_len: &str) -> Output {
    famc(&[
        "export",
        s(&hf_tiny_dir()),
        "--block-len",
        block_len,
        "--fam-len",
        "4",
        "--mem-blocks",
        "2",
        "--out",
        s(out),
    ])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Export temporaries (`.NAME.famc-tmp-*`) in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.contains("famc-tmp"))
        .collect()
}

fn file_type(p: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(p).unwrap().file_type()
}

// ---- 1. outputs are never destroyed ------------------------------------------------------------

#[test]
fn output_to_dev_null_leaves_the_device() {
    use std::os::unix::fs::FileTypeExt;
    let o = run_tiny(Path::new("/dev/null"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(file_type(Path::new("/dev/null")).is_char_device());
}

#[test]
fn output_to_a_fifo_is_written_into_it() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("logits.fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let o = run_tiny(&fifo);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = reader.join().unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY"), "{} bytes", bytes.len());
    assert!(file_type(&fifo).is_fifo());
    assert_eq!(entries(tmp.path()), ["logits.fifo"]);
}

#[test]
fn output_through_a_symlink_keeps_the_link_and_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real.npy");
    std::fs::write(&real, b"old").unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = tmp.path().join("link.npy");
    std::os::unix::fs::symlink("real.npy", &link).unwrap();
    let o = run_tiny(&link);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(file_type(&link).is_symlink());
    assert!(std::fs::read(&real).unwrap().starts_with(b"\x93NUMPY"));
    let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(entries(tmp.path()), ["link.npy", "real.npy"]);
}

#[test]
fn failed_score_leaves_an_existing_snapshot_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("e");
    assert!(export_tiny(&export, "16").status.success());
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let snap = tmp.path().join("s.state");
    std::fs::write(&snap, b"precious").unwrap();
    let o = famc(&[
        "score",
        s(&export),
        "--tokens",
        s(&empty),
        "--save-state",
        s(&snap),
    ]);
    assert_clean_failure(&o, "nothing to score");
    assert_eq!(std::fs::read(&snap).unwrap(), b"precious");
}

// ---- 2. exports are never mixed, never silently wrong --------------------------------------------

/// A checkpoint large enough that exporting it takes a while (random weights, 20M parameters).
fn slow_checkpoint(dir: &Path) {
    let spec = famc::bench::presets()
        .into_iter()
        .find(|p| p.name == "25m")
        .unwrap()
        .spec;
    famc::model::synthetic::write_checkpoint(dir, &spec).unwrap();
}

fn export_cmd(ck: &Path, out: &Path, block_len: &str) -> Command {
    let mut c = Command::new(famc_bin());
    c.args([
        "export",
        s(ck),
        "--block-len",
        block_len,
        "--fam-len",
        "8",
        "--mem-blocks",
        "1",
        "--out",
        s(out),
    ]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn block_len_of(export: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("famc.json")).unwrap()).unwrap();
    m["fam"]["block_len"].as_u64().unwrap()
}

fn verify(export: &Path) -> Output {
    famc(&["inspect", s(export), "--verify"])
}

/// Starts a re-export with L = 32 over an export with L = 16 and stops it with `signal` after
/// `after`; whenever that lands, the directory holds one whole export, old or new.
fn interrupted_export(signal: i32, after: Duration) -> (tempfile::TempDir, PathBuf, Output) {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    slow_checkpoint(&ck);
    let out = tmp.path().join("out");
    assert!(export_cmd(&ck, &out, "16")
        .output()
        .unwrap()
        .status
        .success());
    let child = export_cmd(&ck, &out, "32").spawn().unwrap();
    std::thread::sleep(after);
    unsafe { libc::kill(child.id() as i32, signal) };
    let o = child.wait_with_output().unwrap();
    let v = verify(&out);
    assert!(v.status.success(), "not one whole export: {}", stderr(&v));
    assert!(matches!(block_len_of(&out), 16 | 32));
    (tmp, out, o)
}

#[test]
fn sigterm_during_export_leaves_one_whole_export_and_no_temporaries() {
    for ms in [150, 600, 1500] {
        let (tmp, out, o) = interrupted_export(libc::SIGTERM, Duration::from_millis(ms));
        if !o.status.success() {
            assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
            assert!(
                stderr(&o).contains("interrupted by SIGTERM"),
                "{}",
                stderr(&o)
            );
        }
        if ms == 150 {
            // far too early for the new export to be complete: the old one is untouched
            assert_eq!(
                block_len_of(&out),
                16,
                "an interrupted export changed the old one"
            );
        }
        let left = temporaries(tmp.path());
        assert!(left.is_empty(), "temporaries left: {left:?}");
    }
}

#[test]
fn sigkill_during_export_leaves_one_whole_export_and_the_next_export_cleans_up() {
    let (tmp, out, _) = interrupted_export(libc::SIGKILL, Duration::from_millis(700));
    let ck = tmp.path().join("ck");
    assert!(export_cmd(&ck, &out, "16")
        .output()
        .unwrap()
        .status
        .success());
    assert_eq!(block_len_of(&out), 16);
    let left = temporaries(tmp.path());
    assert!(left.is_empty(), "stale temporaries kept: {left:?}");
}

#[test]
fn concurrent_export_into_one_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert!(export_tiny(&out, "16").status.success());
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tmp.path().join(".out.famc-lock"))
        .unwrap();
    lock.lock().unwrap();
    assert_clean_failure(&export_tiny(&out, "8"), "another famc export");
    drop(lock);
    assert_eq!(block_len_of(&out), 16);
    assert!(export_tiny(&out, "8").status.success());
    assert_eq!(block_len_of(&out), 8);
    assert!(!tmp.path().join(".out.famc-lock").exists());
}

#[test]
fn full_disk_during_export_leaves_the_old_export() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    slow_checkpoint(&ck);
    let out = tmp.path().join("out");
    assert!(export_cmd(&ck, &out, "16")
        .output()
        .unwrap()
        .status
        .success());
    // files may grow to 4 MB only (EFBIG past it, as a full disk gives ENOSPC)
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 8192; exec '{}' export '{}' --block-len 32 --fam-len 8 --mem-blocks 1 --out '{}'",
            famc_bin(),
            s(&ck),
            s(&out)
        ))
        .output()
        .unwrap();
    assert_clean_failure(&o, "File too large");
    assert_eq!(block_len_of(&out), 16);
    assert!(verify(&out).status.success());
    let left = temporaries(tmp.path());
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn run_export(export: &Path, out: &Path) -> Output {
    famc(&[
        "run",
        s(export),
        "--tokens",
        s(&tiny_ids()),
        "--logits-out",
        s(out),
    ])
}

#[test]
fn a_graph_from_another_export_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(export_tiny(&a, "16").status.success());
    assert!(export_tiny(&b, "8").status.success());
    let mixed = tmp.path().join("mixed");
    copy_dir(&a, &mixed);
    std::fs::copy(b.join("block.onnx"), mixed.join("block.onnx")).unwrap();
    let out = tmp.path().join("o.npy");
    assert_clean_failure(&run_export(&mixed, &out), "block.onnx");
    assert!(!out.exists());
}

#[test]
fn an_edited_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    assert!(export_tiny(&a, "16").status.success());
    let edits: [(&str, serde_json::Value, &str); 7] = [
        ("block_len", 8.into(), "fam.block_len"),
        ("mem_blocks", 1.into(), "fam.mem_blocks"),
        ("fam_len", 3.into(), "fam"),
        ("dtype", "f16".into(), "dtype"),
        ("checkpoint_sha256", "00".into(), "checkpoint_sha256"),
        ("target", "opset23".into(), "target opset23 with opset 17"),
        ("target", "opset99".into(), "opset99"),
    ];
    for (i, (field, value, needle)) in edits.into_iter().enumerate() {
        let d = tmp.path().join(format!("{i}-{field}"));
        copy_dir(&a, &d);
        let path = d.join("famc.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if m["fam"].get(field).is_some() {
            m["fam"][field] = value;
        } else {
            m[field] = value;
        }
        std::fs::write(&path, m.to_string()).unwrap();
        let o = run_export(&d, &tmp.path().join("o.npy"));
        assert_clean_failure(&o, needle);
    }
    // a damaged weight of the right size passes the cheap checks; --verify finds it
    let d = tmp.path().join("damaged");
    copy_dir(&a, &d);
    let block = d.join("block.onnx");
    let mut bytes = std::fs::read(&block).unwrap();
    let model = famc::builder::load_model(&block).unwrap();
    let raw = &model
        .graph
        .unwrap()
        .initializer
        .into_iter()
        .max_by_key(|t| t.raw_data.len())
        .unwrap()
        .raw_data;
    let at = bytes
        .windows(raw.len())
        .position(|w| w == raw.as_slice())
        .unwrap();
    bytes[at + raw.len() / 2] ^= 1;
    std::fs::write(&block, bytes).unwrap();
    assert_clean_failure(&verify(&d), "sha256");
    assert!(verify(&a).status.success());
}

fn checkpoint_with(spec: &Spec, edit: impl FnOnce(&mut Tensors)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    std::fs::create_dir_all(&dir).unwrap();
    let mut t = make_tensors(spec);
    edit(&mut t);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&config_json(spec)).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir, &t, DiskDtype::F32, 1);
    (tmp, dir)
}

#[test]
fn non_finite_weights_are_refused_at_export() {
    for bad in [f32::NAN, f32::INFINITY] {
        let (tmp, ck) = checkpoint_with(&Spec::default(), |t| {
            t.0.get_mut("model.layers.1.mlp.up_proj.weight").unwrap().1[5] = bad;
        });
        let o = famc(&[
            "export",
            s(&ck),
            "--block-len",
            "4",
            "--out",
            s(&tmp.path().join("e")),
        ]);
        assert_clean_failure(&o, "model.layers.1.mlp.up_proj.weight");
        assert!(!tmp.path().join("e").exists());
    }
}

#[test]
fn non_finite_logits_are_an_error() {
    // finite weights whose logits overflow float32
    let (tmp, ck) = checkpoint_with(&Spec::default(), |t| {
        for v in &mut t.0.get_mut("lm_head.weight").unwrap().1 {
            *v = 3e38;
        }
    });
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4 5 6 7 8 9").unwrap();
    for backend in ["tract", "ort"] {
        let o = famc(&[
            "score",
            s(&ck),
            "--backend",
            backend,
            "--block-len",
            "4",
            "--tokens",
            s(&ids),
        ]);
        assert_clean_failure(&o, "non-finite logit");
    }
}

// ---- 3. no panics ------------------------------------------------------------------------------

/// Runs `args` with standard output a pipe whose reader is gone before the child starts, so that
/// even a first, small write fails.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(famc_bin())
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn closed_stdout_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("e");
    assert!(export_tiny(&export, "16").status.success());
    let ids = s(&tiny_ids()).to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["doctor"],
        vec!["inspect", s(&export)],
        vec!["inspect", s(&export), "--json"],
        vec!["score", s(&export), "--tokens", &ids],
        vec![
            "eval",
            "passkey",
            "models/passkey-fam",
            "--samples",
            "2",
            "--distance-blocks",
            "1",
        ],
    ];
    for args in cases {
        let o = with_closed_stdout(&args);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!o.status.success(), "{args:?} succeeded on a closed pipe");
        assert_eq!(o.status.code(), Some(141), "{args:?}: {err}");
    }
}

#[test]
fn huge_fam_parameters_are_refused_before_anything_is_built() {
    let max = u64::MAX.to_string();
    for (flag, value) in [
        ("--mem-blocks", max.as_str()),
        ("--block-len", max.as_str()),
        ("--mem-blocks", "1000000000000"),
        ("--block-len", "1000000000"),
        ("--fam-len", "1000000000000"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let o = famc(&[
            "export",
            s(&hf_tiny_dir()),
            flag,
            value,
            "--out",
            s(&tmp.path().join("e")),
        ]);
        assert_clean_failure(&o, flag);
        assert!(start.elapsed() < Duration::from_secs(20));
    }
}

#[test]
fn huge_passkey_distances_are_refused() {
    for d in ["18446744073709551615", "2305843009213693952"] {
        let o = famc(&[
            "eval",
            "passkey",
            "models/passkey-fam",
            "--distance-blocks",
            d,
            "--samples",
            "1",
        ]);
        assert_clean_failure(&o, "--distance-blocks");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("recall"));
    }
}

#[test]
fn a_thread_pool_that_cannot_start_is_an_error() {
    // 1000 threads of 2 MiB stacks do not fit in 1.5 GiB of address space
    let out = tempfile::tempdir().unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1500000; exec '{}' run '{}' --block-len 16 --tokens '{}' --logits-out '{}' --threads 1000",
            famc_bin(),
            s(&hf_tiny_dir()),
            s(&tiny_ids()),
            s(&out.path().join("o.npy"))
        ))
        .output()
        .unwrap();
    assert_clean_failure(&o, "threads");
}

// ---- 4. refusals instead of crashes ------------------------------------------------------------

#[test]
fn absurd_layer_counts_are_refused_before_allocating() {
    for (layers, needle) in [
        (1_000_000_000usize, "num_hidden_layers"),
        (3, "layers end at 1"),
        (1, "has a layer 1"),
    ] {
        let spec = Spec::default();
        let (_tmp, ck) = checkpoint_with(&spec, |_| {});
        let mut c = config_json(&spec);
        c["num_hidden_layers"] = layers.into();
        std::fs::write(ck.join("config.json"), c.to_string()).unwrap();
        let out = ck.join("o.npy");
        let o = famc(&[
            "run",
            s(&ck),
            "--block-len",
            "4",
            "--tokens",
            s(&tiny_ids()),
            "--logits-out",
            s(&out),
        ]);
        assert_clean_failure(&o, needle);
    }
}

#[test]
fn too_many_threads_are_refused_at_once() {
    let start = Instant::now();
    let o = run_tiny_with(&["--threads", "100000"]);
    assert_clean_failure(&o, "--threads");
    assert!(start.elapsed() < Duration::from_secs(20));
}

fn run_tiny_with(extra: &[&str]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.npy");
    let (ck, ids) = (hf_tiny_dir(), tiny_ids());
    let mut args = vec![
        "run",
        s(&ck),
        "--block-len",
        "16",
        "--tokens",
        s(&ids),
        "--logits-out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    famc(&args)
}

#[test]
fn a_truncated_onnxruntime_library_is_an_error_not_sigbus() {
    let Ok(lib) = famc::runtime::ort::find_ort_library() else {
        assert!(std::env::var_os("FAMC_REQUIRE_ORT").is_none());
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&lib.path).unwrap();
    let cut = tmp.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("o.npy");
    let o = Command::new(famc_bin())
        .args([
            "run",
            s(&hf_tiny_dir()),
            "--backend",
            "ort",
            "--block-len",
            "16",
            "--tokens",
            s(&tiny_ids()),
            "--logits-out",
            s(&out),
        ])
        .env("ORT_DYLIB_PATH", &cut)
        .output()
        .unwrap();
    assert_clean_failure(&o, "truncated");
}

// ---- 5. loose ends -----------------------------------------------------------------------------

#[test]
fn sigint_during_an_in_memory_compile_removes_its_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    slow_checkpoint(&ck);
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3").unwrap();
    let out = tmp.path().join("o.npy");
    for (signal, ms, code) in [(libc::SIGINT, 400, 130), (libc::SIGTERM, 1200, 143)] {
        let child = Command::new(famc_bin())
            .args([
                "run",
                s(&ck),
                "--block-len",
                "32",
                "--tokens",
                s(&ids),
                "--logits-out",
                s(&out),
            ])
            .env("TMPDIR", &scratch)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        unsafe { libc::kill(child.id() as i32, signal) };
        let o = child.wait_with_output().unwrap();
        if !o.status.success() {
            assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        }
        assert!(entries(&scratch).is_empty(), "{:?}", entries(&scratch));
        let beside: Vec<String> = entries(tmp.path())
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(beside.is_empty(), "{beside:?}");
    }
}

#[test]
fn paths_outside_the_directory_are_refused() {
    let spec = Spec {
        shards: 2,
        ..Spec::default()
    };
    let (_tmp, ck, _) = temp_checkpoint(&spec);
    let index = ck.join("model.safetensors.index.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    j["weight_map"]["model.norm.weight"] = "../outside.safetensors".into();
    std::fs::write(&index, j.to_string()).unwrap();
    assert_clean_failure(&run_tiny_like(&ck), "../outside.safetensors");

    let tmp = tempfile::tempdir().unwrap();
    let e = tmp.path().join("e");
    assert!(export_tiny(&e, "16").status.success());
    let path = e.join("famc.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["graphs"]["block"] = "../../etc/passwd".into();
    std::fs::write(&path, m.to_string()).unwrap();
    assert_clean_failure(
        &run_export(&e, &tmp.path().join("o.npy")),
        "../../etc/passwd",
    );
}

fn run_tiny_like(ck: &Path) -> Output {
    famc(&[
        "run",
        s(ck),
        "--block-len",
        "4",
        "--tokens",
        s(&tiny_ids()),
        "--logits-out",
        s(&ck.join("o.npy")),
    ])
}

#[test]
fn forged_snapshots_are_range_checked() {
    use famc::snapshot::Snapshot;
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("e");
    assert!(export_tiny(&export, "16").status.success());
    let manifest = famc::export::Manifest::read(&export).unwrap();
    let state: Vec<ndarray::ArrayD<f32>> = manifest
        .state
        .iter()
        .map(|st| ndarray::ArrayD::zeros(ndarray::IxDyn(&st.shape)))
        .collect();
    let good = Snapshot {
        block_index: 2,
        state,
        pending: vec![1, 2],
        nll_sum: 10.0,
        scored: 32,
        tokens_read: 34,
    };
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "3 4 5").unwrap();
    let resume = |snap: &Snapshot, name: &str| {
        let p = tmp.path().join(name);
        snap.save(&p, &manifest).unwrap();
        famc(&[
            "score",
            s(&export),
            "--tokens",
            s(&ids),
            "--resume-state",
            s(&p),
        ])
    };
    assert!(resume(&good, "good").status.success());
    let mut nan_state = good.clone();
    nan_state.state[0].as_slice_mut().unwrap()[0] = f32::NAN;
    let forged = [
        (
            Snapshot {
                block_index: usize::MAX,
                ..good.clone()
            },
            "block_index",
        ),
        (
            Snapshot {
                nll_sum: f64::NAN,
                ..good.clone()
            },
            "nll_sum",
        ),
        (
            Snapshot {
                nll_sum: -1.0,
                ..good.clone()
            },
            "nll_sum",
        ),
        (
            Snapshot {
                scored: 5,
                ..good.clone()
            },
            "inconsistent position",
        ),
        (nan_state, "non-finite"),
    ];
    for (i, (snap, needle)) in forged.iter().enumerate() {
        assert_clean_failure(&resume(snap, &format!("forged{i}")), needle);
    }
}

#[test]
fn messages_say_each_thing_once() {
    let tmp = tempfile::tempdir().unwrap();
    let o = famc(&[
        "run",
        s(&hf_tiny_dir()),
        "--block-len",
        "16",
        "--tokens",
        s(&tmp.path().join("missing.txt")),
        "--logits-out",
        s(&tmp.path().join("o.npy")),
    ]);
    assert_clean_failure(&o, "missing.txt");
    let err = stderr(&o);
    let cause = "No such file or directory";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
}

#[test]
fn a_missing_header_entry_is_named_as_such() {
    let (_tmp, ck) = checkpoint_with(&Spec::default(), |_| {});
    let path = ck.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // drop the entry whose data comes first after the embedding
    let obj = header.as_object_mut().unwrap();
    let (victim, _) = obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["data_offsets"][0].as_u64().unwrap()))
        .filter(|(_, start)| *start > 0)
        .min_by_key(|(_, start)| *start)
        .unwrap();
    obj.remove(&victim);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let o = run_tiny_like(&ck);
    assert_clean_failure(&o, "belong to no header entry");
}

#[test]
fn an_export_without_its_manifest_is_called_that() {
    let tmp = tempfile::tempdir().unwrap();
    let e = tmp.path().join("e");
    assert!(export_tiny(&e, "16").status.success());
    std::fs::remove_file(e.join("famc.json")).unwrap();
    let o = run_export(&e, &tmp.path().join("o.npy"));
    assert_clean_failure(&o, "famc.json");
    assert!(!stderr(&o).contains("no config.json\n"), "{}", stderr(&o));
}

#[test]
fn a_bad_token_is_reported_at_its_stream_position() {
    use famc::runtime::{BackendKind, RunOptions};
    let ck = famc::model::Checkpoint::load(&hf_tiny_dir()).unwrap();
    let p = famc::model::FamParams {
        block_len: 8,
        fam_len: 2,
        mem_blocks: 1,
    };
    let m = famc::session::FamModel::compile(&ck, p, BackendKind::Tract, &RunOptions::default())
        .unwrap();
    let mut ids = vec![1u32; 20];
    ids[19] = 999;
    let e = m.run(&ids).unwrap_err().to_string();
    assert!(e.contains("position 19"), "{e}");
}

#[test]
fn a_huge_token_is_not_echoed_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, format!("1 2 {} 3", "7".repeat(50 << 20))).unwrap();
    let e = tmp.path().join("e");
    assert!(export_tiny(&e, "16").status.success());
    for args in [
        vec!["score", s(&e), "--tokens", s(&ids)],
        vec![
            "run",
            s(&e),
            "--tokens",
            s(&ids),
            "--logits-out",
            s(&tmp.path().join("o.npy")),
        ],
    ] {
        let o = famc(&args);
        assert_clean_failure(&o, "token 2");
        assert!(
            stderr(&o).len() < 1000,
            "{} bytes of message",
            stderr(&o).len()
        );
    }
}
