//! One copy of an export's weights for all of its ONNX Runtime sessions in a process.
//!
//! Left to itself, every session reads the external data of its graph and prepacks its own copy
//! of each matrix, so the block, decode and FAM-kv sessions of one export hold the weights three
//! times. Here the weight store is memory-mapped once per process, each tensor in it becomes one
//! ONNX Runtime value over the mapping that every session takes as a shared initializer
//! (`AddInitializer`), and the sessions share one prepacked-weights container, so each matrix
//! is also packed once. While a session is built, once it is and after its runs, the mapping's
//! pages are handed back to the page cache (the packed copies are what the session computes
//! with; what it still reads of the mapping, embedding rows, faults back in on demand), so the
//! weights are resident about once, not as the mapping plus the packed copy.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ::ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ::ort::session::builder::{PrepackedWeights, SessionBuilder};
use ::ort::value::DynValue;
use ::ort::AsPointer;
use memmap2::Mmap;

use crate::onnx::{self, tensor_proto::DataLocation};

/// Identity of a store file: a replaced or rewritten file is another store.
type FileKey = (u64, u64, u64, i64, i64);

/// A tensor in the store: element type, dims, offset and length.
type TensorKey = (i32, Vec<i64>, u64, u64);

/// A memory-mapped weight store and the values made over it.
pub(crate) struct SharedWeights {
    path: PathBuf,
    values: Mutex<HashMap<TensorKey, Arc<DynValue>>>,
    prepacked: PrepackedWeights,
    /// Milliseconds after `opened` of the last [`SharedWeights::release_pages_now_and_then`].
    released_at_ms: std::sync::atomic::AtomicU64,
    opened: std::time::Instant,
    // dropped last: every value above points into it
    map: Mmap,
}

// SAFETY: the values are read-only views of `map`, which lives as long as they do; ONNX
// Runtime's values and prepacked container may be used from any thread.
unsafe impl Send for SharedWeights {}
unsafe impl Sync for SharedWeights {}

fn registry() -> &'static Mutex<HashMap<FileKey, Weak<SharedWeights>>> {
    static R: OnceLock<Mutex<HashMap<FileKey, Weak<SharedWeights>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// What a session of `graph` takes from a shared store: the store and, per initializer name,
/// its tensor there.
pub(crate) struct Binding {
    pub store: Arc<SharedWeights>,
    tensors: Vec<(String, TensorKey)>,
}

/// Bytes per element and ONNX Runtime's type, for the ONNX element types a shared initializer
/// may have (those famc's graphs store).
fn element(data_type: i32) -> Option<(usize, ::ort::sys::ONNXTensorElementDataType)> {
    use ::ort::sys::ONNXTensorElementDataType as T;
    Some(match data_type {
        1 => (4, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
        6 => (4, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32),
        7 => (8, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64),
        10 => (2, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
        16 => (2, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16),
        2 => (1, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
        3 => (1, T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8),
        _ => return None,
    })
}

/// The shared-store binding for the graph at `path`: every top-level initializer in external
/// data must lie in one file beside it, at an offset aligned for its type and within the file;
/// `None` when the graph has no external data or does not qualify (ONNX Runtime then loads it
/// as usual).
pub(crate) fn bind(path: &Path) -> Result<Option<Binding>, String> {
    use prost::Message;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let model = onnx::ModelProto::decode(bytes.as_slice())
        .map_err(|e| format!("not an ONNX model: {e}"))?;
    let Some(graph) = model.graph else {
        return Ok(None);
    };
    let mut location: Option<String> = None;
    let mut tensors = Vec::new();
    for t in &graph.initializer {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        let get = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let (Some(loc), Some(offset), Some(length)) = (
            get("location"),
            get("offset").and_then(|v| v.parse::<u64>().ok()),
            get("length").and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return Ok(None);
        };
        if location.get_or_insert_with(|| loc.to_string()) != loc
            || !crate::io::is_plain_file_name(loc)
            || loc.contains('\0')
        {
            return Ok(None);
        }
        let Some((size, _)) = element(t.data_type) else {
            return Ok(None);
        };
        let numel = t.dims.iter().try_fold(1u64, |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        });
        if numel.and_then(|n| n.checked_mul(size as u64)) != Some(length)
            || !offset.is_multiple_of(size as u64)
        {
            return Ok(None);
        }
        tensors.push((
            t.name.clone(),
            (t.data_type, t.dims.clone(), offset, length),
        ));
    }
    let Some(location) = location else {
        return Ok(None);
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let store = SharedWeights::open(&dir.join(location))?;
    let len = store.map.len() as u64;
    if let Some((name, _)) = tensors
        .iter()
        .find(|(_, (_, _, off, n))| off.checked_add(*n).is_none_or(|end| end > len))
    {
        return Err(format!(
            "initializer {name} lies past the end of {} ({len} bytes)",
            store.path.display()
        ));
    }
    Ok(Some(Binding { store, tensors }))
}

impl SharedWeights {
    /// The process's mapping of the store file at `path`, made on first use.
    fn open(path: &Path) -> Result<Arc<Self>, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open the weight store {}: {e}", path.display()))?;
        let m = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let key = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        // SAFETY: an export's files are not modified in place (famc replaces whole exports);
        // the mapping is read-only.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| format!("cannot map the weight store {}: {e}", path.display()))?;
        let s = Arc::new(SharedWeights {
            path: path.to_path_buf(),
            values: Mutex::new(HashMap::new()),
            prepacked: PrepackedWeights::new(),
            released_at_ms: Default::default(),
            opened: std::time::Instant::now(),
            map,
        });
        reg.insert(key, Arc::downgrade(&s));
        Ok(s)
    }

    /// The value over the store's bytes for `key`, made once.
    fn value(&self, key: &TensorKey) -> Result<Arc<DynValue>, String> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = values.get(key) {
            return Ok(v.clone());
        }
        let (data_type, dims, offset, length) = key;
        let (_, ty) = element(*data_type)
            .ok_or_else(|| format!("element type {data_type} cannot be shared"))?;
        let info = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| e.to_string())?;
        let api = ::ort::api();
        let mut out: *mut ::ort::sys::OrtValue = std::ptr::null_mut();
        // SAFETY: the range lies in the mapping (checked in `bind`), which outlives the value;
        // ONNX Runtime only reads initializers.
        let status = unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                info.ptr(),
                self.map.as_ptr().add(*offset as usize) as *mut std::ffi::c_void,
                *length as usize,
                dims.as_ptr(),
                dims.len(),
                ty,
                &mut out,
            )
        };
        if !status.0.is_null() {
            // SAFETY: a non-null status is an error ONNX Runtime allocated for us to release.
            let message = unsafe {
                let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                    .to_string_lossy()
                    .into_owned();
                (api.ReleaseStatus)(status.0);
                m
            };
            return Err(message);
        }
        let ptr = NonNull::new(out).ok_or("ONNX Runtime made no tensor")?;
        // SAFETY: `ptr` is the tensor just created; it owns no buffer of its own, so any CPU
        // allocator satisfies `from_ptr`.
        let value: DynValue = unsafe { DynValue::from_ptr(ptr, Some(&Allocator::default())) };
        let value = Arc::new(value);
        values.insert(key.clone(), value.clone());
        Ok(value)
    }

    /// [`SharedWeights::release_pages`] after a run, at most every [`RELEASE_EVERY_MS`]: the
    /// `Gather` reads embedding rows from the mapping, and the kernel maps the cached pages
    /// around each row it faults in, so scoring real text made most of a large embedding
    /// resident again (SmolLM2's 113 MB, on top of the packed head) over a few thousand tokens.
    pub(crate) fn release_pages_now_and_then(&self) {
        use std::sync::atomic::Ordering;
        let now = self.opened.elapsed().as_millis() as u64;
        let last = self.released_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RELEASE_EVERY_MS
            && self
                .released_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.release_pages();
        }
    }

    /// Hands the mapping's resident pages back: after a session has packed its weights it
    /// reads few of them again, and those fault back in from the page cache.
    pub(crate) fn release_pages(&self) {
        // SAFETY: the mapping is a read-only file mapping; dropping its pages loses nothing.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }
}

/// The least time between two releases of a store's pages while it is in use.
const RELEASE_EVERY_MS: u64 = 100;

/// Hands a store's pages back every few milliseconds until dropped.
pub(crate) struct Releaser {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SharedWeights {
    /// A [`Releaser`] for this store, for the time a session is being built.
    pub(crate) fn release_while_loading(self: &Arc<Self>) -> Releaser {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (store, flag) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("famc-weights".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    store.release_pages();
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
            .ok();
        Releaser { stop, thread }
    }
}

impl Binding {
    /// `builder` with every bound initializer shared and the store's prepacked container.
    pub(crate) fn apply(&self, mut builder: SessionBuilder) -> Result<SessionBuilder, String> {
        for (name, key) in &self.tensors {
            let value = self.store.value(key)?;
            builder = builder
                .with_initializer(name, value)
                .map_err(|e| format!("cannot share initializer {name}: {e}"))?;
        }
        builder
            .with_prepacked_weights(&self.store.prepacked)
            .map_err(|e| format!("cannot share prepacked weights: {e}"))
    }
}
