//! Memory-mapped safetensors, single-file or sharded, read through a prefix-scoped loader.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use safetensors::{tensor::Metadata, Dtype, SafeTensors};

use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// The safetensors files of a checkpoint, memory-mapped; tensors are converted to f32 on read.
pub struct TensorStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: BTreeMap<String, usize>,
}

impl TensorStore {
    /// Opens `model.safetensors.index.json` when present, else `model.safetensors`, else every
    /// `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let ck_err = |message: String| Error::Checkpoint {
            dir: dir.to_path_buf(),
            message,
        };
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        let mut declared: Option<BTreeMap<String, String>> = None;
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index_path.clone(),
                source,
            })?;
            for (name, f) in &idx.weight_map {
                let plain = Path::new(f)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !plain || f.is_empty() {
                    return Err(ck_err(format!(
                        "model.safetensors.index.json maps `{name}` to `{f}`, which is not a file inside the checkpoint directory"
                    )));
                }
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            declared = Some(idx.weight_map);
        } else if dir.join("model.safetensors").exists() {
            files.push(dir.join("model.safetensors"));
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for e in entries {
                let p = e.map_err(|e| Error::io(dir, e))?.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    files.push(p);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(ck_err("no *.safetensors file found".into()));
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the checkpoint is treated as read-only for the lifetime of the store.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    message: explain_header_error(&mmap, &e),
                })?;
            for name in metadata.offset_keys() {
                index.insert(name, i);
            }
            shards.push(Shard {
                path,
                mmap,
                header_len,
                metadata,
            });
        }
        if let Some(declared) = declared {
            for (name, file) in declared {
                if !index.contains_key(&name) {
                    return Err(ck_err(format!(
                        "model.safetensors.index.json maps `{name}` to {file}, which has no such tensor"
                    )));
                }
            }
        }
        Ok(TensorStore {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// Whether a tensor of this full name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|i| i.shape.clone())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    fn searched(&self) -> String {
        self.shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<ArrayD<f32>> {
        let Some(&si) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                searched: self.searched(),
            });
        };
        let shard = &self.shards[si];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                searched: self.searched(),
            })?;
        if info.shape != expected {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = shard
            .mmap
            .get(start..end)
            .ok_or_else(|| Error::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::TensorDtype {
                    name: name.to_string(),
                    path: shard.path.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        release(&shard.mmap, start, end);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!(
                    "tensor `{name}` holds a non-finite value ({}) at element {i}: the weights are damaged",
                    values[i]
                ),
            });
        }
        ArrayD::from_shape_vec(IxDyn(expected), values).map_err(|e| Error::Safetensors {
            path: shard.path.clone(),
            message: format!("tensor `{name}`: {e}"),
        })
    }

    /// A loader scoped to `prefix`.
    pub fn root(self: &Arc<Self>) -> WeightLoader {
        WeightLoader {
            store: Arc::clone(self),
            prefix: String::new(),
        }
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Feeds every file's bytes, in name order, to a hasher.
    pub(crate) fn hash_files(&self, h: &mut impl sha2::Digest) {
        let mut shards: Vec<&Shard> = self.shards.iter().collect();
        shards.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
        for s in shards {
            for (i, chunk) in s.mmap.chunks(64 << 20).enumerate() {
                h.update(chunk);
                let start = i * (64 << 20);
                release(&s.mmap, start, start + chunk.len());
            }
        }
    }
}

/// Hands the pages of `mmap[start..end]` back once read: the checkpoint is converted into
/// arrays of its own, and a mapping whose pages all stayed resident would count the weights
/// twice in the process's memory while the conversion runs. What is read again faults back in
/// from the page cache.
fn release(mmap: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let from = start - start % PAGE;
    if end > from {
        // SAFETY: a read-only file mapping: dropping its pages loses nothing.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, end - from)
        };
    }
}

/// A prefix-scoped view of a [`TensorStore`]: `loader.pp("model").pp("layers.0")`.
#[derive(Clone)]
pub struct WeightLoader {
    store: Arc<TensorStore>,
    prefix: String,
}

impl WeightLoader {
    /// Pushes a name segment onto the prefix.
    pub fn pp(&self, segment: impl AsRef<str>) -> Self {
        let segment = segment.as_ref();
        let prefix = if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        };
        WeightLoader {
            store: Arc::clone(&self.store),
            prefix,
        }
    }

    /// The full name of `name` under this prefix.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full_name(name))
    }

    /// Every tensor name of the checkpoint (not only under this prefix), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.store.names()
    }

    /// The shape of `name` under this prefix, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.store.shape(&self.full_name(name))
    }

    /// The checkpoint directory.
    pub fn store_dir(&self) -> &Path {
        self.store.dir()
    }

    /// A rank-1 tensor of length `n`.
    pub fn vector(&self, name: &str, n: usize) -> Result<Array1<f32>> {
        let a = self.store.get(&self.full_name(name), &[n])?;
        Ok(a.into_dimensionality().expect("shape checked"))
    }

    /// A rank-2 tensor `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let a = self.store.get(&self.full_name(name), &[rows, cols])?;
        Ok(a.into_dimensionality().expect("shape checked"))
    }

    /// A rank-1 tensor when present.
    pub fn optional_vector(&self, name: &str, n: usize) -> Result<Option<Array1<f32>>> {
        if self.contains(name) {
            self.vector(name, n).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The safetensors crate's message, made precise where it names the wrong tensor: a missing
/// header entry leaves a gap that it reports as a bad offset of the tensor after the gap.
fn explain_header_error(bytes: &[u8], e: &safetensors::SafeTensorError) -> String {
    let plain = e.to_string();
    if !matches!(e, safetensors::SafeTensorError::InvalidOffset(_)) {
        return plain;
    }
    let parsed = (|| {
        let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        let header: serde_json::Value =
            serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
        let mut spans: Vec<(u64, u64, String)> = header
            .as_object()?
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .filter_map(|(k, v)| {
                let o = v.get("data_offsets")?.as_array()?;
                Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, k.clone()))
            })
            .collect();
        spans.sort();
        let mut end = 0;
        for (s, e, name) in spans {
            if s > end {
                return Some(format!(
                    "data bytes {end}..{s} belong to no header entry (a tensor missing from the header?); the next entry is `{name}`"
                ));
            }
            if s < end {
                return Some(format!(
                    "tensor `{name}` starts at data byte {s}, inside the tensor before it (which ends at {end})"
                ));
            }
            if e < s {
                return Some(format!(
                    "tensor `{name}` ends at data byte {e}, before it starts ({s})"
                ));
            }
            end = e;
        }
        None
    })();
    parsed.unwrap_or(plain)
}
