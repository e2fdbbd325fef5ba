//! Property-based fuzz targets for famc's parsers of untrusted input, on stable Rust.
//!
//! Each target builds hostile inputs (random bytes, and mostly structurally valid inputs that
//! are then mutated: truncated, bit-flipped, numbers replaced by huge, negative, fractional or
//! non-numeric values, deep nesting, absurd shapes and offsets, path traversal in file names,
//! non-UTF-8 text), writes them into a temporary directory where the API reads files, calls the
//! real famc API inside `catch_unwind`, and asserts that it did not panic. A returned `Err` is
//! fine; where a mutated input is accepted, the invariants a caller relies on are checked.
//!
//! Every target runs 256 cases from a fixed seed (deterministic in CI) without proptest's
//! failure-persistence files. `PROPTEST_CASES` (and `PROPTEST_RNG_SEED`) override them;
//! `scripts/fuzz-long.sh` runs a long release-mode campaign. Each target prints its case count
//! and time (visible with `--nocapture`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::{BufRead, Read};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Instant;

use famc::builder::{load_model, save_model, DType, Dim, GraphBuilder, TensorData};
use famc::export::{ExportDir, Manifest};
use famc::model::{
    Checkpoint, FamDefaults, FamParams, ModelConfig, RawConfig, TensorStore, CONFIG_LIMITS,
    FAM_LIMITS,
};
use famc::onnx::{self, tensor_proto::DataLocation, DEFAULT_OPSET};
use famc::snapshot::Snapshot;
use famc::stream::TokenReader;
use ndarray::{ArrayD, IxDyn};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{contextualize_config, Config, RngSeed, TestCaseError, TestRunner};
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};

// ---- harness -------------------------------------------------------------------------------

type Check = Result<(), TestCaseError>;

thread_local! {
    /// Whether the current thread is inside [`guard`] (its panics are recorded, not printed).
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The last guarded panic of this thread: location and message.
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Outcomes of the calls [`tally`] saw in the current target: label -> (ok, err).
    static TALLY: RefCell<BTreeMap<String, (u64, u64)>> = const { RefCell::new(BTreeMap::new()) };
    /// With `FUZZ_ERRORS=1`: each error message's start -> count.
    static ERRORS: RefCell<BTreeMap<String, u64>> = const { RefCell::new(BTreeMap::new()) };
}

/// `s` with temporary directory names (`/tmp/.tmpXXXXXX`) replaced by `<tmp>`.
fn untemp(s: &str) -> String {
    let tmp = std::env::temp_dir().join(".tmp").display().to_string();
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(&tmp) {
        out.push_str(&rest[..i]);
        out.push_str("<tmp>");
        rest = &rest[i + tmp.len()..];
        let n = rest.bytes().take_while(u8::is_ascii_alphanumeric).count();
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

/// Counts an API call's outcome, for the target's summary line.
fn tally<T, E: std::fmt::Display>(label: &str, r: &Result<T, E>) {
    TALLY.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry(label.to_string()).or_default();
        if r.is_ok() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    });
    if let Err(e) = r {
        if std::env::var_os("FUZZ_ERRORS").is_some() {
            let text: String = untemp(&format!("{label}: {e}")).chars().take(100).collect();
            ERRORS.with(|m| *m.borrow_mut().entry(text).or_default() += 1);
        }
    }
}

fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic payload>".into())
}

/// Runs `f`, turning a panic into `Err("panicked at file:line:col: message")`.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_else(|| "<unknown location>".into());
                let text = format!("panicked at {at}: {}", payload_text(info.payload()));
                PANIC.with(|p| *p.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    r.map_err(|payload| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| payload_text(&*payload))
    })
}

/// Calls the famc API under [`guard`] and `prop_assert!`s that it did not panic.
macro_rules! call {
    ($what:expr, $e:expr) => {{
        let r = guard(|| $e);
        prop_assert!(
            r.is_ok(),
            "{} panicked: {}",
            $what,
            r.as_ref().err().map(String::as_str).unwrap_or("")
        );
        r.unwrap()
    }};
}

/// Runs one property for `PROPTEST_CASES` (default 256) cases from a fixed seed.
fn run_target<S>(name: &'static str, seed: u64, strategy: S, test: impl Fn(S::Value) -> Check)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = contextualize_config(Config {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        source_file: Some(file!()),
        test_name: Some(name),
        max_shrink_iters: 4096,
        ..Config::default()
    });
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let runs = Cell::new(0u64);
    TALLY.with(|t| t.borrow_mut().clear());
    ERRORS.with(|t| t.borrow_mut().clear());
    let start = Instant::now();
    let result = runner.run(&strategy, |v| {
        runs.set(runs.get() + 1);
        test(v)
    });
    let outcomes = TALLY.with(|t| {
        t.borrow()
            .iter()
            .map(|(k, (ok, err))| format!("{k} {ok} ok/{err} err"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    println!(
        "fuzz target {name}: {cases} cases, {} runs, {:.2?} [{outcomes}]",
        runs.get(),
        start.elapsed()
    );
    ERRORS.with(|m| {
        for (text, n) in m.borrow().iter() {
            println!("  {n:6} x {text}");
        }
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Whether a relative file name stays inside its directory (only normal components).
fn plain_relative(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Deterministic values in [-1, 1) for tensors whose content does not matter.
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

// ---- hostile values ------------------------------------------------------------------------

/// File names and paths a hostile file may name.
const HOSTILE_PATHS: &[&str] = &[
    "../x",
    "../model.safetensors",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/dev/null",
    "/dev/zero",
    "",
    ".",
    "..",
    "./model.safetensors",
    "a/../../b",
    "sub/dir/x",
    "x\u{0}y",
    "..\\..\\x",
    "C:\\x",
    "model.safetensors/",
    "//",
    "~/x",
    "%2e%2e/x",
    "missing.safetensors",
    "\u{fc}n\u{ef}c\u{f8}d\u{e9}",
    "config.json",
];

/// Number-like (and not) texts, for JSON literals, metadata strings and overwritten bytes.
const HOSTILE_NUMBERS: &[&str] = &[
    "-1",
    "0",
    "-0",
    "1e400",
    "-1e400",
    "1e-400",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "4294967295",
    "4294967296",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "Infinity",
    "1.5",
    "0.0",
    "1e3",
    "0x10",
    "+1",
    "1_000",
    " 1",
    "",
    "null",
    "true",
    "[]",
    "{}",
];

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => select(
            &[
                0u64,
                1,
                2,
                u64::MAX,
                u64::MAX - 7,
                i64::MAX as u64,
                1 << 63,
                u32::MAX as u64,
                1 << 32,
                1 << 53,
                usize::MAX as u64 / 4 + 1,
            ][..]
        ),
        2 => 0u64..70_000,
        1 => any::<u64>(),
    ]
}

fn interesting_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        select(
            &[
                0i64,
                1,
                -1,
                i64::MIN,
                i64::MAX,
                -(1 << 32),
                1 << 40,
                4,
                8,
                64
            ][..]
        ),
        -10i64..300,
        any::<i64>(),
    ]
}

fn hostile_number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(HOSTILE_NUMBERS).prop_map(str::to_string),
        1 => interesting_u64().prop_map(|v| v.to_string()),
        1 => (1usize..400).prop_map(|n| format!("1{}", "0".repeat(n))),
        1 => (1usize..300).prop_map(|n| format!("0.{}1", "0".repeat(n))),
    ]
}

// ---- byte mutations ------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum ByteMut {
    Truncate(usize),
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    PutU64(usize, u64),
    PutText(usize, String),
}

/// A mutation at a position mostly inside `0..hot` (the header), else anywhere.
fn byte_mut(hot: usize) -> impl Strategy<Value = ByteMut> {
    let pos = prop_oneof![3 => 0..hot.max(1), 1 => any::<usize>()];
    prop_oneof![
        1 => pos.clone().prop_map(ByteMut::Truncate),
        3 => (pos.clone(), 0u8..8).prop_map(|(p, b)| ByteMut::Flip(p, b)),
        2 => (pos.clone(), any::<u8>()).prop_map(|(p, b)| ByteMut::Set(p, b)),
        1 => (pos.clone(), vec(any::<u8>(), 1..16)).prop_map(|(p, b)| ByteMut::Insert(p, b)),
        1 => (pos.clone(), 1usize..64).prop_map(|(p, n)| ByteMut::Remove(p, n)),
        1 => (pos.clone(), interesting_u64()).prop_map(|(p, v)| ByteMut::PutU64(p, v)),
        1 => (pos, hostile_number_text()).prop_map(|(p, s)| ByteMut::PutText(p, s)),
    ]
}

fn overwrite(b: &mut Vec<u8>, at: usize, src: &[u8]) {
    for (k, &x) in src.iter().enumerate() {
        match b.get_mut(at + k) {
            Some(slot) => *slot = x,
            None => b.push(x),
        }
    }
}

fn apply_bytes(mut b: Vec<u8>, muts: &[ByteMut]) -> Vec<u8> {
    for m in muts {
        let n = b.len();
        let at = |p: usize| p % (n + 1);
        match m {
            ByteMut::Truncate(p) => b.truncate(at(*p)),
            ByteMut::Flip(p, bit) if n > 0 => b[p % n] ^= 1 << bit,
            ByteMut::Set(p, v) if n > 0 => b[p % n] = *v,
            ByteMut::Flip(..) | ByteMut::Set(..) => {}
            ByteMut::Insert(p, bytes) => {
                let i = at(*p);
                b.splice(i..i, bytes.iter().copied());
            }
            ByteMut::Remove(p, len) => {
                let i = at(*p);
                b.drain(i..(i + len).min(n));
            }
            ByteMut::PutU64(p, v) => overwrite(&mut b, at(*p), &v.to_le_bytes()),
            ByteMut::PutText(p, s) => overwrite(&mut b, at(*p), s.as_bytes()),
        }
    }
    b
}

// ---- JSON mutations ------------------------------------------------------------------------

/// A replacement value: a JSON value, or raw text spliced into the serialized document
/// (numbers JSON values cannot hold, deep nesting).
#[derive(Debug, Clone)]
enum Hostile {
    Json(Value),
    Raw(String),
}

fn hostile_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => interesting_u64().prop_map(Value::from),
        2 => interesting_i64().prop_map(Value::from),
        // NaN and infinities become null
        1 => any::<f64>().prop_map(Value::from),
        1 => select(&[0.5f64, -0.0, 1e300, -1e300, f64::MIN_POSITIVE, 1e-7, -1.0][..])
            .prop_map(Value::from),
        1 => select(HOSTILE_PATHS).prop_map(Value::from),
        1 => select(HOSTILE_NUMBERS).prop_map(Value::from),
        1 => "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        3 => hostile_value().prop_map(Hostile::Json),
        1 => hostile_number_text().prop_map(Hostile::Raw),
        1 => (1usize..400).prop_map(|n| Hostile::Raw(format!("{}{}", "[".repeat(n), "]".repeat(n)))),
        1 => (1usize..200).prop_map(|n| {
            Hostile::Raw(format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)))
        }),
    ]
}

#[derive(Debug, Clone)]
enum JsonMut {
    /// Replaces the node at this index (pre-order, the root first).
    Replace(usize, Hostile),
    Remove(usize),
    /// Adds a key to an object node (or an element to an array node).
    Add(usize, String, Hostile),
}

fn json_mut() -> impl Strategy<Value = JsonMut> {
    let key = prop_oneof![
        "[a-z_]{1,12}",
        select(
            &[
                "hidden_size",
                "fam",
                "__metadata__",
                "weight_map",
                "graphs",
                "state"
            ][..]
        )
        .prop_map(str::to_string),
    ];
    prop_oneof![
        5 => (any::<usize>(), hostile()).prop_map(|(i, h)| JsonMut::Replace(i, h)),
        1 => any::<usize>().prop_map(JsonMut::Remove),
        1 => (any::<usize>(), key, hostile()).prop_map(|(i, k, h)| JsonMut::Add(i, k, h)),
    ]
}

fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

fn materialize(h: &Hostile, raws: &mut Vec<String>) -> Value {
    match h {
        Hostile::Json(v) => v.clone(),
        Hostile::Raw(s) => {
            raws.push(s.clone());
            Value::String(format!("\u{1}RAW{}\u{1}", raws.len() - 1))
        }
    }
}

/// Applies JSON mutations to `seed` and serializes the result, splicing raw texts in.
fn mutate_json(seed: &Value, muts: &[JsonMut]) -> String {
    let mut v = seed.clone();
    let mut raws = Vec::new();
    for m in muts {
        let mut ptrs = Vec::new();
        pointers(&v, String::new(), &mut ptrs);
        let (JsonMut::Replace(i, _) | JsonMut::Remove(i) | JsonMut::Add(i, ..)) = m;
        let p = ptrs[i % ptrs.len()].clone();
        match m {
            JsonMut::Replace(_, h) => {
                let new = materialize(h, &mut raws);
                if let Some(slot) = v.pointer_mut(&p) {
                    *slot = new;
                }
            }
            JsonMut::Remove(_) => {
                let Some((parent, last)) = p.rsplit_once('/') else {
                    continue;
                };
                let last = last.replace("~1", "/").replace("~0", "~");
                match v.pointer_mut(parent) {
                    Some(Value::Object(o)) => {
                        o.remove(&last);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = last.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            JsonMut::Add(_, k, h) => {
                let new = materialize(h, &mut raws);
                match v.pointer_mut(&p) {
                    Some(Value::Object(o)) => {
                        o.insert(k.clone(), new);
                    }
                    Some(Value::Array(a)) => a.push(new),
                    _ => {}
                }
            }
        }
    }
    let mut text = serde_json::to_string_pretty(&v).expect("a Value serializes");
    for (i, raw) in raws.iter().enumerate() {
        text = text.replace(&format!("\"\\u0001RAW{i}\\u0001\""), raw);
    }
    text
}

// ---- target 1: safetensors checkpoints, shard indices, Checkpoint::load ------------------------

/// The tiny checkpoint: its safetensors bytes, header and tensors.
struct Seed {
    bytes: Vec<u8>,
    header_len: usize,
    header: Value,
    /// name -> (dtype, shape, data), in name order.
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
}

fn seed_checkpoint() -> Seed {
    let bytes = std::fs::read(repo("tests/data/hf-llama-tiny/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Seed {
        bytes,
        header_len,
        header,
        tensors,
    }
}

fn serialize_tensors(tensors: &[&(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3",
    "F8_E5M2", "C64", "F4", "garbage", "", "f32",
];

fn dtype_size(d: &str) -> Option<u64> {
    Some(match d {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" | "I16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

#[derive(Debug, Clone)]
enum TensorEdit {
    /// New dtype; with `true` the shape is refitted to the byte size so the header validates.
    Dtype(usize, &'static str, bool),
    Shape(usize, Vec<u64>),
    /// Same element count, other shape: 0 flattens, 1 appends a unit axis, 2 reverses the axes.
    Reshape(usize, u8),
    Offsets(usize, u64, u64),
    /// The first tensor takes the second's offsets (overlap).
    CopyOffsets(usize, usize),
    Remove(usize),
    Rename(usize, String),
    Duplicate(usize, String),
    Json(JsonMut),
}

#[derive(Debug, Clone)]
enum LenEdit {
    Exact,
    Delta(i16),
    Value(u64),
}

#[derive(Debug, Clone)]
enum BodyEdit {
    Keep,
    Truncate(usize),
    Append(Vec<u8>),
    Bytes(Vec<ByteMut>),
}

#[derive(Debug, Clone)]
struct HeaderCase {
    edits: Vec<TensorEdit>,
    len: LenEdit,
    body: BodyEdit,
}

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(
            &[
                "model.layers.0.self_attn.q_proj.bias",
                "model.layers.7.mlp.up_proj.weight",
                "model.layers.18446744073709551615.x",
                "model.layers.-1.x",
                "model.layers..x",
                "model.fam_init",
                "lm_head.weight",
                "__metadata__",
                "",
            ][..]
        )
        .prop_map(str::to_string),
        "\\PC{0,40}",
    ]
}

fn header_case(body_len: usize) -> impl Strategy<Value = HeaderCase> {
    let edit = prop_oneof![
        2 => (any::<usize>(), select(DTYPES), any::<bool>())
            .prop_map(|(i, d, f)| TensorEdit::Dtype(i, d, f)),
        2 => (any::<usize>(), vec(interesting_u64(), 0..4)).prop_map(|(i, s)| TensorEdit::Shape(i, s)),
        2 => (any::<usize>(), 0u8..3).prop_map(|(i, k)| TensorEdit::Reshape(i, k)),
        2 => (any::<usize>(), interesting_u64(), interesting_u64())
            .prop_map(|(i, a, b)| TensorEdit::Offsets(i, a, b)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| TensorEdit::CopyOffsets(a, b)),
        1 => any::<usize>().prop_map(TensorEdit::Remove),
        1 => (any::<usize>(), tensor_name()).prop_map(|(i, n)| TensorEdit::Rename(i, n)),
        1 => (any::<usize>(), tensor_name()).prop_map(|(i, n)| TensorEdit::Duplicate(i, n)),
        2 => json_mut().prop_map(TensorEdit::Json),
    ];
    let len = prop_oneof![
        6 => Just(LenEdit::Exact),
        1 => any::<i16>().prop_map(LenEdit::Delta),
        1 => interesting_u64().prop_map(LenEdit::Value),
    ];
    let body = prop_oneof![
        6 => Just(BodyEdit::Keep),
        1 => (0..body_len + 1).prop_map(BodyEdit::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(BodyEdit::Append),
        1 => vec(byte_mut(body_len), 1..4).prop_map(BodyEdit::Bytes),
    ];
    (vec(edit, 1..5), len, body).prop_map(|(edits, len, body)| HeaderCase { edits, len, body })
}

fn tensor_keys(h: &Value) -> Vec<String> {
    h.as_object()
        .map(|o| o.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default()
}

fn apply_header_case(seed: &Seed, case: &HeaderCase) -> Vec<u8> {
    let mut h = seed.header.clone();
    let mut json_text = None;
    for e in &case.edits {
        let keys = tensor_keys(&h);
        let pick = |i: &usize| keys.get(i % keys.len().max(1)).cloned();
        let Some(obj) = h.as_object_mut() else { break };
        match e {
            TensorEdit::Dtype(i, d, refit) => {
                let Some(k) = pick(i) else { continue };
                let Some(t) = obj.get_mut(&k).and_then(Value::as_object_mut) else {
                    continue;
                };
                t.insert("dtype".into(), Value::from(*d));
                let span = t
                    .get("data_offsets")
                    .and_then(|o| Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?)));
                if let (true, Some((a, b)), Some(size)) = (*refit, span, dtype_size(d)) {
                    if b >= a && (b - a) % size == 0 {
                        t.insert("shape".into(), Value::from(vec![(b - a) / size]));
                    }
                }
            }
            TensorEdit::Shape(i, s) => {
                if let Some(t) = pick(i).and_then(|k| obj.get_mut(&k)) {
                    t["shape"] = Value::from(s.clone());
                }
            }
            TensorEdit::Reshape(i, kind) => {
                let Some(t) = pick(i).and_then(|k| obj.get_mut(&k)) else {
                    continue;
                };
                let Some(mut s) = t["shape"].as_array().cloned() else {
                    continue;
                };
                match kind {
                    0 => {
                        let n: u64 = s.iter().filter_map(Value::as_u64).product();
                        s = vec![Value::from(n)];
                    }
                    1 => s.push(Value::from(1)),
                    _ => s.reverse(),
                }
                t["shape"] = Value::Array(s);
            }
            TensorEdit::Offsets(i, a, b) => {
                if let Some(t) = pick(i).and_then(|k| obj.get_mut(&k)) {
                    t["data_offsets"] = Value::from(vec![*a, *b]);
                }
            }
            TensorEdit::CopyOffsets(a, b) => {
                let (Some(ka), Some(kb)) = (pick(a), pick(b)) else {
                    continue;
                };
                let src = obj.get(&kb).map(|t| t["data_offsets"].clone());
                if let (Some(src), Some(t)) = (src, obj.get_mut(&ka)) {
                    t["data_offsets"] = src;
                }
            }
            TensorEdit::Remove(i) => {
                if let Some(k) = pick(i) {
                    obj.remove(&k);
                }
            }
            TensorEdit::Rename(i, n) => {
                if let Some(t) = pick(i).and_then(|k| obj.remove(&k)) {
                    obj.insert(n.clone(), t);
                }
            }
            TensorEdit::Duplicate(i, n) => {
                if let Some(t) = pick(i).and_then(|k| obj.get(&k).cloned()) {
                    obj.insert(n.clone(), t);
                }
            }
            TensorEdit::Json(m) => {
                // a generic edit ends the structured ones: it may splice raw text
                json_text = Some(mutate_json(&h, std::slice::from_ref(m)));
                break;
            }
        }
    }
    let header = json_text
        .map(String::into_bytes)
        .unwrap_or_else(|| serde_json::to_vec(&h).unwrap());
    let n = match case.len {
        LenEdit::Exact => header.len() as u64,
        LenEdit::Delta(d) => (header.len() as i64 + d as i64).max(0) as u64,
        LenEdit::Value(v) => v,
    };
    let mut body = seed.bytes[8 + seed.header_len..].to_vec();
    match &case.body {
        BodyEdit::Keep => {}
        BodyEdit::Truncate(at) => body.truncate(*at),
        BodyEdit::Append(extra) => body.extend_from_slice(extra),
        BodyEdit::Bytes(m) => body = apply_bytes(body, m),
    }
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    out
}

/// Opens the store in `dir` and reads every tensor through the store and the loader.
/// Returns the store's tensors (name -> f32 values) when it opened.
fn open_and_read(dir: &Path) -> Result<Option<BTreeMap<String, Vec<f32>>>, TestCaseError> {
    let opened = call!("TensorStore::open", TensorStore::open(dir));
    tally("open", &opened);
    let Ok(store) = opened else { return Ok(None) };
    let store = Arc::new(store);
    let names: Vec<String> = store.names().map(str::to_string).collect();
    let mut read = BTreeMap::new();
    for name in &names {
        prop_assert!(
            store.contains(name),
            "names() lists `{}`, contains() denies it",
            name
        );
        let shape = store.shape(name);
        prop_assert!(shape.is_some(), "names() lists `{}` without a shape", name);
        let shape = shape.unwrap();
        let got = call!(
            format!("TensorStore::get({name:?})"),
            store.get(name, &shape)
        );
        tally("get", &got);
        if let Ok(a) = &got {
            prop_assert_eq!(a.shape(), &shape[..], "tensor `{}` has another shape", name);
            prop_assert!(
                a.iter().all(|v| v.is_finite()),
                "non-finite value in `{}`",
                name
            );
            read.insert(name.clone(), a.iter().copied().collect::<Vec<f32>>());
        }
        // a wrong expected shape is refused, never reinterpreted
        let mut wrong = shape.clone();
        wrong.push(1);
        let r = call!("TensorStore::get(wrong shape)", store.get(name, &wrong));
        prop_assert!(
            r.is_err(),
            "`{}` read with the wrong shape {:?}",
            name,
            wrong
        );
        let loader = store.root();
        match shape[..] {
            [n] => {
                let v = call!("WeightLoader::vector", loader.vector(name, n));
                if let Ok(v) = v {
                    prop_assert_eq!(v.len(), n);
                }
                let v = call!(
                    "WeightLoader::optional_vector",
                    loader.optional_vector(name, n)
                );
                prop_assert_eq!(v.is_ok(), got.is_ok());
            }
            [r, c] => {
                let m = call!("WeightLoader::matrix", loader.matrix(name, r, c));
                if let Ok(m) = m {
                    prop_assert_eq!(m.dim(), (r, c));
                }
            }
            _ => {}
        }
    }
    prop_assert!(!store.contains("no.such.tensor"));
    let r = call!(
        "TensorStore::get(missing)",
        store.get("no.such.tensor", &[1])
    );
    prop_assert!(r.is_err());
    Ok(Some(read))
}

#[test]
fn fuzz_safetensors_bytes() {
    let seed = seed_checkpoint();
    let hot = 8 + seed.header_len + 64;
    run_target(
        "safetensors_bytes",
        0x5AFE_0001,
        vec(byte_mut(hot), 1..6),
        |muts| {
            let dir = tempdir();
            write(
                &dir.path().join("model.safetensors"),
                &apply_bytes(seed.bytes.clone(), &muts),
            );
            open_and_read(dir.path())?;
            Ok(())
        },
    );
}

#[test]
fn fuzz_safetensors_header() {
    let seed = seed_checkpoint();
    let body_len = seed.bytes.len() - 8 - seed.header_len;
    run_target(
        "safetensors_header",
        0x5AFE_0002,
        header_case(body_len),
        |case| {
            let dir = tempdir();
            write(
                &dir.path().join("model.safetensors"),
                &apply_header_case(&seed, &case),
            );
            open_and_read(dir.path())?;
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
enum Extra {
    Empty,
    Garbage(Vec<u8>),
    Dir,
    EmptyHeader,
    CopyOfFirst,
}

#[derive(Debug, Clone)]
struct ShardCase {
    /// Bit i (mod 64) puts tensor i into the second shard.
    mask: u64,
    /// 0: an index; 1: no index, the shard files alone; 2: no index, model.safetensors too.
    mode: u8,
    /// Start the weight map from the true one.
    true_map: bool,
    entries: Vec<(String, String)>,
    index_json: Vec<JsonMut>,
    index_bytes: Vec<ByteMut>,
    extra: Vec<(String, Extra)>,
}

const SHARD_A: &str = "model-00001-of-00002.safetensors";
const SHARD_B: &str = "model-00002-of-00002.safetensors";

fn shard_case(names: Vec<String>) -> impl Strategy<Value = ShardCase> {
    let name = prop_oneof![3 => select(names), 1 => tensor_name()];
    let file = prop_oneof![
        3 => select(&[SHARD_A, SHARD_B, "model.safetensors"][..]).prop_map(str::to_string),
        2 => select(HOSTILE_PATHS).prop_map(str::to_string),
        1 => select(&[
            "./model-00001-of-00002.safetensors",
            "sub/../model-00001-of-00002.safetensors",
            "model-00001-of-00002.safetensors/",
            "model.safetensors.index.json",
            "x.safetensors",
        ][..])
        .prop_map(str::to_string),
        1 => "[a-z0-9./-]{0,40}",
    ];
    let extra = prop_oneof![
        Just(Extra::Empty),
        vec(any::<u8>(), 0..64).prop_map(Extra::Garbage),
        Just(Extra::Dir),
        Just(Extra::EmptyHeader),
        Just(Extra::CopyOfFirst),
    ];
    (
        any::<u64>(),
        0u8..3,
        prop::bool::weighted(0.8),
        vec((name, file), 0..4),
        prop_oneof![3 => Just(vec![]), 1 => vec(json_mut(), 1..3)],
        prop_oneof![4 => Just(vec![]), 1 => vec(byte_mut(4096), 1..3)],
        vec(("[a-z0-9-]{1,8}\\.safetensors", extra), 0..3),
    )
        .prop_map(
            |(mask, mode, true_map, entries, index_json, index_bytes, extra)| ShardCase {
                mask,
                mode,
                true_map,
                entries,
                index_json,
                index_bytes,
                extra,
            },
        )
}

#[test]
fn fuzz_shard_index() {
    let seed = seed_checkpoint();
    let names: Vec<String> = seed.tensors.iter().map(|t| t.0.clone()).collect();
    let original: BTreeMap<String, Vec<f32>> = seed
        .tensors
        .iter()
        .map(|(n, _, _, b)| {
            let v = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n.clone(), v)
        })
        .collect();
    run_target("shard_index", 0x5AFE_0003, shard_case(names), |case| {
        let dir = tempdir();
        let d = dir.path();
        let (a, b): (Vec<_>, Vec<_>) = seed
            .tensors
            .iter()
            .enumerate()
            .partition(|(i, _)| (case.mask >> (i % 64)) & 1 == 0);
        let a: Vec<_> = a.into_iter().map(|(_, t)| t).collect();
        let b: Vec<_> = b.into_iter().map(|(_, t)| t).collect();
        let shard_a = serialize_tensors(&a);
        write(&d.join(SHARD_A), &shard_a);
        write(&d.join(SHARD_B), &serialize_tensors(&b));
        for (name, extra) in &case.extra {
            let p = d.join(name);
            // a name may repeat: the last kind wins
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
            match extra {
                Extra::Empty => write(&p, b""),
                Extra::Garbage(g) => write(&p, g),
                Extra::Dir => std::fs::create_dir_all(&p).unwrap(),
                Extra::EmptyHeader => write(&p, b"\x02\0\0\0\0\0\0\0{}"),
                Extra::CopyOfFirst => write(&p, &shard_a),
            }
        }
        let mut declared: Option<BTreeMap<String, String>> = None;
        match case.mode {
            0 => {
                let mut map = serde_json::Map::new();
                if case.true_map {
                    for t in &a {
                        map.insert(t.0.clone(), Value::from(SHARD_A));
                    }
                    for t in &b {
                        map.insert(t.0.clone(), Value::from(SHARD_B));
                    }
                }
                for (n, f) in &case.entries {
                    map.insert(n.clone(), Value::from(f.as_str()));
                }
                let index = serde_json::json!({
                    "metadata": {"total_size": 142000},
                    "weight_map": Value::Object(map),
                });
                let text = mutate_json(&index, &case.index_json);
                let bytes = apply_bytes(text.into_bytes(), &case.index_bytes);
                #[derive(serde::Deserialize)]
                struct Index {
                    weight_map: BTreeMap<String, String>,
                }
                declared = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Index>(t).ok())
                    .map(|i| i.weight_map);
                write(&d.join("model.safetensors.index.json"), &bytes);
            }
            1 => {}
            _ => write(&d.join("model.safetensors"), &seed.bytes),
        }
        let Some(read) = open_and_read(d)? else {
            return Ok(());
        };
        if case.mode == 0 {
            prop_assert!(
                declared.is_some(),
                "an index that does not parse was accepted"
            );
        }
        if let Some(declared) = &declared {
            for (name, file) in declared {
                prop_assert!(
                    plain_relative(file),
                    "the index maps `{}` to `{}`, outside the directory, and was accepted",
                    name,
                    file
                );
                prop_assert!(
                    read.contains_key(name),
                    "declared `{}` is not readable",
                    name
                );
            }
        }
        // the shards hold exact copies of the seed's tensors: whatever is read must match
        for (name, values) in &read {
            if let Some(want) = original.get(name) {
                prop_assert!(values == want, "`{}` read back different values", name);
            }
        }
        Ok(())
    });
}

fn check_checkpoint(ck: &Checkpoint) -> Check {
    let c = &ck.config;
    let w = &ck.weights;
    let (d, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    prop_assert_eq!(w.embed_tokens.dim(), (v, d));
    prop_assert_eq!(w.lm_head.is_none(), c.tie_word_embeddings);
    if let Some(h) = &w.lm_head {
        prop_assert_eq!(h.dim(), (v, d));
    }
    prop_assert_eq!(w.output_weight().dim(), (v, d));
    prop_assert_eq!(w.layers.len(), c.num_layers);
    for l in &w.layers {
        prop_assert_eq!(l.input_layernorm.len(), d);
        prop_assert_eq!(l.post_attention_layernorm.len(), d);
        prop_assert_eq!(l.attn.q_proj.dim(), (q, d));
        prop_assert_eq!(l.attn.k_proj.dim(), (kv, d));
        prop_assert_eq!(l.attn.v_proj.dim(), (kv, d));
        prop_assert_eq!(l.attn.o_proj.dim(), (d, q));
        for (b, n) in [
            (&l.attn.q_bias, q),
            (&l.attn.k_bias, kv),
            (&l.attn.v_bias, kv),
            (&l.attn.o_bias, d),
        ] {
            if let Some(b) = b {
                prop_assert_eq!(b.len(), n);
            }
        }
        prop_assert_eq!(l.mlp.gate_proj.dim(), (i, d));
        prop_assert_eq!(l.mlp.up_proj.dim(), (i, d));
        prop_assert_eq!(l.mlp.down_proj.dim(), (d, i));
        prop_assert!(l.attn.q_proj.iter().all(|x| x.is_finite()));
    }
    prop_assert_eq!(w.norm.len(), d);
    if let Some(f) = &w.fam_init {
        prop_assert_eq!(f.ncols(), d);
    }
    prop_assert!(w.embed_tokens.iter().all(|x| x.is_finite()));
    prop_assert_eq!(ck.hash.len(), 64);
    let fam = call!(
        "Checkpoint::fam_params",
        ck.fam_params(FamDefaults::default())
    );
    if let Ok(p) = fam {
        check_fam(&p)?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum StMut {
    Keep,
    Bytes(Vec<ByteMut>),
    Header(HeaderCase),
}

#[test]
fn fuzz_checkpoint_load() {
    let seed = seed_checkpoint();
    let config: Value = serde_json::from_slice(
        &std::fs::read(repo("tests/data/hf-llama-tiny/config.json")).unwrap(),
    )
    .unwrap();
    let hot = 8 + seed.header_len + 64;
    let body_len = seed.bytes.len() - 8 - seed.header_len;
    let st = prop_oneof![
        1 => Just(StMut::Keep),
        2 => vec(byte_mut(hot), 1..5).prop_map(StMut::Bytes),
        3 => header_case(body_len).prop_map(StMut::Header),
    ];
    let cfg = prop_oneof![3 => Just(vec![]), 1 => vec(json_mut(), 1..3)];
    run_target("checkpoint_load", 0x5AFE_0004, (st, cfg), |(st, cfg)| {
        let dir = tempdir();
        let d = dir.path();
        let bytes = match &st {
            StMut::Keep => seed.bytes.clone(),
            StMut::Bytes(m) => apply_bytes(seed.bytes.clone(), m),
            StMut::Header(h) => apply_header_case(&seed, h),
        };
        write(&d.join("model.safetensors"), &bytes);
        write(
            &d.join("config.json"),
            mutate_json(&config, &cfg).as_bytes(),
        );
        let ck = call!("Checkpoint::load", Checkpoint::load(d));
        tally("Checkpoint::load", &ck);
        if let Ok(ck) = &ck {
            check_checkpoint(ck)?;
        }
        Ok(())
    });
}

#[test]
fn checkpoint_seed_loads() {
    // the seeds the mutations start from are valid, so the targets explore past the first check
    let ck = Checkpoint::load(&repo("tests/data/hf-llama-tiny")).unwrap();
    check_checkpoint(&ck).unwrap();
}

// ---- target 2: config.json -----------------------------------------------------------------

fn limit(field: &str) -> usize {
    CONFIG_LIMITS.iter().find(|(f, _)| *f == field).unwrap().1
}

fn check_fam(p: &FamParams) -> Check {
    prop_assert!(p.block_len >= 1 && p.block_len <= FAM_LIMITS[0].1);
    prop_assert!(p.fam_len <= FAM_LIMITS[1].1);
    prop_assert!(p.mem_blocks <= FAM_LIMITS[2].1);
    let m = call!("FamParams::mem_len", p.mem_len());
    prop_assert!(m <= FAM_LIMITS[3].1);
    prop_assert!(call!("FamParams::validate", p.validate()).is_ok());
    Ok(())
}

fn check_config(c: &ModelConfig, path: &Path) -> Check {
    for (field, v) in [
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_layers),
        ("num_attention_heads", c.num_heads),
        ("num_key_value_heads", c.num_kv_heads),
        ("intermediate_size", c.intermediate_size),
        ("vocab_size", c.vocab_size),
    ] {
        prop_assert!(v >= 1 && v <= limit(field), "{} = {} accepted", field, v);
    }
    prop_assert!(c.head_dim >= 1 && c.head_dim <= limit("head_dim").max(limit("hidden_size")));
    prop_assert!(c.head_dim.is_multiple_of(2), "odd head_dim {}", c.head_dim);
    prop_assert!(c.num_heads.is_multiple_of(c.num_kv_heads));
    prop_assert!(call!("ModelConfig::group_size", c.group_size()) >= 1);
    prop_assert!(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0);
    prop_assert!(c.rope_theta.is_finite() && c.rope_theta > 0.0);
    // the sizes famc derives from it fit
    prop_assert!(c.num_heads.checked_mul(c.head_dim).is_some());
    prop_assert!(c.vocab_size.checked_mul(c.hidden_size).is_some());
    prop_assert!(c.intermediate_size.checked_mul(c.hidden_size).is_some());
    for rows in [None, Some(0), Some(4), Some(usize::MAX)] {
        let p = call!(
            "FamParams::resolve",
            FamParams::resolve(FamDefaults::default(), c.fam, rows, path)
        );
        if let Ok(p) = p {
            check_fam(&p)?;
            if let Some(r) = rows {
                prop_assert_eq!(p.fam_len, r);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_config_json() {
    let seed_text = std::fs::read_to_string(repo("tests/data/hf-llama-tiny/config.json")).unwrap();
    let mut seed: Value = serde_json::from_str(&seed_text).unwrap();
    seed["fam"] = serde_json::json!({"block_len": 16, "fam_len": 4, "mem_blocks": 2});
    let n = seed_text.len();
    let strategy = (
        vec(json_mut(), 0..6),
        prop_oneof![4 => Just(vec![]), 1 => vec(byte_mut(n), 1..3)],
    );
    run_target("config_json", 0xC0F1_0001, strategy, |(jm, bm)| {
        let dir = tempdir();
        let path = dir.path().join("config.json");
        let bytes = apply_bytes(mutate_json(&seed, &jm).into_bytes(), &bm);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let raw = call!(
            "serde_json::from_str::<RawConfig>",
            serde_json::from_str::<RawConfig>(&text)
        );
        tally("RawConfig", &raw);
        let resolved = match raw {
            Ok(raw) => {
                let r = call!("ModelConfig::resolve", ModelConfig::resolve(raw, &path));
                tally("resolve", &r);
                if let Ok(c) = &r {
                    check_config(c, &path)?;
                }
                Some(r)
            }
            Err(_) => None,
        };
        write(&path, &bytes);
        let from_file = call!("ModelConfig::from_file", ModelConfig::from_file(&path));
        tally("from_file", &from_file);
        if let Ok(c) = &from_file {
            check_config(c, &path)?;
        }
        if std::str::from_utf8(&bytes).is_ok() {
            let a = resolved.as_ref().and_then(|r| r.as_ref().ok());
            prop_assert_eq!(
                a,
                from_file.as_ref().ok(),
                "from_file disagrees with resolve"
            );
        } else {
            prop_assert!(from_file.is_err(), "non-UTF-8 config.json accepted");
        }
        Ok(())
    });
}

// ---- target 3: famc.json manifests and export directories ----------------------------------

const GRAPH_FILES: &[&str] = &["block.onnx", "init.onnx", "decode.onnx", "fam_kv.onnx"];

#[derive(Debug, Clone)]
enum GraphEdit {
    DropInput(usize),
    RenameInput(usize, String),
    SetDim(usize, usize, i64),
    SetSymbolic(usize, usize),
    ClearShape(usize),
    DropOutput(usize),
    DropLogitsShape,
    ClearGraph,
    DropMetadata,
    /// Mutates the embedded manifest (`famc.manifest` metadata).
    Metadata(Vec<JsonMut>),
}

#[derive(Debug, Clone)]
struct ManifestCase {
    json: Vec<JsonMut>,
    /// Points graphs.block (0) or graphs.init (1) at a hostile name.
    graph_name: Option<(u8, String)>,
    /// Writes a mutated copy of block (0) or init (1) as `mut.onnx` and points the manifest at it.
    graph: Option<(u8, Vec<GraphEdit>, Vec<ByteMut>)>,
    text_bytes: Vec<ByteMut>,
    /// Rewrites the graphs' embedded manifests and famc.json's sizes and hashes to agree with
    /// the mutated manifest (when it still parses), so the checks behind them are reached.
    resync: bool,
}

fn manifest_case() -> impl Strategy<Value = ManifestCase> {
    let graph_edit = prop_oneof![
        1 => any::<usize>().prop_map(GraphEdit::DropInput),
        1 => (any::<usize>(), "[a-z_.0-9]{0,12}").prop_map(|(i, n)| GraphEdit::RenameInput(i, n)),
        3 => (any::<usize>(), any::<usize>(), interesting_i64())
            .prop_map(|(i, d, v)| GraphEdit::SetDim(i, d, v)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, d)| GraphEdit::SetSymbolic(i, d)),
        1 => any::<usize>().prop_map(GraphEdit::ClearShape),
        1 => any::<usize>().prop_map(GraphEdit::DropOutput),
        1 => Just(GraphEdit::DropLogitsShape),
        1 => Just(GraphEdit::ClearGraph),
        1 => Just(GraphEdit::DropMetadata),
        2 => vec(json_mut(), 1..3).prop_map(GraphEdit::Metadata),
    ];
    let name = prop_oneof![
        select(HOSTILE_PATHS).prop_map(str::to_string),
        select(GRAPH_FILES).prop_map(str::to_string),
        Just("generation_config.json".to_string()),
        Just(repo("graphs/tiny-fam/block.onnx").display().to_string()),
        Just("../tiny-fam/block.onnx".to_string()),
        Just("famc.json".to_string()),
    ];
    (
        vec(json_mut(), 0..4),
        prop::option::weighted(0.25, (0u8..2, name)),
        prop::option::weighted(
            0.4,
            (
                0u8..2,
                vec(graph_edit, 0..3),
                prop_oneof![2 => Just(vec![]), 1 => vec(byte_mut(2048), 1..4)],
            ),
        ),
        prop_oneof![5 => Just(vec![]), 1 => vec(byte_mut(1800), 1..3)],
        prop::bool::weighted(0.6),
    )
        .prop_map(
            |(json, graph_name, graph, text_bytes, resync)| ManifestCase {
                json,
                graph_name,
                graph,
                text_bytes,
                resync,
            },
        )
}

fn edit_graph(m: &mut onnx::ModelProto, edits: &[GraphEdit]) {
    use onnx::tensor_shape_proto::dimension::Value as D;
    use onnx::type_proto::Value as T;
    for e in edits {
        let Some(g) = m.graph.as_mut() else { return };
        let n_in = g.input.len().max(1);
        fn dims(
            vi: &mut onnx::ValueInfoProto,
        ) -> Option<&mut Vec<onnx::tensor_shape_proto::Dimension>> {
            match vi.r#type.as_mut()?.value.as_mut()? {
                T::TensorType(t) => Some(&mut t.shape.as_mut()?.dim),
                _ => None,
            }
        }
        match e {
            GraphEdit::DropInput(i) if !g.input.is_empty() => {
                g.input.remove(i % n_in);
            }
            GraphEdit::RenameInput(i, n) => {
                if let Some(vi) = g.input.get_mut(i % n_in) {
                    vi.name = n.clone();
                }
            }
            GraphEdit::SetDim(i, d, v) => {
                if let Some(ds) = g.input.get_mut(i % n_in).and_then(dims) {
                    let k = d % ds.len().max(1);
                    if let Some(dim) = ds.get_mut(k) {
                        dim.value = Some(D::DimValue(*v));
                    }
                }
            }
            GraphEdit::SetSymbolic(i, d) => {
                if let Some(ds) = g.input.get_mut(i % n_in).and_then(dims) {
                    let k = d % ds.len().max(1);
                    if let Some(dim) = ds.get_mut(k) {
                        dim.value = Some(D::DimParam("n".into()));
                    }
                }
            }
            GraphEdit::ClearShape(i) => {
                if let Some(vi) = g.input.get_mut(i % n_in) {
                    vi.r#type = None;
                }
            }
            GraphEdit::DropOutput(i) if !g.output.is_empty() => {
                let k = i % g.output.len();
                g.output.remove(k);
            }
            GraphEdit::DropLogitsShape => {
                if let Some(o) = g.output.first_mut() {
                    o.r#type = None;
                }
            }
            GraphEdit::ClearGraph => m.graph = None,
            GraphEdit::DropMetadata => m.metadata_props.clear(),
            GraphEdit::Metadata(muts) => {
                let have = m
                    .metadata_props
                    .iter()
                    .find(|p| p.key == EMBEDDED)
                    .and_then(|p| serde_json::from_str::<Value>(&p.value).ok())
                    .unwrap_or(Value::Null);
                set_embedded(m, mutate_json(&have, muts));
            }
            GraphEdit::DropInput(_) | GraphEdit::DropOutput(_) => {}
        }
    }
}

const EMBEDDED: &str = "famc.manifest";

fn set_embedded(m: &mut onnx::ModelProto, text: String) {
    match m.metadata_props.iter_mut().find(|p| p.key == EMBEDDED) {
        Some(p) => p.value = text,
        None => m.metadata_props.push(onnx::StringStringEntryProto {
            key: EMBEDDED.into(),
            value: text,
        }),
    }
}

fn file_entry(bytes: &[u8]) -> famc::export::FileEntry {
    famc::export::FileEntry {
        bytes: bytes.len() as u64,
        sha256: famc::model::hex(&Sha256::digest(bytes)),
    }
}

#[test]
fn fuzz_manifest() {
    let src = repo("graphs/tiny-fam");
    let seed_text = std::fs::read(src.join("famc.json")).unwrap();
    let seed: Value = serde_json::from_slice(&seed_text).unwrap();
    let seed_manifest: Manifest = serde_json::from_slice(&seed_text).unwrap();
    // every file the export lists, in memory; the graphs also decoded
    let files: BTreeMap<String, Vec<u8>> = seed_manifest
        .files
        .keys()
        .map(|f| (f.clone(), std::fs::read(src.join(f)).unwrap()))
        .collect();
    let graphs: BTreeMap<String, onnx::ModelProto> = files
        .iter()
        .filter(|(f, _)| f.ends_with(".onnx"))
        .map(|(f, b)| (f.clone(), onnx::ModelProto::decode(b.as_slice()).unwrap()))
        .collect();
    let field = |w: u8| if w == 0 { "block" } else { "init" };
    let seed_graph = |w: u8| {
        let name = if w == 0 {
            &seed_manifest.graphs.block
        } else {
            seed_manifest.graphs.init.as_ref().unwrap()
        };
        graphs[name].clone()
    };
    run_target("manifest", 0xFA3C_0001, manifest_case(), |case| {
        let dir = tempdir();
        let d = dir.path();
        for (f, b) in &files {
            write(&d.join(f), b);
        }
        let mut v = seed.clone();
        let mut mutated_graph = None;
        if let Some((which, edits, bytes)) = &case.graph {
            v["graphs"][field(*which)] = Value::from("mut.onnx");
            mutated_graph = Some((seed_graph(*which), edits, bytes));
        }
        let write_mutated = |g: &onnx::ModelProto| -> Vec<u8> {
            let (_, edits, bytes) = mutated_graph.as_ref().unwrap();
            let mut g = g.clone();
            edit_graph(&mut g, edits);
            let b = apply_bytes(g.encode_to_vec(), bytes);
            write(&d.join("mut.onnx"), &b);
            b
        };
        if let (Some((g, ..)), false) = (&mutated_graph, case.resync) {
            let b = write_mutated(g);
            v["files"]["mut.onnx"] = serde_json::to_value(file_entry(&b)).unwrap();
        }
        if let Some((which, name)) = &case.graph_name {
            v["graphs"][field(*which)] = Value::from(name.as_str());
        }
        let mut text = mutate_json(&v, &case.json);
        if case.resync {
            if let Ok(mut m) = serde_json::from_str::<Manifest>(&text) {
                let embedded = serde_json::to_string(&m.embedded()).unwrap();
                let named = [
                    Some(m.graphs.block.clone()),
                    m.graphs.init.clone(),
                    m.graphs.decode.clone(),
                    m.graphs.fam_kv.clone(),
                ];
                for name in named.into_iter().flatten() {
                    let bytes = if name == "mut.onnx" {
                        let Some((g, ..)) = &mutated_graph else {
                            continue;
                        };
                        let mut g = g.clone();
                        set_embedded(&mut g, embedded.clone());
                        write_mutated(&g)
                    } else if let Some(g) = graphs.get(&name) {
                        let mut g = g.clone();
                        set_embedded(&mut g, embedded.clone());
                        let b = g.encode_to_vec();
                        write(&d.join(&name), &b);
                        b
                    } else {
                        continue;
                    };
                    m.files.insert(name, file_entry(&bytes));
                }
                text = serde_json::to_string_pretty(&m).unwrap();
            }
        }
        let text = apply_bytes(text.into_bytes(), &case.text_bytes);
        write(&d.join("famc.json"), &text);
        let read = call!("Manifest::read", Manifest::read(d));
        tally("Manifest::read", &read);
        if let Ok(m) = &read {
            prop_assert_eq!(m.format_version, famc::export::FORMAT_VERSION);
            prop_assert!(call!("FamParams::validate", m.fam.validate()).is_ok());
            let graph_names = [
                Some(&m.graphs.block),
                m.graphs.init.as_ref(),
                m.graphs.decode.as_ref(),
                m.graphs.fam_kv.as_ref(),
            ];
            for name in graph_names.into_iter().flatten().chain(m.files.keys()) {
                prop_assert!(
                    plain_relative(name) && !name.contains('/'),
                    "famc.json names `{}`, outside the export directory, and was read",
                    name
                );
            }
        }
        let opened = call!("ExportDir::open", ExportDir::open(d));
        tally("ExportDir::open", &opened);
        if let Ok(e) = &opened {
            prop_assert!(
                read.is_ok(),
                "ExportDir opened a manifest Manifest::read refuses"
            );
            prop_assert!(Some(&e.manifest) == read.as_ref().ok());
            prop_assert!(
                e.block_path().is_file(),
                "block graph {:?} is not a file",
                e.block_path()
            );
            if e.manifest.fam.fam_len > 0 {
                prop_assert!(e.init_path().is_some_and(|p| p.is_file()));
            }
            let verified = call!("ExportDir::verify", e.verify());
            tally("ExportDir::verify", &verified);
        }
        Ok(())
    });
}

#[test]
fn manifest_seed_opens() {
    ExportDir::open(&repo("graphs/tiny-fam")).unwrap();
}

// ---- target 4: stream snapshots ------------------------------------------------------------

fn tiny_manifest() -> Manifest {
    Manifest::read(&repo("graphs/tiny-fam")).unwrap()
}

fn states(m: &Manifest, seed: u64) -> Vec<ArrayD<f32>> {
    m.state
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.shape.iter().product();
            ArrayD::from_shape_vec(IxDyn(&s.shape), fill(n, seed ^ i as u64)).unwrap()
        })
        .collect()
}

/// A snapshot a scorer could have saved: τ full blocks, up to L pending tokens.
#[derive(Debug, Clone)]
struct ValidSnap {
    block_index: usize,
    pending: Vec<u32>,
    nll_sum: f64,
    fill: u64,
}

fn valid_snap(m: &Manifest) -> impl Strategy<Value = ValidSnap> {
    let l = m.fam.block_len;
    let max_tau = (i64::MAX as usize - l) / l;
    (
        prop_oneof![4 => 0usize..1000, 1 => Just(max_tau), 1 => 0..max_tau],
        vec(0..m.model.vocab_size as u32, 0..=l),
        prop_oneof![Just(0.0f64), 0.0f64..1e9, Just(f64::MAX)],
        any::<u64>(),
    )
        .prop_map(|(block_index, pending, nll_sum, fill)| ValidSnap {
            block_index,
            pending,
            nll_sum,
            fill,
        })
}

fn build_valid(m: &Manifest, v: &ValidSnap) -> Snapshot {
    let done = (v.block_index * m.fam.block_len) as u64;
    Snapshot {
        block_index: v.block_index,
        state: states(m, v.fill),
        pending: v.pending.clone(),
        nll_sum: v.nll_sum,
        scored: done,
        tokens_read: done + v.pending.len() as u64,
    }
}

fn check_snapshot(s: &Snapshot, m: &Manifest) -> Check {
    let l = m.fam.block_len;
    prop_assert_eq!(s.state.len(), m.state.len());
    for (a, st) in s.state.iter().zip(&m.state) {
        prop_assert_eq!(a.shape(), &st.shape[..], "state `{}`", st.input);
        prop_assert!(a.iter().all(|v| v.is_finite()));
    }
    prop_assert!(s.pending.len() <= l);
    prop_assert!(s.pending.iter().all(|&t| (t as usize) < m.model.vocab_size));
    prop_assert!(s.nll_sum.is_finite() && s.nll_sum >= 0.0);
    let done = (s.block_index as u64).checked_mul(l as u64);
    prop_assert_eq!(done, Some(s.scored));
    prop_assert!(s.scored + l as u64 <= i64::MAX as u64);
    prop_assert_eq!(s.tokens_read, s.scored + s.pending.len() as u64);
    Ok(())
}

#[test]
fn fuzz_snapshot_bytes() {
    let m = tiny_manifest();
    run_target(
        "snapshot_bytes",
        0x5A45_0001,
        (valid_snap(&m), vec(byte_mut(1200), 1..5)),
        |(v, muts)| {
            let dir = tempdir();
            let path = dir.path().join("state.safetensors");
            let snap = build_valid(&m, &v);
            let saved = call!("Snapshot::save", snap.save(&path, &m));
            prop_assert!(
                saved.is_ok(),
                "a valid snapshot failed to save: {:?}",
                saved.err()
            );
            let back = call!("Snapshot::load", Snapshot::load(&path, &m));
            prop_assert!(
                back.is_ok(),
                "a valid snapshot failed to load: {:?}",
                back.err()
            );
            prop_assert!(back.unwrap() == snap, "a valid snapshot did not round-trip");
            let bytes = apply_bytes(std::fs::read(&path).unwrap(), &muts);
            write(&path, &bytes);
            let loaded = call!("Snapshot::load(mutated)", Snapshot::load(&path, &m));
            tally("load", &loaded);
            if let Ok(s) = &loaded {
                check_snapshot(s, &m)?;
            }
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
enum StateEdit {
    Drop(usize),
    Extra,
    Reshape(usize, Vec<usize>),
    Poison(usize, usize, f32),
}

#[derive(Debug, Clone)]
struct ForgedSnap {
    block_index: usize,
    pending: Vec<u32>,
    nll_sum: f64,
    /// Scored and read counts consistent with `block_index` (wrapping), else these.
    counts: Option<(u64, u64)>,
    state: Option<StateEdit>,
    fill: u64,
}

fn forged_snap(m: &Manifest) -> impl Strategy<Value = ForgedSnap> {
    let l = m.fam.block_len;
    let block_index = prop_oneof![
        select(
            &[
                usize::MAX,
                usize::MAX / 16,
                i64::MAX as usize,
                (i64::MAX as usize) / 16,
                (i64::MAX as usize) / 16 + 1,
                (i64::MAX as usize - 16) / 16 + 1,
                (i64::MAX as usize - 16) / 16,
                0,
            ][..]
        ),
        any::<usize>(),
        0usize..100,
    ];
    let pending = prop_oneof![
        4 => vec(0u32..m.model.vocab_size as u32, 0..=l),
        1 => vec(any::<u32>(), 0..2 * l + 2),
        1 => vec(Just(u32::MAX), 0..3),
        1 => (l + 1..4 * l).prop_map(|n| vec![0u32; n]),
    ];
    let nll = prop_oneof![
        select(
            &[
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -1.0,
                -0.0,
                0.0,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                -f64::MIN_POSITIVE,
            ][..]
        ),
        any::<f64>(),
    ];
    let state = prop::option::weighted(
        0.3,
        prop_oneof![
            any::<usize>().prop_map(StateEdit::Drop),
            Just(StateEdit::Extra),
            (any::<usize>(), vec(0usize..70, 0..4)).prop_map(|(i, s)| StateEdit::Reshape(i, s)),
            (
                any::<usize>(),
                any::<usize>(),
                select(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX][..])
            )
                .prop_map(|(i, p, v)| StateEdit::Poison(i, p, v)),
        ],
    );
    (
        block_index,
        pending,
        nll,
        prop::option::weighted(0.5, (interesting_u64(), interesting_u64())),
        state,
        any::<u64>(),
    )
        .prop_map(
            |(block_index, pending, nll_sum, counts, state, fill)| ForgedSnap {
                block_index,
                pending,
                nll_sum,
                counts,
                state,
                fill,
            },
        )
}

#[test]
fn fuzz_snapshot_forged() {
    let m = tiny_manifest();
    let l = m.fam.block_len as u64;
    run_target("snapshot_forged", 0x5A45_0002, forged_snap(&m), |f| {
        let dir = tempdir();
        let path = dir.path().join("state.safetensors");
        let mut state = states(&m, f.fill);
        match &f.state {
            None => {}
            Some(StateEdit::Drop(i)) => {
                state.remove(i % state.len());
            }
            Some(StateEdit::Extra) => state.push(ArrayD::zeros(IxDyn(&[1]))),
            Some(StateEdit::Reshape(i, s)) => {
                let k = i % state.len();
                state[k] = ArrayD::zeros(IxDyn(s));
            }
            Some(StateEdit::Poison(i, p, v)) => {
                let k = i % state.len();
                let n = state[k].len();
                if let Some(x) = state[k].iter_mut().nth(p % n) {
                    *x = *v;
                }
            }
        }
        let done = (f.block_index as u64).wrapping_mul(l);
        let (scored, tokens_read) = f
            .counts
            .unwrap_or((done, done.wrapping_add(f.pending.len() as u64)));
        let snap = Snapshot {
            block_index: f.block_index,
            state,
            pending: f.pending.clone(),
            nll_sum: f.nll_sum,
            scored,
            tokens_read,
        };
        let saved = call!("Snapshot::save", snap.save(&path, &m));
        tally("save", &saved);
        if saved.is_err() {
            return Ok(());
        }
        let loaded = call!("Snapshot::load(forged)", Snapshot::load(&path, &m));
        tally("load", &loaded);
        if let Ok(s) = &loaded {
            check_snapshot(s, &m)?;
            prop_assert!(*s == snap, "the snapshot loaded differs from the one saved");
        }
        Ok(())
    });
}

const SNAPSHOT_KEYS: &[&str] = &[
    "format",
    "version",
    "checkpoint_sha256",
    "block_len",
    "fam_len",
    "mem_blocks",
    "dtype",
    "block_index",
    "pending",
    "nll_sum",
    "scored",
    "tokens_read",
    "checksum",
];

#[derive(Debug, Clone)]
enum MetaEdit {
    Set(&'static str, String),
    Remove(&'static str),
    Add(String, String),
}

#[derive(Debug, Clone)]
enum TensorForge {
    Drop(usize),
    Extra(String),
    ToF16(usize),
    Flatten(usize),
    Poison(usize, usize, f32),
}

#[derive(Debug, Clone)]
struct MetaCase {
    base: ValidSnap,
    meta: Vec<MetaEdit>,
    tensors: Vec<TensorForge>,
    stale_checksum: bool,
}

fn meta_case(m: &Manifest) -> impl Strategy<Value = MetaCase> {
    let value = prop_oneof![
        3 => hostile_number_text(),
        1 => "\\PC{0,30}",
        1 => vec(any::<u32>(), 0..40).prop_map(|v| {
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        }),
        1 => vec(0u32..300, 0..40).prop_map(|v| {
            v.iter().map(u32::to_string).collect::<Vec<_>>().join("\u{3000}")
        }),
        1 => select(&["famc-stream-state", "1", "2", "f16", "bf16", "f32", "16", "4"][..])
            .prop_map(str::to_string),
    ];
    let edit = prop_oneof![
        4 => (select(SNAPSHOT_KEYS), value.clone()).prop_map(|(k, v)| MetaEdit::Set(k, v)),
        1 => select(SNAPSHOT_KEYS).prop_map(MetaEdit::Remove),
        1 => ("\\PC{0,12}", value).prop_map(|(k, v)| MetaEdit::Add(k, v)),
    ];
    let tensor = prop_oneof![
        any::<usize>().prop_map(TensorForge::Drop),
        prop_oneof![Just("fam.0".to_string()), "\\PC{0,12}"].prop_map(TensorForge::Extra),
        any::<usize>().prop_map(TensorForge::ToF16),
        any::<usize>().prop_map(TensorForge::Flatten),
        (
            any::<usize>(),
            any::<usize>(),
            select(&[f32::NAN, f32::INFINITY][..])
        )
            .prop_map(|(i, p, v)| TensorForge::Poison(i, p, v)),
    ];
    (
        valid_snap(m),
        vec(edit, 0..4),
        prop_oneof![3 => Just(vec![]), 1 => vec(tensor, 1..3)],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(base, meta, tensors, stale_checksum)| MetaCase {
            base,
            meta,
            tensors,
            stale_checksum,
        })
}

/// The snapshot checksum, as famc computes it (reimplemented to forge valid-looking files).
fn snapshot_checksum(
    meta: &BTreeMap<String, String>,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> String {
    let mut h = Sha256::new();
    for (k, v) in meta {
        if k != "checksum" {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
    }
    for (name, shape, bytes) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{shape:?}").as_bytes());
        h.update(bytes);
    }
    famc::model::hex(&h.finalize())
}

#[test]
fn fuzz_snapshot_metadata() {
    let m = tiny_manifest();
    run_target("snapshot_metadata", 0x5A45_0003, meta_case(&m), |case| {
        let dir = tempdir();
        let path = dir.path().join("state.safetensors");
        build_valid(&m, &case.base).save(&path, &m).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|h| h.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for e in &case.meta {
            match e {
                MetaEdit::Set(k, v) => {
                    meta.insert(k.to_string(), v.clone());
                }
                MetaEdit::Remove(k) => {
                    meta.remove(*k);
                }
                MetaEdit::Add(k, v) => {
                    meta.insert(k.clone(), v.clone());
                }
            }
        }
        for e in &case.tensors {
            let n = tensors.len().max(1);
            match e {
                TensorForge::Drop(i) if !tensors.is_empty() => {
                    tensors.remove(i % n);
                }
                TensorForge::Extra(name) => {
                    tensors.retain(|t| &t.0 != name);
                    tensors.push((name.clone(), safetensors::Dtype::F32, vec![1], vec![0; 4]));
                }
                TensorForge::ToF16(i) => {
                    if let Some(t) = tensors
                        .get_mut(i % n)
                        .filter(|t| t.1 == safetensors::Dtype::F32)
                    {
                        t.1 = safetensors::Dtype::F16;
                        if let Some(last) = t.2.last_mut() {
                            *last *= 2;
                        }
                    }
                }
                TensorForge::Flatten(i) => {
                    if let Some(t) = tensors.get_mut(i % n) {
                        t.2 = vec![t.2.iter().product()];
                    }
                }
                TensorForge::Poison(i, p, v) => {
                    if let Some(t) = tensors.get_mut(i % n) {
                        let k = (p % (t.3.len() / 4).max(1)) * 4;
                        if t.3.len() >= k + 4 {
                            t.3[k..k + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                TensorForge::Drop(_) => {}
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if !case.stale_checksum {
            let plain: Vec<_> = tensors
                .iter()
                .map(|(n, _, s, b)| (n.clone(), s.clone(), b.clone()))
                .collect();
            let sum = snapshot_checksum(&meta, &plain);
            meta.insert("checksum".into(), sum);
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let meta_map: HashMap<String, String> = meta.into_iter().collect();
        write(
            &path,
            &safetensors::serialize(views, Some(meta_map)).unwrap(),
        );
        let loaded = call!("Snapshot::load(forged metadata)", Snapshot::load(&path, &m));
        tally("load", &loaded);
        if let Ok(s) = &loaded {
            check_snapshot(s, &m)?;
        }
        Ok(())
    });
}

// ---- target 5: token-id readers ------------------------------------------------------------

/// Every separator but the last three is whitespace (ASCII and Unicode).
const SEPARATORS: &[&str] = &[
    " ", "\n", "\t", "\r\n", "  ", "\u{0B}", "\u{0C}", "\u{85}", "\u{A0}", "\u{1680}", "\u{2000}",
    "\u{2007}", "\u{2028}", "\u{2029}", "\u{202F}", "\u{205F}", "\u{3000}",
    // not whitespace: these join words
    "\u{200B}", "\u{FEFF}", "\u{0}",
];

fn whitespace() -> impl Strategy<Value = &'static str> {
    select(&SEPARATORS[..SEPARATORS.len() - 3])
}

/// A word the oracle accepts for vocabularies of 256 or more.
fn id_word() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u64..256).prop_map(|v| v.to_string()),
        1 => (1usize..70, 0u64..256).prop_map(|(z, v)| format!("{}{v}", "0".repeat(z))),
        1 => (0u64..256).prop_map(|v| format!("+{v}")),
    ]
}

fn token_word() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u64..300).prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => interesting_u64().prop_map(|v| v.to_string()),
        2 => select(
            &[
                "18446744073709551615",
                "18446744073709551616",
                "99999999999999999999999",
                "-1",
                "+5",
                "+",
                "-0",
                "0x1f",
                "1e3",
                "1.0",
                "\u{663}",
                "\u{FF11}\u{FF12}",
                "4294967296",
                "255",
                "256",
                "\u{0}",
                "\u{1F600}",
            ][..]
        )
        .prop_map(str::to_string),
        1 => (1usize..100, 0u64..300).prop_map(|(z, v)| format!("{}{v}", "0".repeat(z))),
        1 => "\\PC{1,8}",
        1 => (40usize..200).prop_map(|n| "1".repeat(n)),
    ]
}

#[derive(Debug, Clone)]
struct TokenCase {
    lead: &'static str,
    words: Vec<(String, &'static str)>,
    corrupt: Vec<ByteMut>,
    vocab: usize,
    /// Sizes of the successive reads the reader is served (cycled).
    reads: Vec<usize>,
}

fn token_case() -> impl Strategy<Value = TokenCase> {
    (
        select(SEPARATORS),
        prop_oneof![
            1 => vec((id_word(), whitespace()), 0..80),
            1 => vec((token_word(), select(SEPARATORS)), 0..40),
        ],
        prop_oneof![6 => Just(vec![]), 1 => vec(byte_mut(256), 1..3)],
        prop_oneof![4 => Just(256usize), 2 => 0usize..400, 1 => Just(1usize << 24), 1 => Just(1usize)],
        prop_oneof![
            vec(1usize..80, 1..16),
            Just(vec![1usize]),
            Just(vec![1usize << 20]),
        ],
    )
        .prop_map(|(lead, words, corrupt, vocab, reads)| TokenCase {
            lead,
            words,
            corrupt,
            vocab,
            reads,
        })
}

/// What an independent parser makes of the text.
#[derive(Debug)]
enum Expect {
    /// Valid; with `true` a word is long enough that the streaming reader may refuse it.
    Ids(Vec<u32>, bool),
    Invalid,
}

fn oracle(bytes: &[u8], vocab: usize) -> Expect {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Expect::Invalid;
    };
    let mut ids = Vec::new();
    let mut long = false;
    for w in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        let digits = w.strip_prefix('+').unwrap_or(w);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Expect::Invalid;
        }
        let mut v: u64 = 0;
        for b in digits.bytes() {
            match v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
            {
                Some(n) => v = n,
                None => return Expect::Invalid,
            }
        }
        if v >= vocab as u64 {
            return Expect::Invalid;
        }
        long |= w.len() > 56;
        ids.push(v as u32);
    }
    Expect::Ids(ids, long)
}

/// A reader serving its data in reads of the given sizes, to cut words and characters.
struct Chunky<'a> {
    data: &'a [u8],
    pos: usize,
    sizes: &'a [usize],
    i: usize,
}

impl Chunky<'_> {
    fn next_len(&self) -> usize {
        self.sizes[self.i % self.sizes.len()].min(self.data.len() - self.pos)
    }
}

impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.next_len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        self.i += 1;
        Ok(n)
    }
}

impl BufRead for Chunky<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let n = self.next_len();
        Ok(&self.data[self.pos..self.pos + n])
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt;
        self.i += 1;
    }
}

#[test]
fn fuzz_token_ids() {
    run_target("token_ids", 0x70CE_0001, token_case(), |case| {
        let mut text = case.lead.to_string();
        for (w, s) in &case.words {
            text.push_str(w);
            text.push_str(s);
        }
        let bytes = apply_bytes(text.into_bytes(), &case.corrupt);
        let vocab = case.vocab;

        // the whole-text parser
        let lossy = String::from_utf8_lossy(&bytes).into_owned();
        let parsed = call!(
            "parse_token_ids",
            famc::io::parse_token_ids(&lossy, "fuzz", vocab)
        );
        tally("parse_token_ids", &parsed);
        match (oracle(lossy.as_bytes(), vocab), &parsed) {
            (Expect::Ids(want, _), Ok(got)) => prop_assert_eq!(&want, got),
            (Expect::Ids(want, _), Err(e)) => {
                prop_assert!(want.is_empty(), "valid ids {:?} refused: {}", want, e)
            }
            (Expect::Invalid, Ok(got)) => prop_assert!(false, "invalid text accepted as {:?}", got),
            (Expect::Invalid, Err(_)) => {}
        }
        if let Ok(ids) = &parsed {
            prop_assert!(ids.iter().all(|&t| (t as usize) < vocab));
        }

        // the same through a file
        let dir = tempdir();
        let path = dir.path().join("ids.txt");
        write(&path, &bytes);
        let from_file = call!("read_token_ids", famc::io::read_token_ids(&path, vocab));
        if std::str::from_utf8(&bytes).is_ok() {
            prop_assert_eq!(from_file.as_ref().ok(), parsed.as_ref().ok());
        } else {
            prop_assert!(from_file.is_err(), "non-UTF-8 file accepted");
        }

        // the streaming reader, served in small reads
        let reader = Chunky {
            data: &bytes,
            pos: 0,
            sizes: &case.reads,
            i: 0,
        };
        let mut tr = TokenReader::new(reader, "fuzz", vocab);
        let mut ids = Vec::new();
        let mut failed = None;
        for _ in 0..bytes.len() + 2 {
            match call!("TokenReader::next_chunk", tr.next_chunk()) {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => {
                    prop_assert!(chunk.iter().all(|&t| (t as usize) < vocab));
                    ids.extend(chunk);
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        match oracle(&bytes, vocab) {
            Expect::Ids(want, long) => {
                if failed.is_some() {
                    prop_assert!(long, "valid input refused: {:?}", failed);
                    prop_assert!(want.starts_with(&ids));
                } else {
                    prop_assert_eq!(&ids, &want);
                    prop_assert_eq!(tr.bytes_read(), bytes.len() as u64);
                    let after = call!("TokenReader::next_chunk(after end)", tr.next_chunk());
                    prop_assert!(after.is_ok_and(|c| c.is_empty()));
                }
            }
            Expect::Invalid => prop_assert!(failed.is_some(), "invalid input read as {:?}", ids),
        }
        tally("TokenReader", &failed.map_or(Ok(()), Err));
        Ok(())
    });
}

// ---- target 6: ONNX external data ----------------------------------------------------------

const THRESHOLD: usize = 16;

/// y = (x · w + b) · s, with w and b above the external-data threshold and s inline.
fn tiny_onnx() -> onnx::ModelProto {
    let mut b = GraphBuilder::new("fuzz", DEFAULT_OPSET);
    let x = b.input("x", DType::F32, vec![Dim::Fixed(1), Dim::Fixed(8)]);
    let w = b
        .weight("w", TensorData::from_f32(&fill(64, 1), &[8, 8]))
        .unwrap();
    let bias = b
        .weight("b", TensorData::from_f32(&fill(8, 2), &[8]))
        .unwrap();
    let s = b.weight("s", TensorData::from_f32(&[0.5], &[1])).unwrap();
    let h = b.matmul(&x, &w);
    let h = b.add(&h, &bias);
    let y = b.mul(&h, &s);
    b.output_with_shape(&y, "y", vec![Dim::Fixed(1), Dim::Fixed(8)]);
    b.finish().unwrap()
}

#[derive(Debug, Clone)]
enum ExtEdit {
    Location(usize, String),
    Offset(usize, String),
    Length(usize, String),
    DropEntry(usize, usize),
    AddEntry(usize, &'static str, String),
    Dims(usize, Vec<i64>),
    DataType(usize, i32),
    DataLocation(usize, i32),
    /// Moves a copy of the tensor into a subgraph nested this deep.
    Nest(usize, usize),
}

#[derive(Debug, Clone)]
enum DataFile {
    Keep,
    Truncate(usize),
    Extend(Vec<u8>),
    Missing,
    Dir,
}

#[derive(Debug, Clone)]
struct OnnxCase {
    edits: Vec<ExtEdit>,
    data: DataFile,
    proto_bytes: Vec<ByteMut>,
}

fn onnx_case() -> impl Strategy<Value = OnnxCase> {
    let location = prop_oneof![
        3 => select(HOSTILE_PATHS).prop_map(str::to_string),
        2 => select(&[
            "model.onnx.data",
            "./model.onnx.data",
            "model.onnx",
            "sub/../model.onnx.data",
            "model.onnx.data/",
            "missing.data",
        ][..])
        .prop_map(str::to_string),
        1 => "[a-z./]{0,20}",
    ];
    let number = prop_oneof![
        3 => hostile_number_text(),
        2 => select(&["4096", "256", "32", "4128", "8192", "0"][..]).prop_map(str::to_string),
        1 => (0u64..9000).prop_map(|v| v.to_string()),
    ];
    let key = select(&["location", "offset", "length", "checksum", ""][..]);
    let edit = prop_oneof![
        2 => (any::<usize>(), location).prop_map(|(i, l)| ExtEdit::Location(i, l)),
        2 => (any::<usize>(), number.clone()).prop_map(|(i, n)| ExtEdit::Offset(i, n)),
        2 => (any::<usize>(), number.clone()).prop_map(|(i, n)| ExtEdit::Length(i, n)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, k)| ExtEdit::DropEntry(i, k)),
        1 => (any::<usize>(), key, number).prop_map(|(i, k, v)| ExtEdit::AddEntry(i, k, v)),
        2 => (any::<usize>(), vec(interesting_i64(), 0..4)).prop_map(|(i, d)| ExtEdit::Dims(i, d)),
        1 => (any::<usize>(), prop_oneof![0i32..17, Just(-1), Just(i32::MAX)])
            .prop_map(|(i, t)| ExtEdit::DataType(i, t)),
        1 => (any::<usize>(), prop_oneof![0i32..2, Just(-1), Just(7)])
            .prop_map(|(i, l)| ExtEdit::DataLocation(i, l)),
        1 => (any::<usize>(), 1usize..60).prop_map(|(i, d)| ExtEdit::Nest(i, d)),
    ];
    let data = prop_oneof![
        4 => Just(DataFile::Keep),
        2 => (0usize..5000).prop_map(DataFile::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(DataFile::Extend),
        1 => Just(DataFile::Missing),
        1 => Just(DataFile::Dir),
    ];
    (
        vec(edit, 0..5),
        data,
        prop_oneof![5 => Just(vec![]), 1 => vec(byte_mut(600), 1..4)],
    )
        .prop_map(|(edits, data, proto_bytes)| OnnxCase {
            edits,
            data,
            proto_bytes,
        })
}

fn set_entry(t: &mut onnx::TensorProto, key: &str, value: &str) {
    match t.external_data.iter_mut().find(|e| e.key == key) {
        Some(e) => e.value = value.to_string(),
        None => t.external_data.push(onnx::StringStringEntryProto {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

fn all_tensors<'a>(g: &'a onnx::GraphProto, out: &mut Vec<&'a onnx::TensorProto>) {
    out.extend(&g.initializer);
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                all_tensors(sub, out);
            }
        }
    }
}

fn nest(t: onnx::TensorProto, depth: usize) -> onnx::NodeProto {
    let mut g = onnx::GraphProto {
        name: "inner".into(),
        initializer: vec![t],
        ..Default::default()
    };
    for _ in 1..depth {
        g = onnx::GraphProto {
            name: "outer".into(),
            node: vec![onnx::NodeProto {
                op_type: "Identity".into(),
                attribute: vec![onnx::AttributeProto {
                    name: "g".into(),
                    g: Some(g),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
    }
    onnx::NodeProto {
        op_type: "If".into(),
        attribute: vec![onnx::AttributeProto {
            name: "then_branch".into(),
            g: Some(g),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn fuzz_onnx_external_data() {
    let model = tiny_onnx();
    let seed_dir = tempdir();
    let seed_path = seed_dir.path().join("model.onnx");
    save_model(model.clone(), &seed_path, Some(THRESHOLD)).unwrap();
    let saved = onnx::ModelProto::decode(std::fs::read(&seed_path).unwrap().as_slice()).unwrap();
    let data = std::fs::read(seed_dir.path().join("model.onnx.data")).unwrap();
    assert!(
        saved
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .any(|t| !t.external_data.is_empty()),
        "the seed model has external data"
    );
    assert_eq!(
        load_model(&seed_path).unwrap(),
        model,
        "the seed round-trips"
    );

    run_target("onnx_external_data", 0x0A1C_0001, onnx_case(), |case| {
        let dir = tempdir();
        let d = dir.path();
        let mut m = saved.clone();
        let g = m.graph.as_mut().unwrap();
        for e in &case.edits {
            let n = g.initializer.len();
            let (ExtEdit::Location(i, _)
            | ExtEdit::Offset(i, _)
            | ExtEdit::Length(i, _)
            | ExtEdit::DropEntry(i, _)
            | ExtEdit::AddEntry(i, ..)
            | ExtEdit::Dims(i, _)
            | ExtEdit::DataType(i, _)
            | ExtEdit::DataLocation(i, _)
            | ExtEdit::Nest(i, _)) = e;
            let t = &mut g.initializer[i % n];
            match e {
                ExtEdit::Location(_, v) => set_entry(t, "location", v),
                ExtEdit::Offset(_, v) => set_entry(t, "offset", v),
                ExtEdit::Length(_, v) => set_entry(t, "length", v),
                ExtEdit::DropEntry(_, k) if !t.external_data.is_empty() => {
                    let k = k % t.external_data.len();
                    t.external_data.remove(k);
                }
                ExtEdit::DropEntry(..) => {}
                ExtEdit::AddEntry(_, k, v) => t.external_data.push(onnx::StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                }),
                ExtEdit::Dims(_, dims) => t.dims = dims.clone(),
                ExtEdit::DataType(_, ty) => t.data_type = *ty,
                ExtEdit::DataLocation(_, l) => t.data_location = *l,
                ExtEdit::Nest(_, depth) => {
                    let mut copy = t.clone();
                    copy.name = format!("nested.{depth}");
                    g.node.push(nest(copy, *depth));
                }
            }
        }
        let bytes = apply_bytes(m.encode_to_vec(), &case.proto_bytes);
        let path = d.join("model.onnx");
        write(&path, &bytes);
        let data_path = d.join("model.onnx.data");
        match &case.data {
            DataFile::Keep => write(&data_path, &data),
            DataFile::Truncate(n) => write(&data_path, &data[..(*n).min(data.len())]),
            DataFile::Extend(extra) => write(&data_path, &[&data[..], extra].concat()),
            DataFile::Missing => {}
            DataFile::Dir => std::fs::create_dir(&data_path).unwrap(),
        }
        let loaded = call!("load_model", load_model(&path));
        tally("load_model", &loaded);
        let unmutated = case.edits.is_empty()
            && case.proto_bytes.is_empty()
            && matches!(case.data, DataFile::Keep | DataFile::Extend(_));
        if unmutated {
            prop_assert!(
                loaded.as_ref().ok() == Some(&model),
                "the seed did not round-trip"
            );
        }
        let Ok(loaded) = loaded else { return Ok(()) };
        let mut out = Vec::new();
        if let Some(g) = &loaded.graph {
            all_tensors(g, &mut out);
        }
        for t in out {
            prop_assert!(
                t.data_location != DataLocation::External as i32,
                "tensor `{}` still external after load",
                t.name
            );
            if let Some(dt) = DType::from_onnx(t.data_type) {
                if !t.raw_data.is_empty() {
                    let numel = t.dims.iter().try_fold(1usize, |acc, &d| {
                        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
                    });
                    prop_assert_eq!(
                        numel.and_then(|n| n.checked_mul(dt.size_bytes())),
                        Some(t.raw_data.len()),
                        "tensor `{}` has {} bytes for dims {:?}",
                        t.name,
                        t.raw_data.len(),
                        &t.dims
                    );
                }
            }
        }
        // what was loaded from outside the model's directory, had the proto said so
        if case.proto_bytes.is_empty() {
            let mut written = Vec::new();
            all_tensors(m.graph.as_ref().unwrap(), &mut written);
            for t in written
                .iter()
                .filter(|t| t.data_location == DataLocation::External as i32)
            {
                let loc = t.external_data.iter().find(|e| e.key == "location");
                prop_assert!(
                    loc.is_some(),
                    "external tensor `{}` without location loaded",
                    t.name
                );
                let loc = &loc.unwrap().value;
                prop_assert!(
                    Path::new(loc)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                    "tensor `{}` loaded from {:?}, outside the model directory",
                    t.name,
                    loc
                );
            }
        }
        Ok(())
    });
}
