//! `famc doctor`: which backends and execution providers this build and this machine offer.
//!
//! [`doctor`] never fails: a missing or unusable ONNX Runtime is part of the report, with what
//! was tried and how to fix it.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::runtime::ort::{self as ort_rt, ORT_DYLIB_ENV, ORT_MIN_VERSION};
use crate::Error;

/// The `tract-onnx` version famc is built against. Cargo gives no `env!` for a dependency's
/// version, so it is written here; `tests/doctor.rs` checks it against `Cargo.lock`.
pub const TRACT_VERSION: &str = "0.23.9";

/// The `ort` crate version famc is built against (pinned with `=` in `Cargo.toml`; checked by
/// `tests/doctor.rs` against `Cargo.lock`).
pub const ORT_CRATE_VERSION: &str = "2.0.0-rc.15";

/// The execution provider every famc ONNX Runtime session runs on: famc registers no other.
pub const SESSION_PROVIDER: &str = "CPUExecutionProvider";

/// What `famc doctor` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoctorReport {
    /// famc's own version.
    pub famc_version: String,
    /// The cargo features famc was compiled with, among `cuda` and `tensorrt`.
    pub features: Vec<String>,
    /// CPUs this process may use (`std::thread::available_parallelism`).
    pub cpus: usize,
    pub tract: TractReport,
    pub ort: OrtReport,
}

/// The tract backend: compiled in, always available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TractReport {
    pub available: bool,
    /// The `tract-onnx` crate version.
    pub version: String,
    /// Whether tract can run on several threads (`--threads N`).
    pub multithread: bool,
}

/// The ONNX Runtime backend: a shared library found at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrtReport {
    /// Whether a usable library was found and initialised.
    pub available: bool,
    /// The `ort` crate version.
    pub crate_version: String,
    /// The oldest ONNX Runtime famc accepts, `major.minor`.
    pub min_version: String,
    /// `ORT_DYLIB_PATH` as set in the environment (`None`: unset).
    pub dylib_env: Option<String>,
    /// The library file, when found.
    pub library: Option<PathBuf>,
    /// How it was found: `ORT_DYLIB_PATH`, `python package (…)` or `system path`.
    pub found_via: Option<String>,
    /// Its version, as it reports it.
    pub version: Option<String>,
    /// Its build description (`GetBuildInfoString`).
    pub build_info: Option<String>,
    /// The execution providers the library was built with (`GetAvailableProviders`).
    pub execution_providers: Vec<String>,
    /// The provider famc's sessions use.
    pub session_provider: String,
    /// Why ONNX Runtime is not available (or why a query failed), when it is not.
    pub error: Option<String>,
    /// How to fix it, when it is not available.
    pub fix: Option<String>,
}

/// Checks the backends. Initialises ONNX Runtime when it can be found (as `--backend ort`
/// would), to ask it for its execution providers.
pub fn doctor() -> DoctorReport {
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda".to_string());
    }
    if cfg!(feature = "tensorrt") {
        features.push("tensorrt".to_string());
    }
    DoctorReport {
        famc_version: env!("CARGO_PKG_VERSION").to_string(),
        features,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        tract: TractReport {
            available: true,
            version: TRACT_VERSION.to_string(),
            multithread: true,
        },
        ort: ort_report(),
    }
}

fn ort_report() -> OrtReport {
    let (major, minor) = ORT_MIN_VERSION;
    let mut report = OrtReport {
        available: false,
        crate_version: ORT_CRATE_VERSION.to_string(),
        min_version: format!("{major}.{minor}"),
        dylib_env: std::env::var_os(ORT_DYLIB_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| v.to_string_lossy().into_owned()),
        library: None,
        found_via: None,
        version: None,
        build_info: None,
        execution_providers: Vec::new(),
        session_provider: SESSION_PROVIDER.to_string(),
        error: None,
        fix: None,
    };
    let library = match ort_rt::init_ort() {
        Ok(lib) => lib,
        Err(e) => {
            let (error, fix) = split_fix(&e);
            report.error = Some(error);
            report.fix = Some(fix);
            return report;
        }
    };
    report.available = true;
    report.library = Some(library.path.clone());
    report.found_via = Some(library.found_via.clone());
    report.version = Some(library.version.clone());
    report.build_info = ort_rt::build_info().ok();
    match ort_rt::available_providers() {
        Ok(p) => report.execution_providers = p,
        Err(e) => report.error = Some(split_fix(&e).0),
    }
    report
}

/// An error's message and its fix: the part after "To fix: " when it says one, else the hint.
fn split_fix(e: &Error) -> (String, String) {
    let message = match e {
        Error::Backend { message, .. } => message.clone(),
        other => other.to_string(),
    };
    match message.split_once("\nTo fix: ") {
        Some((what, fix)) => (
            what.trim_end_matches('.').to_string(),
            fix.trim_end_matches('.').to_string(),
        ),
        None => (message, ort_rt::FIX_HINT.to_string()),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "famc {}", self.famc_version)?;
        let has = |name: &str| yes_no(self.features.iter().any(|x| x == name));
        writeln!(
            f,
            "  compiled features: cuda {}, tensorrt {}",
            has("cuda"),
            has("tensorrt")
        )?;
        writeln!(f, "  CPUs: {}", self.cpus)?;
        writeln!(f)?;
        let t = &self.tract;
        writeln!(
            f,
            "backend tract: {} (tract-onnx {}, pure Rust, CPU)",
            if t.available {
                "available"
            } else {
                "not available"
            },
            t.version
        )?;
        writeln!(
            f,
            "  multithreading: {}",
            if t.multithread {
                "yes (--threads N; default 1)"
            } else {
                "no"
            }
        )?;
        writeln!(f)?;
        let o = &self.ort;
        writeln!(
            f,
            "backend ort (ONNX Runtime): {}",
            if o.available {
                "available"
            } else {
                "not available"
            }
        )?;
        writeln!(
            f,
            "  ort crate {}, needs ONNX Runtime {} or newer (within {}.x)",
            o.crate_version, o.min_version, ORT_MIN_VERSION.0
        )?;
        writeln!(
            f,
            "  {ORT_DYLIB_ENV}: {}",
            o.dylib_env.as_deref().unwrap_or("(unset)")
        )?;
        if let (Some(version), Some(path), Some(via)) = (&o.version, &o.library, &o.found_via) {
            writeln!(f, "  version: {version}")?;
            writeln!(f, "  library: {}", path.display())?;
            writeln!(f, "  found via: {via}")?;
            if let Some(info) = &o.build_info {
                writeln!(f, "  build: {info}")?;
            }
            writeln!(
                f,
                "  execution providers in the library: {}",
                if o.execution_providers.is_empty() {
                    "(none reported)".to_string()
                } else {
                    o.execution_providers.join(", ")
                }
            )?;
            writeln!(f, "  famc sessions use: {}", o.session_provider)?;
        }
        if let Some(error) = &o.error {
            writeln!(f, "  problem: {}", error.replace('\n', "\n    "))?;
        }
        if let Some(fix) = &o.fix {
            writeln!(f, "  to fix: {fix}")?;
        }
        Ok(())
    }
}
