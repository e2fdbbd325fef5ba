//! The ONNX Runtime backend, through the `ort` crate with its `load-dynamic` feature: the shared
//! library is found at run time ([`find_ort_library`]), its version checked (at least
//! [`ORT_MIN_VERSION`]) before `ort` touches it, and `ort` initialised from it once per process.
//!
//! Every run goes through an `IoBinding`: host inputs are copied in, values of earlier runs
//! ([`super::Value`]) are bound as they are, host outputs are copied out once as f32, and outputs
//! kept in the backend stay in ONNX Runtime's memory (the GPU's, for CUDA and TensorRT sessions),
//! written into a spent buffer of an earlier run when the caller gives one (double buffering).
//!
//! Sessions run on ONNX Runtime's CPU provider unless [`RunOptions::ep`] asks for CUDA or
//! TensorRT: then the providers of the [`ep::plan`] are registered, each failing loudly: a library
//! without the provider, a provider whose libraries do not load, or famc built without the cargo
//! feature is an error, never a quiet run on the CPU.

use std::ffi::{CStr, OsStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use ::ort::environment::Environment;
use ::ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ::ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ::ort::session::Session;
use ::ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};
use ndarray::{ArrayD, IxDyn};

use super::ep::{self, EpKind, EpPlan, GraphFacts, Versions};
use super::{
    backend_error, check_inputs, check_outputs, BackendKind, Dim, ElemType, GraphRunner, IoSpec,
    OrtOptLevel, OutputTo, RunOptions, Tensor, Value,
};
use crate::{Error, Result};

const KIND: BackendKind = BackendKind::Ort;

/// The oldest ONNX Runtime this build works with, (major, minor): `ort` 2.0.0-rc.15 built with
/// `api-31` asks the library for C API version 31.
pub const ORT_MIN_VERSION: (u32, u32) = (1, 31);

/// The environment variable naming the ONNX Runtime shared library (a file, or a directory
/// holding it).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// How to get a usable ONNX Runtime, as error messages (and `famc doctor`) say it.
pub const FIX_HINT: &str =
    "install ONNX Runtime 1.31 (`pip install onnxruntime==1.31.1`, in the active \
virtualenv or ./.venv) or set ORT_DYLIB_PATH to its libonnxruntime shared library \
(…/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1)";

/// An ONNX Runtime shared library that was found and probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtLibrary {
    /// The library file.
    pub path: PathBuf,
    /// Its version, as the library reports it (e.g. `1.31.1`).
    pub version: String,
    /// Where it was found: `ORT_DYLIB_PATH`, `python package (…)` or `system path`.
    pub found_via: String,
}

impl fmt::Display for OrtLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ONNX Runtime {} at {} (found via {})",
            self.version,
            self.path.display(),
            self.found_via
        )
    }
}

fn ort_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: KIND.name(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Finding and probing the library
// ---------------------------------------------------------------------------------------------

/// Finds a usable ONNX Runtime library (version at least [`ORT_MIN_VERSION`]), in this order:
///
/// 1. `ORT_DYLIB_PATH` when set (a file, or a directory holding `libonnxruntime.so*`); when it is
///    set, nothing else is searched: a bad value is an error;
/// 2. the Python `onnxruntime` package's `capi/` directory, asking `$VIRTUAL_ENV/bin/python`,
///    `./.venv/bin/python` and `python3` where the package lies;
/// 3. the directories of `LD_LIBRARY_PATH`, then `/usr/local/lib`, `/usr/lib`,
///    `/usr/lib/x86_64-linux-gnu`, `/usr/lib64`.
///
/// Probing loads the library briefly (without initialising ONNX Runtime) to ask its version.
pub fn find_ort_library() -> Result<OrtLibrary> {
    let env = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty());
    find_ort_library_with(env.as_deref())
}

/// [`find_ort_library`] with an explicit value for `ORT_DYLIB_PATH` (`None`: unset).
pub fn find_ort_library_with(dylib_path: Option<&OsStr>) -> Result<OrtLibrary> {
    if let Some(value) = dylib_path {
        return library_from_env_value(Path::new(value));
    }
    let mut rejected: Vec<(PathBuf, String)> = Vec::new();
    let mut searched: Vec<String> = Vec::new();
    let groups = [
        ("python package", python_candidates(&mut searched)),
        ("system path", system_candidates(&mut searched)),
    ];
    for (via, candidates) in groups {
        for (path, via_detail) in candidates {
            match probe(&path) {
                Ok(version) => match check_version(&version) {
                    Ok(()) => {
                        return Ok(OrtLibrary {
                            path,
                            version,
                            found_via: match via_detail {
                                Some(d) => format!("{via} ({d})"),
                                None => via.to_string(),
                            },
                        })
                    }
                    Err(why) => rejected.push((path, why)),
                },
                Err(why) => rejected.push((path, why)),
            }
        }
    }
    let mut msg = String::from("no usable ONNX Runtime library found");
    if rejected.is_empty() {
        msg.push_str(&format!(
            " (ORT_DYLIB_PATH is unset; searched: {})",
            searched.join(", ")
        ));
    } else {
        msg.push_str(" (ORT_DYLIB_PATH is unset); found but rejected:");
        for (p, why) in &rejected {
            msg.push_str(&format!("\n  {}: {why}", p.display()));
        }
        msg.push_str(&format!("\n  searched: {}", searched.join(", ")));
    }
    msg.push_str(&format!(".\nTo fix: {FIX_HINT}."));
    Err(ort_error(msg))
}

fn library_from_env_value(value: &Path) -> Result<OrtLibrary> {
    let fail = |what: String| {
        ort_error(format!(
            "ORT_DYLIB_PATH={}: {what}.\nTo fix: {FIX_HINT}, or unset ORT_DYLIB_PATH to search the \
             Python package and the system paths",
            value.display()
        ))
    };
    let path = if value.is_dir() {
        let found = library_files_in(value);
        match found.into_iter().next() {
            Some(p) => p,
            None => {
                return Err(fail(format!(
                    "the directory holds no {}onnxruntime{} file",
                    std::env::consts::DLL_PREFIX,
                    std::env::consts::DLL_SUFFIX
                )))
            }
        }
    } else if value.is_file() {
        value.to_path_buf()
    } else if value.exists() {
        return Err(fail("not a file".into()));
    } else {
        return Err(fail("no such file".into()));
    };
    // name the library file only when it is not the value itself (a file found in a directory)
    let at = |e: String| {
        if path == value {
            fail(e)
        } else {
            fail(format!("{}: {e}", path.display()))
        }
    };
    let version = probe(&path).map_err(&at)?;
    check_version(&version).map_err(&at)?;
    Ok(OrtLibrary {
        path,
        version,
        found_via: ORT_DYLIB_ENV.to_string(),
    })
}

/// Loads the shared library at `path` (without initialising ONNX Runtime), asks its version
/// through `OrtGetApiBase()->GetVersionString()`, and unloads it. When the library reports no
/// readable version, falls back to the version in its file name (`libonnxruntime.so.1.31.1`).
/// Errors when the file cannot be loaded or is not ONNX Runtime; the version is not checked (see
/// [`check_ort_version`]).
pub fn probe_ort_library(path: &Path) -> Result<String> {
    probe(path).map_err(|e| ort_error(format!("{}: {e}", path.display())))
}

/// Checks that an ONNX Runtime version string is at least [`ORT_MIN_VERSION`] (same major).
pub fn check_ort_version(version: &str) -> Result<()> {
    check_version(version).map_err(ort_error)
}

fn probe(path: &Path) -> std::result::Result<String, String> {
    if !path.is_file() {
        return Err(if path.exists() {
            "not a file"
        } else {
            "no such file"
        }
        .to_string());
    }
    let unloadable = |e: &dyn fmt::Display| {
        let by_name = version_from_file_name(path)
            .map(|v| format!(" (version {v} by its file name)"))
            .unwrap_or_default();
        format!("cannot load it as a shared library{by_name}: {e}")
    };
    #[cfg(target_os = "linux")]
    check_elf(path).map_err(|e| unloadable(&e))?;
    // SAFETY: loading a shared library runs its initialisers; ONNX Runtime's are benign, and a
    // file that is not a loadable library makes dlopen fail without running anything.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| unloadable(&e))?;
    // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release.
    let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ::ort::sys::OrtApiBase> =
        unsafe { lib.get(b"OrtGetApiBase\0") }.map_err(|_| {
            "it does not export `OrtGetApiBase`: not an ONNX Runtime library".to_string()
        })?;
    // SAFETY: `OrtGetApiBase` takes nothing, and returns a pointer to a static struct (or null).
    let base = unsafe { get_base() };
    let reported = if base.is_null() {
        None
    } else {
        // SAFETY: a non-null base points to a valid `OrtApiBase`, whose `GetVersionString` returns
        // a static NUL-terminated string (or null).
        let s = unsafe { ((*base).GetVersionString)() };
        if s.is_null() {
            None
        } else {
            unsafe { CStr::from_ptr(s) }
                .to_str()
                .ok()
                .map(str::to_string)
        }
    };
    drop(lib);
    reported
        .filter(|v| parse_version(v).is_some())
        .or_else(|| version_from_file_name(path))
        .ok_or_else(|| "it reports no readable version, nor does its file name".to_string())
}

/// The file must be an ELF shared object whose loadable segments and section table lie within
/// it: dlopen maps a truncated library without complaint, and the process then dies of SIGBUS
/// on the first touch of a page past the end of the file.
#[cfg(target_os = "linux")]
fn check_elf(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let damaged =
        |what: String| format!("not a usable shared library: {what} (truncated or damaged?)");
    let mut head = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut head)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err("not an ELF file, so not a shared library for this system".into());
    }
    let wide = match head[4] {
        1 => false,
        2 => true,
        c => return Err(damaged(format!("unknown ELF class {c}"))),
    };
    if head[5] != 1 {
        return Err("a big-endian ELF file: not a library for this system".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes")) as u64;
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    if u16_at(16) != 3 {
        return Err(format!(
            "an ELF file of type {}, not a shared object",
            u16_at(16)
        ));
    }
    let (phoff, phentsize, phnum, shoff, shentsize, shnum) = if wide {
        (
            u64_at(32),
            u16_at(54),
            u16_at(56),
            u64_at(40),
            u16_at(58),
            u16_at(60),
        )
    } else {
        (
            u32_at(28),
            u16_at(42),
            u16_at(44),
            u32_at(32),
            u16_at(46),
            u16_at(48),
        )
    };
    let end = |off: u64, size: u64| off.checked_add(size).filter(|&e| e <= len);
    let ph_end = end(phoff, phentsize * phnum).ok_or_else(|| {
        damaged(format!(
            "its program headers end past the file's {len} bytes"
        ))
    })?;
    if shnum > 0 && end(shoff, shentsize * shnum).is_none() {
        return Err(damaged(format!(
            "its section headers end past the file's {len} bytes"
        )));
    }
    if ph_end as usize > head.len() {
        return Err(damaged(
            "its program headers lie beyond the first MiB".into(),
        ));
    }
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        if u32_at(at) != 1 {
            continue; // only PT_LOAD segments are mapped
        }
        let (offset, filesz) = if wide {
            (u64_at(at + 8), u64_at(at + 32))
        } else {
            (u32_at(at + 4), u32_at(at + 16))
        };
        if end(offset, filesz).is_none() {
            return Err(damaged(format!(
                "segment {i} spans bytes {offset}..{} of a {len}-byte file",
                offset.saturating_add(filesz)
            )));
        }
    }
    Ok(())
}

fn check_version(version: &str) -> std::result::Result<(), String> {
    let (min_major, min_minor) = ORT_MIN_VERSION;
    match parse_version(version) {
        Some((major, minor, _)) if major == min_major && minor >= min_minor => Ok(()),
        Some(_) => Err(format!(
            "ONNX Runtime {version} is not supported: famc needs {min_major}.{min_minor} or newer \
             (within {min_major}.x)"
        )),
        None => Err(format!("unreadable ONNX Runtime version `{version}`")),
    }
}

/// Parses `major.minor[.patch][suffix]`.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts
        .next()
        .map(|p| {
            let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().unwrap_or(0)
        })
        .unwrap_or(0);
    Some((major, minor, patch))
}

/// The version in a library file name: `libonnxruntime.so.1.31.1` → `1.31.1`,
/// `libonnxruntime.1.31.1.dylib` → `1.31.1`.
fn version_from_file_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let rest = name.split_once("onnxruntime")?.1;
    let start = rest.find(|c: char| c.is_ascii_digit())?;
    let v: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = v.trim_end_matches('.').to_string();
    parse_version(&v).map(|_| v)
}

/// `libonnxruntime.so*` files in `dir` (not the provider libraries), the highest version first.
fn library_files_in(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}onnxruntime", std::env::consts::DLL_PREFIX);
    let suffix = std::env::consts::DLL_SUFFIX;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let Some(rest) = name.strip_prefix(&prefix) else {
                return false;
            };
            (rest.starts_with('.') || rest.is_empty()) && name.contains(suffix) && p.is_file()
        })
        .collect();
    found.sort_by_key(|p| {
        std::cmp::Reverse((
            version_from_file_name(p).and_then(|v| parse_version(&v)),
            p.clone(),
        ))
    });
    found
}

/// Candidate libraries from the Python `onnxruntime` package, each with the Python that told.
fn python_candidates(searched: &mut Vec<String>) -> Vec<(PathBuf, Option<String>)> {
    let mut pythons: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        pythons.push(Path::new(&venv).join("bin").join("python"));
    }
    pythons.push(PathBuf::from(".venv/bin/python"));
    pythons.push(PathBuf::from("python3"));
    let mut out: Vec<(PathBuf, Option<String>)> = Vec::new();
    let mut package_dirs: Vec<PathBuf> = Vec::new();
    for py in pythons {
        let explicit = py.components().count() > 1;
        if explicit && !py.is_file() {
            continue;
        }
        searched.push(format!("the onnxruntime package of {}", py.display()));
        let Some(dir) = python_package_dir(&py) else {
            continue;
        };
        if package_dirs.contains(&dir) {
            continue;
        }
        package_dirs.push(dir.clone());
        for lib in library_files_in(&dir.join("capi")) {
            out.push((lib, Some(py.display().to_string())));
        }
    }
    out
}

/// Asks `python` where the `onnxruntime` package lies, without importing it.
fn python_package_dir(python: &Path) -> Option<PathBuf> {
    const SCRIPT: &str = "import importlib.util as u\n\
s = u.find_spec('onnxruntime')\n\
print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";
    let out = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(text.trim());
    (!text.trim().is_empty() && dir.is_dir()).then_some(dir)
}

/// Candidate libraries in `LD_LIBRARY_PATH` and the usual system directories.
fn system_candidates(searched: &mut Vec<String>) -> Vec<(PathBuf, Option<String>)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&ld).filter(|p| !p.as_os_str().is_empty()));
    }
    for d in [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
    ] {
        dirs.push(PathBuf::from(d));
    }
    let mut out = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if seen.contains(&d) {
            continue;
        }
        seen.push(d.clone());
        searched.push(d.display().to_string());
        out.extend(library_files_in(&d).into_iter().map(|p| (p, None)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Process-wide initialisation
// ---------------------------------------------------------------------------------------------

struct OrtProcess {
    env: Environment,
    library: OrtLibrary,
}

static ORT_PROCESS: OnceLock<OrtProcess> = OnceLock::new();
static ORT_INIT_LOCK: Mutex<()> = Mutex::new(());

/// Finds, checks and loads ONNX Runtime, and creates `ort`'s environment: once per process (later
/// calls return the same library). A failure leaves nothing initialised, so a later call may try
/// again (after, say, installing the library).
pub fn init_ort() -> Result<&'static OrtLibrary> {
    Ok(&ort_process()?.library)
}

/// The library `ort` was initialised from, if it was.
pub fn initialised_ort_library() -> Option<&'static OrtLibrary> {
    ORT_PROCESS.get().map(|p| &p.library)
}

fn ort_process() -> Result<&'static OrtProcess> {
    if let Some(p) = ORT_PROCESS.get() {
        return Ok(p);
    }
    let _guard = ORT_INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = ORT_PROCESS.get() {
        return Ok(p);
    }
    let library = find_ort_library()?;
    let builder = ::ort::init_from(&library.path).map_err(|e| {
        ort_error(format!(
            "cannot initialise ONNX Runtime from {} ({}): {e}.\nTo fix: {FIX_HINT}",
            library.path.display(),
            library.found_via
        ))
    })?;
    let env = builder
        .with_name("famc")
        .with_telemetry(false)
        .build()
        .map_err(|e| {
            ort_error(format!(
                "cannot create the ONNX Runtime environment ({library}): {e}"
            ))
        })?;
    Ok(ORT_PROCESS.get_or_init(|| OrtProcess { env, library }))
}

/// The execution providers the initialised ONNX Runtime library was built with (its
/// `GetAvailableProviders`, e.g. `["CPUExecutionProvider"]`), initialising it first when needed
/// ([`init_ort`]). Compiled in is not the same as usable: a CUDA provider still needs its CUDA
/// libraries at session creation.
pub fn available_providers() -> Result<Vec<String>> {
    init_ort()?;
    let api = ::ort::api();
    let status_error = |what: &str, status: ::ort::sys::OrtStatusPtr| -> Option<Error> {
        if status.0.is_null() {
            return None;
        }
        // SAFETY: a non-null status is a live `OrtStatus`, whose message is a NUL-terminated
        // string owned by it; we copy the message, then release the status once.
        let message = unsafe {
            let m = (api.GetErrorMessage)(status.0);
            let text = if m.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(m).to_string_lossy().into_owned()
            };
            (api.ReleaseStatus)(status.0);
            text
        };
        Some(ort_error(format!("{what}: {message}")))
    };
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut count: std::ffi::c_int = 0;
    // SAFETY: both out-pointers are valid; on success ONNX Runtime hands us `count` strings.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut count) };
    if let Some(e) = status_error("GetAvailableProviders failed", status) {
        return Err(e);
    }
    if list.is_null() {
        return Ok(Vec::new());
    }
    let names = (0..count.max(0) as usize)
        .filter_map(|i| {
            // SAFETY: `list` holds `count` pointers to NUL-terminated strings.
            let p = unsafe { *list.add(i) };
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        })
        .collect();
    // SAFETY: releases exactly what GetAvailableProviders returned, once.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, count) };
    if let Some(e) = status_error("ReleaseAvailableProviders failed", status) {
        return Err(e);
    }
    Ok(names)
}

/// ONNX Runtime's build description (`GetBuildInfoString`: git branch, commit, build type),
/// initialising it first when needed ([`init_ort`]).
pub fn build_info() -> Result<String> {
    init_ort()?;
    Ok(::ort::info().to_string())
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// A graph loaded by ONNX Runtime.
pub struct OrtRunner {
    path: PathBuf,
    session: Session,
    input_names: Vec<String>,
    output_names: Vec<String>,
    input_specs: Vec<IoSpec>,
    plan: EpPlan,
    /// Where outputs kept in the backend are allocated: the GPU for CUDA and TensorRT sessions.
    backend_memory: MemoryInfo<'static>,
    /// Where host outputs are allocated (CPU memory the caller reads).
    host_memory: MemoryInfo<'static>,
    /// The weight store the session's shared initializers point into; declared after the
    /// session so that it is dropped after it.
    _weights: Option<std::sync::Arc<super::ort_weights::SharedWeights>>,
}

impl fmt::Debug for OrtRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtRunner")
            .field("path", &self.path)
            .field("inputs", &self.input_specs)
            .field("outputs", &self.output_names)
            .field("execution_providers", &self.plan.to_string())
            .finish()
    }
}

/// The execution-provider plan for the graph at `path` under `opts` (see [`ep::plan`]): checks
/// the cargo features, reads the graph's facts and, for TensorRT, asks the TensorRT library its
/// version. The CPU plan touches nothing.
pub fn plan_for(path: &Path, opts: &RunOptions) -> Result<EpPlan> {
    let cfg = &opts.ep;
    cfg.check()?;
    if cfg.kind == EpKind::Cpu {
        let facts = GraphFacts {
            file_name: String::new(),
            inputs: Vec::new(),
            sha256: String::new(),
            block_len: None,
        };
        return ep::plan(cfg, &facts, &Versions::default());
    }
    ep::require_features(cfg.kind)?;
    let library = init_ort()?;
    let facts = GraphFacts::read(path)?;
    let versions = Versions {
        ort: library.version.clone(),
        tensorrt: if cfg.kind == EpKind::TensorRt {
            ep::probe_tensorrt_version()
        } else {
            None
        },
    };
    ep::plan(cfg, &facts, &versions)
}

/// Checks that the ONNX Runtime library offers every provider `kind` needs
/// (`GetAvailableProviders`), so a CPU-only build is named as such rather than failing deep in
/// registration.
pub fn check_providers_offered(kind: EpKind) -> Result<()> {
    let offered = available_providers()?;
    let missing: Vec<&str> = kind
        .required_providers()
        .iter()
        .copied()
        .filter(|p| !offered.iter().any(|o| o == p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let library = init_ort()?;
    Err(ort_error(format!(
        "--ep {kind}: {library} does not offer {} (it offers: {}); famc does not fall back to the \
         CPU.\nTo fix: {}",
        missing.join(" or "),
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        },
        ep::GPU_ORT_HINT
    )))
}

/// Registers the plan's providers on `builder`, failing (never falling back to the CPU) when one
/// cannot be registered, and creates the TensorRT cache directory. `check_offered`: first check
/// that the library offers them (a clearer error for a CPU-only build).
fn register_plan(
    builder: SessionBuilder,
    plan: &EpPlan,
    check_offered: bool,
) -> Result<SessionBuilder> {
    if plan.providers.is_empty() {
        return Ok(builder);
    }
    if check_offered {
        check_providers_offered(plan.kind)?;
    }
    let dispatches = ep::dispatches(plan)?;
    let library = initialised_ort_library().map_or_else(String::new, |l| format!(" ({l})"));
    let builder = builder.with_execution_providers(dispatches).map_err(|e| {
        ort_error(format!(
            "cannot register {} for --ep {}{library}: {}; famc does not fall back to the CPU.\n\
             To fix: {}",
            plan.providers
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(" and "),
            plan.kind,
            e.to_string().trim_end(),
            ep::GPU_ORT_HINT
        ))
    })?;
    if let Some(dir) = &plan.cache_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            ort_error(format!(
                "cannot create the TensorRT cache directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(builder)
}

/// Registers `kind`'s providers (default options) on a throw-away session builder: whether ONNX
/// Runtime and the provider's own libraries (CUDA, cuDNN, TensorRT) load. No graph is loaded and
/// no GPU memory taken; a device that is missing shows only when a session is created.
/// `check_offered`: first check that the library offers them (`GetAvailableProviders`); without
/// it, ONNX Runtime's own registration error is what a CPU-only library gives.
pub fn try_register(kind: EpKind, check_offered: bool) -> Result<()> {
    ep::require_features(kind)?;
    let process = ort_process()?;
    let facts = GraphFacts {
        file_name: "probe.onnx".into(),
        inputs: Vec::new(),
        sha256: String::new(),
        block_len: None,
    };
    let plan = ep::plan(&ep::EpConfig::new(kind), &facts, &Versions::default())?;
    let builder = Session::builder(&process.env)
        .map_err(|e| ort_error(format!("cannot create a session builder: {e}")))?;
    register_plan(builder, &plan, check_offered).map(|_| ())
}

impl OrtRunner {
    /// Initialises ONNX Runtime if needed ([`init_ort`]) and loads the graph at `path` (from the
    /// file, so its external data beside it is found).
    pub fn open(path: &Path, opts: &RunOptions) -> Result<Self> {
        let plan = plan_for(path, opts)?;
        let process = ort_process()?;
        let err =
            |what: &str, e: &dyn fmt::Display| backend_error(KIND, path, format!("{what}: {e}"));
        let mut builder: SessionBuilder =
            Session::builder(&process.env).map_err(|e| err("cannot create a session", &e))?;
        if let Some(n) = opts.intra_threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| err("cannot set intra-op threads", &e))?;
        }
        if let Some(n) = opts.inter_threads {
            builder = builder
                .with_inter_threads(n)
                .map_err(|e| err("cannot set inter-op threads", &e))?;
            if n > 1 {
                builder = builder
                    .with_parallel_execution(true)
                    .map_err(|e| err("cannot enable parallel execution", &e))?;
            }
        }
        if let Some(level) = opts.ort_optimization {
            let level = match level {
                OrtOptLevel::Disable => GraphOptimizationLevel::Disable,
                OrtOptLevel::Basic => GraphOptimizationLevel::Level1,
                OrtOptLevel::Extended => GraphOptimizationLevel::Level2,
                OrtOptLevel::All => GraphOptimizationLevel::All,
            };
            builder = builder
                .with_optimization_level(level)
                .map_err(|e| err("cannot set the optimisation level", &e))?;
        }
        builder = register_plan(builder, &plan, true).map_err(|e| match e {
            Error::Backend { message, .. } => backend_error(KIND, path, message),
            other => other,
        })?;
        // Device sessions copy their weights to the device anyway; sharing is for host memory.
        let weights = match plan.kind {
            EpKind::Cpu => super::ort_weights::bind(path).map_err(|m| err("weights", &m))?,
            _ => None,
        };
        if let Some(w) = &weights {
            builder = w.apply(builder).map_err(|m| err("weights", &m))?;
        }
        if plan.kind == EpKind::Cpu {
            // The memory pattern plans one arena block per input shape it sees; the block
            // graph sees two (full and short blocks) and more with batches. Without it, Python
            // ONNX Runtime held SmolLM2's block session in 87 MiB less and ran it no slower.
            builder = builder
                .with_memory_pattern(false)
                .map_err(|e| err("cannot set the memory pattern", &e))?;
        }
        // While the session packs its weights it reads the whole store; handing the pages back
        // as it goes keeps them from adding a second copy to the peak.
        let releasing = weights.as_ref().map(|w| w.store.release_while_loading());
        let session = builder.commit_from_file(path);
        drop(releasing);
        let session = session.map_err(|e| {
            err(
                &format!(
                    "ONNX Runtime {} cannot load the graph{}",
                    process.library.version,
                    if plan.providers.is_empty() {
                        String::new()
                    } else {
                        format!(" with {plan}")
                    }
                ),
                &e,
            )
        })?;
        if let Some(w) = &weights {
            w.store.release_pages();
        }
        let input_specs: Vec<IoSpec> = session
            .inputs()
            .iter()
            .map(|o| io_spec(o.name(), o.dtype()))
            .collect();
        let input_names = input_specs.iter().map(|s| s.name.clone()).collect();
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let memory = |device: AllocationDevice, id: i32, ty: MemoryType| {
            MemoryInfo::new(device, id, AllocatorType::Device, ty)
                .map_err(|e| err("cannot describe the session's memory", &e))
        };
        let (backend_memory, host_memory) = if plan.kind == EpKind::Cpu {
            (
                memory(AllocationDevice::CPU, 0, MemoryType::Default)?,
                memory(AllocationDevice::CPU, 0, MemoryType::Default)?,
            )
        } else {
            let id = opts.ep.device_id.unwrap_or(0) as i32;
            (
                memory(AllocationDevice::CUDA, id, MemoryType::Default)?,
                memory(AllocationDevice::CPU, 0, MemoryType::CPUOutput)?,
            )
        };
        Ok(OrtRunner {
            path: path.to_path_buf(),
            session,
            _weights: weights.map(|w| w.store),
            input_names,
            output_names,
            input_specs,
            plan,
            backend_memory,
            host_memory,
        })
    }

    /// The execution providers this session was created with.
    pub fn plan(&self) -> &EpPlan {
        &self.plan
    }

    /// Checks the run's symbolic dimensions against what the TensorRT engine was built for.
    fn check_limits(&self, inputs: &[&Value]) -> Result<()> {
        for limit in &self.plan.limits {
            for (spec, t) in self.input_specs.iter().zip(inputs) {
                let Some(dims) = &spec.shape else { continue };
                for (d, &n) in dims.iter().zip(t.shape()) {
                    if matches!(d, Dim::Named(s) if *s == limit.symbol) && n > limit.max {
                        let fix = if limit.symbol == "batch" {
                            format!("; pass --max-batch {n} or more")
                        } else {
                            String::new()
                        };
                        return Err(backend_error(
                            KIND,
                            &self.path,
                            format!(
                                "input `{}`: `{}` = {n} exceeds {}, the largest the TensorRT \
                                 engine was built for ({}){fix}",
                                spec.name, limit.symbol, limit.max, limit.set_by
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl GraphRunner for OrtRunner {
    fn input_names(&self) -> &[String] {
        &self.input_names
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn input_specs(&self) -> &[IoSpec] {
        &self.input_specs
    }

    fn backend(&self) -> BackendKind {
        KIND
    }

    fn hold(&self, t: super::Tensor) -> Result<Value> {
        if !self.backend_memory.is_cpu_accessible() {
            return Ok(Value::host(t));
        }
        let (shape, elem) = (t.shape().to_vec(), t.elem_type());
        let made = match &t {
            super::Tensor::F32(a) => owned_tensor(a).map(|t| t.upcast()),
            super::Tensor::I64(a) => owned_tensor(a).map(|t| t.upcast()),
        };
        let held = made
            .map_err(|e| backend_error(KIND, &self.path, format!("cannot hold a tensor: {e}")))?;
        Ok(Value::ort(OrtValue(held), shape, elem))
    }

    fn run_values(&mut self, inputs: &[&Value], outputs: Vec<OutputTo>) -> Result<Vec<Value>> {
        check_inputs(KIND, &self.path, &self.input_specs, inputs)?;
        check_outputs(KIND, &self.path, &self.output_names, &outputs)?;
        self.check_limits(inputs)?;
        let path = &self.path;
        let fail =
            |what: String, e: ::ort::Error| backend_error(KIND, path, format!("{what}: {e}"));
        let mut binding = self
            .session
            .create_binding()
            .map_err(|e| fail("cannot create an IoBinding".into(), e))?;
        for (name, value) in self.input_names.iter().zip(inputs) {
            let bound = match value.as_ort() {
                Some(v) => binding.bind_input(name.as_str(), &v.0),
                None => match &*value.host_tensor()? {
                    Tensor::F32(a) => bind_host(&mut binding, name, a),
                    Tensor::I64(a) => bind_host(&mut binding, name, a),
                },
            };
            bound.map_err(|e| fail(format!("cannot bind input `{name}`"), e))?;
        }
        let mut host = Vec::with_capacity(outputs.len());
        for (name, place) in self.output_names.iter().zip(outputs) {
            host.push(matches!(place, OutputTo::Host));
            let bound = match place {
                OutputTo::Host => binding.bind_output_to_device(name.as_str(), &self.host_memory),
                OutputTo::Reuse(v) if v.as_ort().is_some_and(|o| o.is_in(&self.backend_memory)) => {
                    let buffer = v.into_ort().expect("an ONNX Runtime value");
                    binding.bind_output(name.as_str(), buffer.0)
                }
                OutputTo::Backend | OutputTo::Reuse(_) => {
                    binding.bind_output_to_device(name.as_str(), &self.backend_memory)
                }
            };
            bound.map_err(|e| fail(format!("cannot bind output `{name}`"), e))?;
        }
        let mut results = self
            .session
            .run_binding(&binding)
            .map_err(|e| fail("run failed".into(), e))?;
        if let Some(w) = &self._weights {
            w.release_pages_now_and_then();
        }
        self.output_names
            .iter()
            .zip(host)
            .map(|(name, host)| {
                let value = results.remove(name.as_str()).ok_or_else(|| {
                    backend_error(KIND, path, format!("output `{name}` missing from the run"))
                })?;
                let dtype = value.dtype().to_string();
                let tensor = value.downcast::<DynTensorValueType>().map_err(|e| {
                    backend_error(
                        KIND,
                        path,
                        format!("output `{name}` ({dtype}) is not a tensor: {e}"),
                    )
                })?;
                let kept = OrtValue(tensor);
                if host {
                    kept.to_array_f32()
                        .map(Value::host)
                        .map_err(|e| backend_error(KIND, path, format!("output `{name}`: {e}")))
                } else {
                    let (shape, elem) = kept.shape_and_type();
                    Ok(Value::ort(kept, shape, elem))
                }
            })
            .collect()
    }
}

fn bind_host<T>(
    binding: &mut ::ort::session::IoBinding,
    name: &str,
    a: &ArrayD<T>,
) -> ::ort::Result<()>
where
    T: ::ort::value::PrimitiveTensorElementType + Clone + fmt::Debug + 'static,
{
    // An owned copy: `ort` clones a borrowed tensor on binding through an identity session whose
    // own binding clones again under the same lock (a deadlock in 2.0.0-rc.15).
    binding.bind_input(name, &owned_tensor(a)?)
}

/// A tensor ONNX Runtime owns, copied from `a` in standard layout.
fn owned_tensor<T>(a: &ArrayD<T>) -> ::ort::Result<::ort::value::Tensor<T>>
where
    T: ::ort::value::PrimitiveTensorElementType + Clone + fmt::Debug + 'static,
{
    ::ort::value::Tensor::from_array(a.as_standard_layout().into_owned())
}

/// A tensor ONNX Runtime returned, kept in its memory (host or device) to feed a later run.
#[derive(Debug)]
pub struct OrtValue(DynTensor);

impl OrtValue {
    fn is_in(&self, memory: &MemoryInfo<'_>) -> bool {
        let mine = self.0.memory_info();
        mine.allocation_device() == memory.allocation_device()
            && mine.device_id() == memory.device_id()
    }

    fn shape_and_type(&self) -> (Vec<usize>, ElemType) {
        (dims(self.0.shape()), elem_type(*self.0.data_type()))
    }

    /// Writes `row` at index `at` of `axis` when the data is in host memory; `false` (nothing
    /// written) when it is not.
    pub(crate) fn write_at(
        &mut self,
        axis: usize,
        at: usize,
        row: &ndarray::ArrayViewD<'_, f32>,
    ) -> Result<bool> {
        if !self.0.memory_info().is_cpu_accessible() {
            return Ok(false);
        }
        let mut a = self
            .0
            .try_extract_array_mut::<f32>()
            .map_err(|e| ort_error(format!("cannot write into a tensor: {e}")))?;
        a.index_axis_mut(ndarray::Axis(axis), at).assign(row);
        Ok(true)
    }

    /// The device holding the data: `cpu`, `cuda:0`, ….
    pub(crate) fn device(&self) -> String {
        let info = self.0.memory_info();
        let device = info.allocation_device().as_str().to_ascii_lowercase();
        if info.is_cpu_accessible() {
            device
        } else {
            format!("{device}:{}", info.device_id())
        }
    }

    pub(crate) fn data_address(&self) -> Option<usize> {
        Some(self.0.data_ptr() as usize)
    }

    /// A host copy as f32 (through a device-to-host copy for device memory).
    pub(crate) fn to_array_f32(&self) -> Result<ArrayD<f32>> {
        let fail = |e: ::ort::Error| ort_error(format!("cannot read a tensor back: {e}"));
        let on_host;
        let tensor = if self.0.memory_info().is_cpu_accessible() {
            &self.0
        } else {
            on_host = self.0.to(AllocationDevice::CPU, 0).map_err(fail)?;
            &on_host
        };
        let shape = dims(tensor.shape());
        let data = match tensor.data_type() {
            TensorElementType::Float32 => {
                tensor.try_extract_tensor::<f32>().map_err(fail)?.1.to_vec()
            }
            other => {
                return Err(ort_error(format!(
                    "a {other:?} tensor cannot be read as float32"
                )))
            }
        };
        ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| ort_error(e.to_string()))
    }
}

fn elem_type(ty: TensorElementType) -> ElemType {
    match ty {
        TensorElementType::Float32 => ElemType::F32,
        TensorElementType::Int64 => ElemType::I64,
        other => ElemType::Other(other.to_string()),
    }
}

/// A run's concrete shape (ONNX Runtime reports dimensions as i64).
fn dims(shape: &[i64]) -> Vec<usize> {
    shape.iter().map(|&d| d.max(0) as usize).collect()
}

fn io_spec(name: &str, ty: &ValueType) -> IoSpec {
    match ty {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => IoSpec {
            name: name.to_string(),
            elem_type: elem_type(*ty),
            shape: Some(
                shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if d >= 0 {
                            Dim::Fixed(d as usize)
                        } else {
                            match dimension_symbols.get(i) {
                                Some(s) if !s.is_empty() => Dim::Named(s.clone()),
                                _ => Dim::Any,
                            }
                        }
                    })
                    .collect(),
            ),
        },
        other => IoSpec {
            name: name.to_string(),
            elem_type: ElemType::Other(other.to_string()),
            shape: None,
        },
    }
}
