//! `famc doctor`: the backends report, with ONNX Runtime present and missing.
//!
//! The "present" cases need an ONNX Runtime library (ORT_DYLIB_PATH, or found the way
//! `--backend ort` finds it); without one they are skipped with a note, unless
//! `FAMC_REQUIRE_ORT=1` makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use famc::doctor::{ORT_CRATE_VERSION, TRACT_VERSION};
use famc::runtime::ort::{find_ort_library, OrtLibrary};
use serde_json::Value;

const MISSING: &str = "/nonexistent/famc-doctor/libonnxruntime.so.1.31.1";

fn doctor(ort_dylib_path: &Path, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_famc"));
    cmd.arg("doctor");
    if json {
        cmd.arg("--json");
    }
    cmd.env("ORT_DYLIB_PATH", ort_dylib_path).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn check_success(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "famc doctor failed: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    stdout(o)
}

/// The real library, or `None` (with a note) when there is none and none is required.
fn real_library(test: &str) -> Option<OrtLibrary> {
    match find_ort_library() {
        Ok(lib) => Some(lib),
        Err(e) => {
            if std::env::var_os("FAMC_REQUIRE_ORT").is_some_and(|v| !v.is_empty() && v != "0") {
                panic!("{test}: ONNX Runtime required (FAMC_REQUIRE_ORT) but unavailable: {e}");
            }
            eprintln!("note: skipping {test}: no ONNX Runtime library: {e}");
            None
        }
    }
}

fn lock_version(package: &str) -> String {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))
        .expect("Cargo.lock");
    let mut versions = Vec::new();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            let v = lines.next().unwrap().trim();
            let v = v
                .strip_prefix("version = \"")
                .unwrap()
                .trim_end_matches('"');
            versions.push(v.to_string());
        }
    }
    assert_eq!(
        versions.len(),
        1,
        "{package} in Cargo.lock: {versions:?} (one version expected)"
    );
    versions.pop().unwrap()
}

#[test]
fn built_in_versions_match_cargo_lock() {
    assert_eq!(
        TRACT_VERSION,
        lock_version("tract-onnx"),
        "update famc::doctor::TRACT_VERSION to Cargo.lock's tract-onnx"
    );
    assert_eq!(
        ORT_CRATE_VERSION,
        lock_version("ort"),
        "update famc::doctor::ORT_CRATE_VERSION to Cargo.lock's ort"
    );
}

#[test]
fn doctor_with_onnx_runtime_names_backends_version_and_providers() {
    let Some(lib) = real_library("doctor_with_onnx_runtime_names_backends_version_and_providers")
    else {
        return;
    };
    let out = check_success(&doctor(&lib.path, false));
    assert!(out.contains("backend tract: available"), "{out}");
    assert!(
        out.contains(&format!("tract-onnx {TRACT_VERSION}")),
        "{out}"
    );
    assert!(
        out.contains("backend ort (ONNX Runtime): available"),
        "{out}"
    );
    assert!(out.contains(&format!("version: {}", lib.version)), "{out}");
    if lib.path.to_string_lossy().ends_with("1.31.1") {
        assert!(out.contains("version: 1.31.1"), "{out}");
    }
    assert!(
        out.contains(&format!("library: {}", lib.path.display())),
        "{out}"
    );
    assert!(out.contains("found via: ORT_DYLIB_PATH"), "{out}");
    let providers = out
        .lines()
        .find(|l| l.contains("execution providers in the library:"))
        .unwrap_or_else(|| panic!("no provider line in {out}"));
    assert!(providers.contains("CPUExecutionProvider"), "{out}");
    assert!(!out.contains("problem:"), "{out}");
}

#[test]
fn doctor_json_with_onnx_runtime() {
    let Some(lib) = real_library("doctor_json_with_onnx_runtime") else {
        return;
    };
    let out = check_success(&doctor(&lib.path, true));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["tract"]["available"], true);
    assert_eq!(v["tract"]["version"], TRACT_VERSION);
    assert_eq!(v["ort"]["available"], true);
    assert_eq!(v["ort"]["version"], lib.version.as_str());
    assert_eq!(
        PathBuf::from(v["ort"]["library"].as_str().unwrap()),
        lib.path
    );
    assert_eq!(v["ort"]["found_via"], "ORT_DYLIB_PATH");
    assert_eq!(v["ort"]["min_version"], "1.31");
    let eps: Vec<&str> = v["ort"]["execution_providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(eps.contains(&"CPUExecutionProvider"), "{eps:?}");
    assert_eq!(v["ort"]["session_provider"], "CPUExecutionProvider");
    assert!(
        v["ort"]["error"].is_null() && v["ort"]["fix"].is_null(),
        "{out}"
    );
    let features: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features.contains(&"cuda"), cfg!(feature = "cuda"));
    assert_eq!(features.contains(&"tensorrt"), cfg!(feature = "tensorrt"));
}

#[test]
fn doctor_without_onnx_runtime_succeeds_and_says_how_to_fix() {
    let out = check_success(&doctor(Path::new(MISSING), false));
    assert!(out.contains("backend tract: available"), "{out}");
    assert!(
        out.contains("backend ort (ONNX Runtime): not available"),
        "{out}"
    );
    assert!(out.contains(&format!("ORT_DYLIB_PATH: {MISSING}")), "{out}");
    assert!(out.contains("no such file"), "{out}");
    assert!(out.contains("to fix:"), "{out}");
    assert!(out.contains("pip install onnxruntime==1.31.1"), "{out}");
    assert!(!out.contains("execution providers in the library"), "{out}");
}

#[test]
fn doctor_json_without_onnx_runtime() {
    let out = check_success(&doctor(Path::new(MISSING), true));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["tract"]["available"], true);
    assert_eq!(v["ort"]["available"], false);
    assert_eq!(v["ort"]["dylib_env"], MISSING);
    assert!(v["ort"]["library"].is_null() && v["ort"]["version"].is_null());
    assert_eq!(v["ort"]["execution_providers"], serde_json::json!([]));
    let error = v["ort"]["error"].as_str().unwrap();
    assert!(
        error.contains("no such file") && error.contains(MISSING),
        "{error}"
    );
    let fix = v["ort"]["fix"].as_str().unwrap();
    assert!(fix.contains("pip install onnxruntime==1.31.1"), "{fix}");
}
