//! `famc export`: a checkpoint compiled into graph files and a manifest (docs/graph-contract.md).

mod manifest;

pub use manifest::{
    is_plain_file_name, FileEntry, GraphFiles, Manifest, ModelDims, StateTensor, FORMAT_VERSION,
    MANIFEST_FILE,
};

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use crate::builder::{save_model, StoreWriter};
use crate::contract::{Contract, GraphContract, IoDim, IoType, Role};
use crate::emit::{self, EmitSpec};
pub use crate::emit::{Activations, WeightDtype};
use crate::error::{Error, Result};
use crate::model::{Checkpoint, FamParams};
use crate::onnx::{self, Target};

/// Initializers larger than this go to the weight store [`WEIGHTS_FILE`] by default: every
/// matrix (so the graphs share them and stay well under protobuf's 2 GiB limit), while vectors
/// such as norm weights stay in the graph (each stored tensor is page-aligned).
pub const DEFAULT_EXTERNAL_THRESHOLD: usize = 64 << 10;

/// Block graph file name.
pub const BLOCK_FILE: &str = "block.onnx";
/// Init graph file name.
pub const INIT_FILE: &str = "init.onnx";
/// Decode graph file name.
pub const DECODE_FILE: &str = "decode.onnx";
/// FAM keys/values graph file name.
pub const FAM_KV_FILE: &str = "fam_kv.onnx";
/// Score graph file name.
pub const SCORE_FILE: &str = "score.onnx";
/// The weight store: the external data of every graph, each distinct tensor stored once.
pub const WEIGHTS_FILE: &str = "weights.data";

/// The checkpoint's files an export carries along when the checkpoint has them, so that text
/// input and generation work from the export alone.
pub const CARRIED_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Initializers of more bytes than this are written as external data.
    pub external_threshold: usize,
    /// How weight matrices are stored.
    pub dtype: WeightDtype,
    /// q8/q4 only: `MatMulNBits`' `accuracy_level`, the precision ONNX Runtime computes in
    /// (1: f32 against the dequantized weights; 4, the default: int8 blocks, faster).
    pub accuracy_level: i64,
    /// The ONNX dialect the graphs are emitted in.
    pub target: Target,
    /// q8 only: int8 activations (per-row) and per-channel int8 weights instead of MatMulNBits.
    pub activations: Activations,
}

/// [`ExportOptions::accuracy_level`]'s default: ONNX Runtime's int8 kernels.
pub const DEFAULT_ACCURACY_LEVEL: i64 = 4;

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            external_threshold: DEFAULT_EXTERNAL_THRESHOLD,
            dtype: WeightDtype::F32,
            accuracy_level: DEFAULT_ACCURACY_LEVEL,
            target: Target::default(),
            activations: Activations::F32,
        }
    }
}

/// The emitted graphs of a model, in memory.
pub struct Compiled {
    pub manifest: Manifest,
    pub block: onnx::ModelProto,
    pub init: Option<onnx::ModelProto>,
    pub decode: onnx::ModelProto,
    pub fam_kv: Option<onnx::ModelProto>,
    pub score: onnx::ModelProto,
}

impl Compiled {
    /// Every graph with its file name, in a fixed order.
    pub fn graphs(&self) -> Vec<(&'static str, &onnx::ModelProto)> {
        let mut v = vec![(BLOCK_FILE, &self.block)];
        if let Some(g) = &self.init {
            v.push((INIT_FILE, g));
        }
        v.push((DECODE_FILE, &self.decode));
        if let Some(g) = &self.fam_kv {
            v.push((FAM_KV_FILE, g));
        }
        v.push((SCORE_FILE, &self.score));
        v
    }
}

/// The state tensors of the block graph, in input order: its contract's state inputs, each with
/// the output that carries its next value and, for FAM, the init output it starts from.
pub fn state_tensors(contract: &Contract) -> Vec<StateTensor> {
    let block = &contract.block;
    block
        .inputs
        .iter()
        .filter_map(|io| {
            let layer = io.layer?;
            let output = block.output(io.role.next()?, Some(layer))?;
            let init = contract
                .init
                .as_ref()
                .filter(|_| io.role == Role::Fam)
                .and_then(|g| g.output(Role::InitFam, Some(layer)))
                .map(|o| o.name.clone());
            let shape = io.shape[1..]
                .iter()
                .map(|d| match d {
                    IoDim::Fixed(n) => *n,
                    IoDim::Sym(s) => unreachable!("a state dimension is fixed, not `{s}`"),
                })
                .collect();
            Some(StateTensor {
                input: io.name.clone(),
                output: output.name.clone(),
                init,
                shape,
                layer,
                kind: io.role,
            })
        })
        .collect()
}

/// One graph's emitter.
type EmitFn = fn(&EmitSpec) -> Result<onnx::ModelProto>;

/// The graphs an export of `fam` holds, with their file names, in a fixed order.
fn graph_kinds(fam: FamParams) -> Vec<(&'static str, EmitFn)> {
    let mut v: Vec<(&'static str, EmitFn)> = vec![(BLOCK_FILE, emit::block_graph)];
    if fam.fam_len > 0 {
        v.push((INIT_FILE, emit::init_graph));
    }
    v.push((DECODE_FILE, emit::decode_graph));
    if fam.fam_len > 0 {
        v.push((FAM_KV_FILE, emit::fam_kv_graph));
    }
    v.push((SCORE_FILE, emit::score_graph));
    v
}

/// The manifest of `ck` exported with `fam` and `dtype` (no files recorded yet).
fn manifest_for(ck: &Checkpoint, fam: FamParams, opts: &ExportOptions) -> Result<Manifest> {
    let (dtype, target) = (opts.dtype, opts.target);
    fam.validate()?;
    if opts.activations == Activations::Int8 && dtype != WeightDtype::Q8 {
        return Err(Error::Input(format!(
            "--activations int8 quantizes the products of q8 weights; --dtype is {} (use --dtype q8)",
            dtype.name()
        )));
    }
    if let Some(rows) = ck.weights.fam_init.as_ref().map(|a| a.nrows()) {
        if rows != fam.fam_len {
            return Err(Error::Input(format!(
                "fam_len = {}, but the checkpoint's learned FAM prompt `model.fam_init` has {rows} rows",
                fam.fam_len
            )));
        }
    }
    let c = &ck.config;
    let contract = emit::contract(c, fam);
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        famc_version: env!("CARGO_PKG_VERSION").to_string(),
        fam,
        model: ModelDims {
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rope_theta: c.rope_theta,
            rms_norm_eps: c.rms_norm_eps,
        },
        dtype: dtype.name().into(),
        activations: opts.activations,
        opset: target.opset(),
        ir_version: target.ir_version(),
        target,
        checkpoint_sha256: ck.hash.clone(),
        graphs: GraphFiles {
            block: BLOCK_FILE.into(),
            init: (fam.fam_len > 0).then(|| INIT_FILE.into()),
            decode: Some(DECODE_FILE.into()),
            fam_kv: (fam.fam_len > 0).then(|| FAM_KV_FILE.into()),
            score: Some(SCORE_FILE.into()),
        },
        state: state_tensors(&contract),
        contract,
        files: Default::default(),
    })
}

fn spec_for<'a>(
    ck: &'a Checkpoint,
    fam: FamParams,
    opts: &ExportOptions,
    store: Option<(crate::builder::SharedStore, usize)>,
) -> EmitSpec<'a> {
    EmitSpec {
        config: &ck.config,
        weights: &ck.weights,
        fam,
        weight_dtype: opts.dtype,
        accuracy_level: opts.accuracy_level,
        activations: opts.activations,
        store,
        target: opts.target,
    }
}

/// Emits the graphs and the manifest of `ck` with FAM parameters `fam`, all held in memory
/// (what [`export`] writes, emitting and writing one graph at a time).
pub fn compile(
    ck: &Checkpoint,
    fam: FamParams,
    dtype: WeightDtype,
    target: Target,
) -> Result<Compiled> {
    let opts = ExportOptions {
        dtype,
        target,
        ..ExportOptions::default()
    };
    let manifest = manifest_for(ck, fam, &opts)?;
    let spec = spec_for(ck, fam, &opts, None);
    let mut graphs = BTreeMap::new();
    for (file, emit) in graph_kinds(fam) {
        let mut g = emit(&spec)?;
        stamp(&mut g, &manifest);
        graphs.insert(file, g);
    }
    Ok(Compiled {
        manifest,
        block: graphs.remove(BLOCK_FILE).expect("always emitted"),
        init: graphs.remove(INIT_FILE),
        decode: graphs.remove(DECODE_FILE).expect("always emitted"),
        fam_kv: graphs.remove(FAM_KV_FILE),
        score: graphs.remove(SCORE_FILE).expect("always emitted"),
    })
}

/// Mirrors the manifest into `metadata_props`, sorted by key.
fn stamp(model: &mut onnx::ModelProto, m: &Manifest) {
    let json = serde_json::to_string(m).expect("manifest serialises");
    let props = [
        ("famc.block_len", m.fam.block_len.to_string()),
        ("famc.checkpoint_sha256", m.checkpoint_sha256.clone()),
        ("famc.dtype", m.dtype.clone()),
        ("famc.fam_len", m.fam.fam_len.to_string()),
        ("famc.format_version", m.format_version.to_string()),
        ("famc.manifest", json),
        ("famc.mem_blocks", m.fam.mem_blocks.to_string()),
    ];
    model.metadata_props = props
        .into_iter()
        .map(|(key, value)| onnx::StringStringEntryProto {
            key: key.into(),
            value,
        })
        .collect();
}

/// Writes an export into `dir`, never leaving a mixed or half-written directory: `contents`
/// fills a hidden sibling directory (graphs, store, carried checkpoint files and `famc.json` with
/// every file's size and SHA-256) and returns the manifest it wrote, and that directory then
/// takes `dir`'s place in one rename (an atomic exchange with an earlier export on Linux). A
/// lock file beside `dir` (removed afterwards) makes a second export into the same directory an
/// error while the first runs. `dir` may be missing, empty, or an earlier export; anything else
/// is refused untouched.
fn write_with(dir: &Path, contents: impl FnOnce(&Path) -> Result<Manifest>) -> Result<Manifest> {
    write_dir_with(dir, MANIFEST_FILE, "export", contents)
}

/// [`write_with`] for any directory famc writes whole: `marker` is the file that identifies an
/// earlier one it may replace, `what` what it is (`export`, `Triton repository`).
pub(crate) fn write_dir_with<T>(
    dir: &Path,
    marker: &str,
    what: &str,
    contents: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let err = |message: String| Error::Export {
        dir: dir.to_path_buf(),
        message,
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("not a directory name to export into".into()))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::Write {
        path: parent.clone(),
        message: e.to_string(),
    })?;
    let lock_path = parent.join(format!(".{name}.famc-lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(err(format!(
                "another famc {what} into this directory is being written (it holds {}); wait for it or write elsewhere",
                lock_path.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
    }
    // the lock file is removed after each export: a lock taken on a file another export has
    // already removed (and maybe replaced) guards nothing
    {
        use std::os::unix::fs::MetadataExt;
        let ours = lock.metadata().map_err(|e| Error::io(&lock_path, e))?;
        let now = std::fs::metadata(&lock_path).ok();
        if now.is_none_or(|m| (m.dev(), m.ino()) != (ours.dev(), ours.ino())) {
            return Err(err(format!(
                "another famc {what} into this directory is being written (it replaced {}); wait for it or write elsewhere",
                lock_path.display()
            )));
        }
    }
    let _lock_guard = crate::signal::register(&lock_path);
    let result = write_locked(dir, &parent, name, marker, what, contents);
    let _ = std::fs::remove_file(&lock_path);
    drop(lock);
    result
}

fn write_locked<T>(
    dir: &Path,
    parent: &Path,
    name: &str,
    marker: &str,
    what: &str,
    contents: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let err = |message: String| Error::Export {
        dir: dir.to_path_buf(),
        message,
    };
    match std::fs::symlink_metadata(dir) {
        Err(_) => {}
        Ok(m) if !m.is_dir() => return Err(err("exists and is not a directory".into())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            if !dir.join(marker).is_file() && entries.next().is_some() {
                return Err(err(format!(
                    "exists and is not a famc {what} (no {marker}); famc replaces only an earlier {what} or an empty directory"
                )));
            }
        }
    }
    remove_stale_temporaries(parent, name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.famc-tmp-"))
        .tempdir_in(parent)
        .map_err(|e| Error::Write {
            path: parent.to_path_buf(),
            message: format!("cannot create a temporary directory: {e}"),
        })?;
    let _guard = crate::signal::register(tmp.path());
    let manifest = contents(tmp.path())?;
    crate::io::sync_dir(tmp.path());
    replace_dir(tmp.path(), dir).map_err(|e| {
        err(format!(
            "cannot move the new {what} into place from {}: {e}",
            tmp.path().display()
        ))
    })?;
    crate::io::sync_dir(parent);
    // `tmp` now holds the earlier export, if there was one, and goes with it
    drop(tmp);
    Ok(manifest)
}

/// Emits the graphs of `ck` one at a time into the empty directory `dir`, each graph's weights
/// moved into the store before the next is emitted, so that no more than one graph's weights
/// are held besides the checkpoint's.
fn emit_contents(
    ck: &Checkpoint,
    manifest: &Manifest,
    dir: &Path,
    opts: &ExportOptions,
) -> Result<Manifest> {
    let fam = manifest.fam;
    // weights go to the store as they are emitted: no graph's weights are held whole
    let store = std::rc::Rc::new(std::cell::RefCell::new(StoreWriter::new(
        &dir.join(WEIGHTS_FILE),
    )?));
    let spec = spec_for(
        ck,
        fam,
        opts,
        Some((store.clone(), opts.external_threshold)),
    );
    let mut names = Vec::new();
    for (file, emit) in graph_kinds(fam) {
        let mut g = emit(&spec)?;
        stamp(&mut g, manifest);
        save_model(g, &dir.join(file), None)?;
        names.push(file.to_string());
    }
    drop(spec);
    let store = std::rc::Rc::try_unwrap(store)
        .ok()
        .expect("the emitters hold no store")
        .into_inner();
    finish_contents(manifest, &ck.dir, dir, store, names)
}

/// Completes an export directory whose graphs are written: the store, the carried checkpoint
/// files, then famc.json with every file's size and hash.
fn finish_contents(
    manifest: &Manifest,
    source_dir: &Path,
    dir: &Path,
    store: StoreWriter,
    mut names: Vec<String>,
) -> Result<Manifest> {
    if store.finish()? > 0 {
        names.push(WEIGHTS_FILE.to_string());
    }
    for file in CARRIED_FILES {
        let from = source_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file)).map_err(|e| Error::io(&from, e))?;
            names.push(file.to_string());
        }
    }
    let mut manifest = manifest.clone();
    for file in names {
        let entry = file_entry(&dir.join(&file))?;
        manifest.files.insert(file, entry);
    }
    manifest.write(dir)?;
    Ok(manifest)
}

/// Size and SHA-256 of a file, read in pieces.
pub fn file_entry(path: &Path) -> Result<FileEntry> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        bytes,
        sha256: crate::model::hex(&h.finalize()),
    })
}

/// Temporary directories of exports into `name` that died (killed, power lost): only ever
/// called while holding the export's lock, so none of them is in use.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.famc-tmp-");
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Puts directory `new` at `dir`'s path. An existing `dir` ends up at `new`'s path: exchanged in
/// one step where the system can (Linux `renameat2(RENAME_EXCHANGE)`), else moved aside first.
fn replace_dir(new: &Path, dir: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        return std::fs::rename(new, dir);
    }
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(new)?, c(dir)?);
        // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    // no exchange on this system or file system: move the old export aside, then the new in
    let aside = new.with_extension("old");
    std::fs::rename(dir, &aside)?;
    if let Err(e) = std::fs::rename(new, dir) {
        let _ = std::fs::rename(&aside, dir);
        return Err(e);
    }
    std::fs::rename(&aside, new)
}

/// Compiles `ck` and writes the export into `dir`; returns the manifest written.
pub fn export(
    ck: &Checkpoint,
    fam: FamParams,
    dir: &Path,
    opts: &ExportOptions,
) -> Result<Manifest> {
    let manifest = manifest_for(ck, fam, opts)?;
    if !matches!(opts.accuracy_level, 0..=4) {
        return Err(Error::Input(format!(
            "--accuracy-level {}: MatMulNBits takes 0 to 4 (1: f32, 4: int8 compute)",
            opts.accuracy_level
        )));
    }
    write_with(dir, |tmp| emit_contents(ck, &manifest, tmp, opts))
}

/// An export directory checked against its manifest: the graphs exist, parse, and declare the
/// inputs and outputs the manifest promises.
pub struct ExportDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ExportDir {
    /// Opens and checks `dir`: every file famc.json lists has its recorded size, the block graph
    /// declares the inputs and outputs famc.json implies, and every graph embeds the same
    /// manifest (so a graph from another export, or an edited famc.json, is refused). Full
    /// hashes are [`ExportDir::verify`]'s.
    pub fn open(dir: &Path) -> Result<Self> {
        let err = |message: String| Error::Export {
            dir: dir.to_path_buf(),
            message,
        };
        if !dir.join(MANIFEST_FILE).exists() {
            let has_graphs = std::fs::read_dir(dir).is_ok_and(|mut d| {
                d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "onnx")))
            });
            return Err(err(if has_graphs {
                format!("no {MANIFEST_FILE}: the directory holds .onnx graphs but not the manifest of a complete famc export; re-export it")
            } else {
                format!("no {MANIFEST_FILE}: not a famc export")
            }));
        }
        let manifest = Manifest::read(dir)?;
        for (file, want) in &manifest.files {
            let have = std::fs::metadata(dir.join(file)).map(|m| m.len());
            match have {
                Ok(n) if n == want.bytes => {}
                Ok(n) => {
                    return Err(err(format!(
                        "{file} is {n} bytes, famc.json records {}: the export is incomplete or mixed with another; re-export it",
                        want.bytes
                    )))
                }
                Err(e) => return Err(err(format!("{file}: {e} (famc.json lists it)"))),
            }
        }
        let graphs = manifest.graphs.clone();
        let c = &manifest.contract;
        let files = [
            (Some(&graphs.block), Some(&c.block)),
            (graphs.init.as_ref(), c.init.as_ref()),
            (graphs.decode.as_ref(), Some(&c.decode)),
            (graphs.fam_kv.as_ref(), c.fam_kv.as_ref()),
            (graphs.score.as_ref(), c.score.as_ref()),
        ];
        let mut structures = Vec::new();
        for (file, contract) in files {
            let Some(file) = file else { continue };
            if !manifest.files.contains_key(file) {
                return Err(err(format!(
                    "famc.json names the graph {file} but records no size and hash for it"
                )));
            }
            let g = read_structure(&dir.join(file)).map_err(|e| err(format!("{file}: {e}")))?;
            if let Some(contract) = contract {
                check_graph(&g, contract).map_err(|m| err(format!("{file}: {m}")))?;
            }
            structures.push((file.clone(), g));
        }
        if graphs.init.is_none() && manifest.fam.fam_len > 0 {
            return Err(err("famc.json has F > 0 but names no init graph".into()));
        }
        let want = serde_json::to_value(manifest.embedded()).expect("manifest serialises");
        for (file, g) in &structures {
            check_embedded(g, &want).map_err(|m| err(format!("{file}: {m}")))?;
            for location in external_locations(g) {
                if !manifest.files.contains_key(&location) {
                    return Err(err(format!(
                        "{file} reads weights from `{location}`, which famc.json does not list"
                    )));
                }
            }
        }
        Ok(ExportDir {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Hashes every file famc.json lists and compares with what it records; returns each file
    /// with its size.
    pub fn verify(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for (file, want) in &self.manifest.files {
            let have = file_entry(&self.dir.join(file))?;
            if have != *want {
                return Err(Error::Export {
                    dir: self.dir.clone(),
                    message: format!(
                        "{file}: sha256 {} ({} bytes), famc.json records {} ({} bytes): the file was changed or damaged",
                        have.sha256, have.bytes, want.sha256, want.bytes
                    ),
                });
            }
            out.push((file.clone(), have.bytes));
        }
        Ok(out)
    }

    pub fn block_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.graphs.block)
    }

    pub fn init_path(&self) -> Option<PathBuf> {
        self.manifest.graphs.init.as_ref().map(|f| self.dir.join(f))
    }
}

/// The graph's embedded manifest (`famc.manifest`) must be `want`; says which field differs.
fn check_embedded(
    m: &onnx::ModelProto,
    want: &serde_json::Value,
) -> std::result::Result<(), String> {
    let text = m
        .metadata_props
        .iter()
        .find(|p| p.key == "famc.manifest")
        .map(|p| p.value.as_str())
        .ok_or("no famc.manifest metadata: not a graph famc exported")?;
    let have: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("unreadable famc.manifest metadata: {e}"))?;
    match first_difference(&have, want, String::new()) {
        None => Ok(()),
        Some((path, a, b)) => Err(format!(
            "the graph was exported with {path} = {a}, famc.json says {b}: the graph belongs to another export, or famc.json was edited; re-export"
        )),
    }
}

/// The first place (a dotted path) where two JSON values differ, with both values there.
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    at: String,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, join(k)),
                (p, q) => Some((
                    join(k),
                    p.map_or("nothing".into(), Value::to_string),
                    q.map_or("nothing".into(), Value::to_string),
                )),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some((at, a.to_string(), b.to_string())),
    }
}

/// The external-data files a graph's initializers name.
fn external_locations(m: &onnx::ModelProto) -> std::collections::BTreeSet<String> {
    m.graph
        .iter()
        .flat_map(|g| &g.initializer)
        .flat_map(|t| &t.external_data)
        .filter(|e| e.key == "location")
        .map(|e| e.value.clone())
        .collect()
}

/// A graph's structure without its external data: checking an export must not read gigabytes.
fn read_structure(path: &Path) -> std::result::Result<onnx::ModelProto, String> {
    use prost::Message;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| format!("not an ONNX model: {e}"))
}

fn dims_of(vi: &onnx::ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use onnx::tensor_shape_proto::dimension::Value as D;
    use onnx::type_proto::Value as T;
    let Some(T::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(D::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect(),
    )
}

/// `m` declares exactly the inputs and outputs of `contract`, in order, with its element types
/// and fixed dimensions.
fn check_graph(m: &onnx::ModelProto, contract: &GraphContract) -> std::result::Result<(), String> {
    let g = m.graph.as_ref().ok_or("no graph")?;
    for (what, have, want) in [
        ("inputs", &g.input, &contract.inputs),
        ("outputs", &g.output, &contract.outputs),
    ] {
        let names: Vec<&str> = have.iter().map(|v| v.name.as_str()).collect();
        let listed: Vec<&str> = want.iter().map(|io| io.name.as_str()).collect();
        if names != listed {
            return Err(format!(
                "{what} {names:?} disagree with famc.json's contract, which lists {listed:?}"
            ));
        }
        for (vi, io) in have.iter().zip(want) {
            let dims = dims_of(vi).ok_or_else(|| format!("`{}` has no tensor shape", io.name))?;
            let fixed: Vec<Option<i64>> = io
                .shape
                .iter()
                .map(|d| match d {
                    IoDim::Fixed(n) => Some(*n as i64),
                    IoDim::Sym(_) => None,
                })
                .collect();
            let elem = elem_type_of(vi);
            let want_elem = match io.dtype {
                IoType::Float32 => onnx::tensor_proto::DataType::Float as i32,
                IoType::Int64 => onnx::tensor_proto::DataType::Int64 as i32,
            };
            if dims != fixed || elem != Some(want_elem) {
                return Err(format!(
                    "`{}` is {:?} with shape {dims:?}; famc.json's contract says {:?} [{}]",
                    io.name,
                    elem,
                    io.dtype,
                    io.shape
                        .iter()
                        .map(IoDim::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    Ok(())
}

fn elem_type_of(vi: &onnx::ValueInfoProto) -> Option<i32> {
    use onnx::type_proto::Value as T;
    match vi.r#type.as_ref()?.value.as_ref()? {
        T::TensorType(t) => Some(t.elem_type),
        _ => None,
    }
}
