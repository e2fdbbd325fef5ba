//! `famc doctor`: which backends and execution providers this build and this machine offer.
//!
//! [`doctor`] never fails: a missing or unusable ONNX Runtime is part of the report, with what
//! was tried and how to fix it.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::runtime::ep::{self, EpKind};
use crate::runtime::ort::{self as ort_rt, ORT_DYLIB_ENV, ORT_MIN_VERSION};
use crate::Error;

/// The `tract-onnx` version famc is built against. Cargo gives no `env!` for a dependency's
/// version, so it is written here; `tests/doctor.rs` checks it against `Cargo.lock`.
pub const TRACT_VERSION: &str = "0.23.9";

/// The `ort` crate version famc is built against (pinned with `=` in `Cargo.toml`; checked by
/// `tests/doctor.rs` against `Cargo.lock`).
pub const ORT_CRATE_VERSION: &str = "2.0.0-rc.15";

/// The execution provider famc's ONNX Runtime sessions run on by default (`--ep cpu`); `--ep
/// cuda|tensorrt` registers a GPU provider instead (see [`GpuProviderReport`]).
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
    /// The provider famc's sessions use by default (`--ep cpu`).
    pub session_provider: String,
    /// The GPU providers `--ep` can ask for: whether the library offers them and famc was built
    /// for them.
    pub gpu_providers: Vec<GpuProviderReport>,
    /// Why ONNX Runtime is not available (or why a query failed), when it is not.
    pub error: Option<String>,
    /// How to fix it, when it is not available.
    pub fix: Option<String>,
}

/// A GPU execution provider (`--ep cuda`, `--ep tensorrt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProviderReport {
    /// The `--ep` value: `cuda` or `tensorrt`.
    pub ep: String,
    /// ONNX Runtime's names of the providers it registers, in order (TensorRT runs what it
    /// does not take on CUDA).
    pub providers: Vec<String>,
    /// Whether the ONNX Runtime library offers all of them (`GetAvailableProviders`).
    pub in_library: bool,
    /// The cargo features famc needs for it.
    pub features: Vec<String>,
    /// Whether this famc was built with them.
    pub compiled: bool,
    /// Whether registering it on a session builder succeeded (its libraries load), when the
    /// library offers it and famc was built for it; `None` when not tried.
    pub registers: Option<bool>,
    /// What is missing or failed, and how to fix it.
    pub problem: Option<String>,
}

fn gpu_reports(offered: Option<&[String]>) -> Vec<GpuProviderReport> {
    [EpKind::Cuda, EpKind::TensorRt]
        .into_iter()
        .map(|kind| {
            let providers: Vec<String> = kind
                .required_providers()
                .iter()
                .map(|p| p.to_string())
                .collect();
            let in_library =
                offered.is_some_and(|o| providers.iter().all(|p| o.iter().any(|x| x == p)));
            let compiled = ep::compiled_with(kind);
            let mut report = GpuProviderReport {
                ep: kind.name().to_string(),
                providers,
                in_library,
                features: kind
                    .required_features()
                    .iter()
                    .map(|f| f.to_string())
                    .collect(),
                compiled,
                registers: None,
                problem: None,
            };
            if offered.is_none() {
                return report;
            }
            if !in_library {
                report.problem = Some(format!(
                    "this ONNX Runtime has no {}; to fix: {}",
                    kind.provider_name(),
                    ep::GPU_ORT_HINT
                ));
            } else if !compiled {
                report.problem = Some(format!(
                    "famc was built without the cargo feature(s) {}; to fix: rebuild with \
                     `cargo build --release --features {}`",
                    report.features.join(", "),
                    report.features.join(",")
                ));
            } else {
                match ort_rt::try_register(kind, false) {
                    Ok(()) => report.registers = Some(true),
                    Err(e) => {
                        report.registers = Some(false);
                        report.problem = Some(split_fix(&e).0);
                    }
                }
            }
            report
        })
        .collect()
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
        gpu_providers: gpu_reports(None),
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
        Ok(p) => {
            report.gpu_providers = gpu_reports(Some(&p));
            report.execution_providers = p;
        }
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
            writeln!(
                f,
                "  famc sessions use: {} (--ep cpu, the default)",
                o.session_provider
            )?;
            writeln!(f, "  GPU execution providers:")?;
            for g in &o.gpu_providers {
                let features = g
                    .features
                    .iter()
                    .map(|x| format!("`{x}`"))
                    .collect::<Vec<_>>()
                    .join(" + ");
                write!(
                    f,
                    "    --ep {:<8} ({}): in the library: {}; famc built with {features}: {}",
                    g.ep,
                    g.providers.join(" + "),
                    yes_no(g.in_library),
                    yes_no(g.compiled)
                )?;
                if let Some(r) = g.registers {
                    write!(f, "; registers: {}", yes_no(r))?;
                }
                writeln!(f)?;
                if let Some(p) = &g.problem {
                    writeln!(f, "      {}", p.replace('\n', "\n      "))?;
                }
            }
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
