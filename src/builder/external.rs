//! Saving and loading models, with large initializers in an external data
//! file (ONNX's external data convention), which is what lets models past
//! protobuf's 2 GiB message limit be written at all.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tempfile::NamedTempFile;

use super::{BuildError, DType};
use crate::onnx::{self, tensor_proto::DataLocation};

/// Byte alignment of each tensor's offset in the `.data` file: the page size,
/// so runtimes can memory-map tensors in place (ONNX Runtime only maps
/// page-aligned offsets).
pub const EXTERNAL_DATA_ALIGNMENT: u64 = 4096;

/// Protobuf refuses to parse messages of 2 GiB or more.
const PROTOBUF_LIMIT: usize = i32::MAX as usize;

/// Serializes a model to protobuf bytes (deterministic for a given model).
pub fn encode_model(model: &onnx::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `model` to `path`.
///
/// With `Some(threshold)`, every top-level initializer whose `raw_data` is
/// longer than `threshold` bytes moves to `<file name>.data` beside the model
/// (offsets aligned to [`EXTERNAL_DATA_ALIGNMENT`]). Each file is written to a
/// temporary file in the same directory, synced, then renamed into place, so a
/// crash never leaves a half-written model; the data file lands first so the
/// model never refers to a missing one.
pub fn save_model(
    mut model: onnx::ModelProto,
    path: &Path,
    external_threshold_bytes: Option<usize>,
) -> Result<(), BuildError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BuildError::InvalidPath(path.to_path_buf()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let data_name = format!("{file_name}.data");
    let data_path = dir.join(&data_name);

    let mut data_tmp = None;
    if let (Some(threshold), Some(graph)) = (external_threshold_bytes, model.graph.as_mut()) {
        let mut writer: Option<BufWriter<NamedTempFile>> = None;
        let mut offset: u64 = 0;
        for t in graph
            .initializer
            .iter_mut()
            .filter(|t| t.raw_data.len() > threshold)
        {
            if writer.is_none() {
                let tmp = NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
                writer = Some(BufWriter::new(tmp));
            }
            let w = writer.as_mut().expect("created above");
            let pad = offset.next_multiple_of(EXTERNAL_DATA_ALIGNMENT) - offset;
            w.write_all(&vec![0u8; pad as usize])
                .map_err(io_err(&data_path))?;
            offset += pad;
            let raw = std::mem::take(&mut t.raw_data);
            w.write_all(&raw).map_err(io_err(&data_path))?;
            let entry = |key: &str, value: String| onnx::StringStringEntryProto {
                key: key.to_string(),
                value,
            };
            t.external_data = vec![
                entry("location", data_name.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = DataLocation::External as i32;
            offset += raw.len() as u64;
        }
        if let Some(w) = writer {
            let tmp = w
                .into_inner()
                .map_err(|e| io_err(&data_path)(e.into_error()))?;
            tmp.as_file().sync_all().map_err(io_err(&data_path))?;
            data_tmp = Some(tmp);
        }
    }

    let bytes = encode_model(&model);
    if bytes.len() > PROTOBUF_LIMIT {
        return Err(BuildError::ModelTooLarge {
            path: path.to_path_buf(),
            bytes: bytes.len(),
        });
    }
    if let Some(tmp) = data_tmp {
        crate::io::set_shareable(tmp.as_file()).map_err(io_err(&data_path))?;
        tmp.persist(&data_path)
            .map_err(|e| io_err(&data_path)(e.error))?;
    }
    let mut tmp = NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
    tmp.write_all(&bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    crate::io::set_shareable(tmp.as_file()).map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    // The renames are durable only once the directory entry is synced; some
    // platforms cannot open a directory for that, so this is best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

type StoredKey = (i32, Vec<i64>, [u8; 32]);

/// A weight store being written: initializers move into it model by model, and a tensor whose
/// element type, dims and bytes equal one already stored points at the same bytes, so weights
/// that several graphs share are stored once. Offsets are aligned to
/// [`EXTERNAL_DATA_ALIGNMENT`]. The file is written to a temporary beside `store` and takes its
/// place in [`StoreWriter::finish`]; no file is written when no tensor went into it.
pub struct StoreWriter {
    store: PathBuf,
    name: String,
    dir: PathBuf,
    writer: Option<BufWriter<NamedTempFile>>,
    /// (element type, dims, SHA-256 of the bytes) -> (offset, length) in the store.
    stored: std::collections::HashMap<StoredKey, (u64, usize)>,
    offset: u64,
}

impl StoreWriter {
    /// A writer for the store file `store` (not created until a tensor goes into it).
    pub fn new(store: &Path) -> Result<Self, BuildError> {
        let name = store
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BuildError::InvalidPath(store.to_path_buf()))?
            .to_string();
        let dir = match store.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(StoreWriter {
            store: store.to_path_buf(),
            name,
            dir,
            writer: None,
            stored: Default::default(),
            offset: 0,
        })
    }

    /// Moves every top-level initializer of `model` with more than `threshold` bytes into the
    /// store, leaving an external-data reference in its place.
    pub fn externalize(
        &mut self,
        model: &mut onnx::ModelProto,
        threshold: usize,
    ) -> Result<(), BuildError> {
        let Some(graph) = model.graph.as_mut() else {
            return Ok(());
        };
        for t in graph
            .initializer
            .iter_mut()
            .filter(|t| t.raw_data.len() > threshold)
        {
            self.externalize_tensor(t)?;
        }
        Ok(())
    }

    /// Moves `t`'s bytes into the store (or points it at identical bytes already there);
    /// returns their SHA-256.
    pub fn externalize_tensor(
        &mut self,
        t: &mut onnx::TensorProto,
    ) -> Result<[u8; 32], BuildError> {
        use sha2::{Digest, Sha256};
        let raw = std::mem::take(&mut t.raw_data);
        let hash: [u8; 32] = Sha256::digest(&raw).into();
        let key = (t.data_type, t.dims.clone(), hash);
        let (at, len) = match self.stored.get(&key) {
            Some(&place) => place,
            None => {
                if self.writer.is_none() {
                    let tmp = NamedTempFile::new_in(&self.dir).map_err(io_err(&self.dir))?;
                    self.writer = Some(BufWriter::new(tmp));
                }
                let w = self.writer.as_mut().expect("created above");
                let pad = self.offset.next_multiple_of(EXTERNAL_DATA_ALIGNMENT) - self.offset;
                w.write_all(&vec![0u8; pad as usize])
                    .and_then(|_| w.write_all(&raw))
                    .map_err(io_err(&self.store))?;
                let place = (self.offset + pad, raw.len());
                self.offset += pad + raw.len() as u64;
                self.stored.insert(key, place);
                place
            }
        };
        let entry = |key: &str, value: String| onnx::StringStringEntryProto {
            key: key.to_string(),
            value,
        };
        t.external_data = vec![
            entry("location", self.name.clone()),
            entry("offset", at.to_string()),
            entry("length", len.to_string()),
        ];
        t.data_location = DataLocation::External as i32;
        Ok(hash)
    }

    /// Syncs the store and moves it into place; returns its size in bytes (0: no file, as no
    /// tensor went into it).
    pub fn finish(self) -> Result<u64, BuildError> {
        if let Some(w) = self.writer {
            let store = &self.store;
            let tmp = w.into_inner().map_err(|e| io_err(store)(e.into_error()))?;
            tmp.as_file().sync_all().map_err(io_err(store))?;
            crate::io::set_shareable(tmp.as_file()).map_err(io_err(store))?;
            tmp.persist(store).map_err(|e| io_err(store)(e.error))?;
        }
        Ok(self.offset)
    }
}

/// Reads a model from `path`, pulling external tensor data back into
/// `raw_data` (so the result is self-contained).
pub fn load_model(path: &Path) -> Result<onnx::ModelProto, BuildError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let mut model =
        onnx::ModelProto::decode(bytes.as_slice()).map_err(|source| BuildError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut files = BTreeMap::new();
    if let Some(g) = model.graph.as_mut() {
        load_graph(g, &dir, &mut files)?;
    }
    Ok(model)
}

fn load_graph(
    g: &mut onnx::GraphProto,
    dir: &Path,
    files: &mut BTreeMap<PathBuf, (File, u64)>,
) -> Result<(), BuildError> {
    for t in &mut g.initializer {
        if t.data_location == DataLocation::External as i32 {
            load_tensor(t, dir, files)?;
        } else if !t.raw_data.is_empty() {
            check_size(t, t.raw_data.len())?;
        }
    }
    for node in &mut g.node {
        for a in &mut node.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                load_graph(sub, dir, files)?;
            }
        }
    }
    Ok(())
}

fn load_tensor(
    t: &mut onnx::TensorProto,
    dir: &Path,
    files: &mut BTreeMap<PathBuf, (File, u64)>,
) -> Result<(), BuildError> {
    let bad = |reason: String| BuildError::ExternalData {
        tensor: t.name.clone(),
        reason,
    };
    let get = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let number = |key: &str| -> Result<Option<u64>, BuildError> {
        get(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key} {v:?} is not a number")))
            })
            .transpose()
    };
    let location = get("location").ok_or_else(|| bad("no location".to_string()))?;
    // A model file must not be able to make us read arbitrary files.
    if !Path::new(location)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(format!(
            "location {location:?} is not a relative path inside the model directory"
        )));
    }
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?;
    let file_path = dir.join(location);

    if !files.contains_key(&file_path) {
        let f = File::open(&file_path).map_err(io_err(&file_path))?;
        let len = f.metadata().map_err(io_err(&file_path))?.len();
        files.insert(file_path.clone(), (f, len));
    }
    let (file, file_len) = files.get_mut(&file_path).expect("inserted above");
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some((*file_len).max(offset)),
    };
    let end = match end {
        Some(e) if e <= *file_len => e,
        _ => {
            return Err(BuildError::ExternalDataTruncated {
                file: file_path,
                tensor: t.name.clone(),
                offset,
                end: end.unwrap_or(u64::MAX),
                file_len: *file_len,
            })
        }
    };
    let len = usize::try_from(end - offset).map_err(|_| bad("length too large".to_string()))?;
    check_size(t, len)?;
    let mut raw = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut raw))
        .map_err(io_err(&file_path))?;
    t.raw_data = raw;
    t.external_data.clear();
    t.data_location = DataLocation::Default as i32;
    Ok(())
}

/// `len` bytes must be exactly the tensor's elements in its type.
fn check_size(t: &onnx::TensorProto, len: usize) -> Result<(), BuildError> {
    let bad = |reason: String| BuildError::ExternalData {
        tensor: t.name.clone(),
        reason,
    };
    let numel = t.dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    let Some(numel) = numel else {
        return Err(bad(format!("dims {:?} are negative or too large", t.dims)));
    };
    // bits per element of every ONNX tensor type a weight may have
    let bits: usize = match t.data_type {
        2 | 3 | 9 | 17..=20 => 8,
        4 | 5 | 10 | 16 => 16,
        1 | 6 | 12 => 32,
        7 | 11 | 13 => 64,
        21..=23 => 4,
        other => return Err(bad(format!("unsupported element type {other}"))),
    };
    if numel.checked_mul(bits).map(|b| b.div_ceil(8)) != Some(len) {
        return Err(match DType::from_onnx(t.data_type) {
            Some(dtype) => BuildError::TensorSize {
                tensor: t.name.clone(),
                dims: t.dims.clone(),
                dtype,
                bytes: len,
            },
            None => bad(format!(
                "{len} bytes do not hold {numel} elements of type {}",
                t.data_type
            )),
        });
    }
    Ok(())
}
