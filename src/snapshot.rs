//! Stream snapshots: a stream's whole state after its last full block, written atomically and
//! checked on load (checksum, model, FAM parameters, state shapes).
//!
//! The file is a safetensors file: the state tensors under their graph input names, and the
//! position, pending tokens and running score in its string metadata.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::export::Manifest;

const FORMAT: &str = "famc-stream-state";
const VERSION: &str = "1";

/// A stream's state plus what a streaming consumer needs to continue exactly where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Index τ of the stream's next block.
    pub block_index: usize,
    /// Host copies of the state tensors, in the order of the manifest's `state` list, without
    /// the batch dimension.
    pub state: Vec<ArrayD<f32>>,
    /// Tokens read after the last full block (the block being filled), at most L.
    pub pending: Vec<u32>,
    /// Sum of −log p over the predictions committed so far (those made inside full blocks).
    pub nll_sum: f64,
    /// How many predictions `nll_sum` counts.
    pub scored: u64,
    /// Tokens read in total, pending ones included.
    pub tokens_read: u64,
}

fn checksum(meta: &BTreeMap<String, String>, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> String {
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
    crate::model::hex(&h.finalize())
}

impl Snapshot {
    /// Writes the snapshot for a stream of the model described by `manifest`, atomically.
    pub fn save(&self, path: &Path, manifest: &Manifest) -> Result<()> {
        if self.state.len() != manifest.state.len() {
            return Err(Error::Input(format!(
                "snapshot has {} state tensors, the model {}",
                self.state.len(),
                manifest.state.len()
            )));
        }
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = manifest
            .state
            .iter()
            .zip(&self.state)
            .map(|(st, a)| {
                let bytes = a.iter().flat_map(|v| v.to_le_bytes()).collect();
                (st.input.clone(), a.shape().to_vec(), bytes)
            })
            .collect();
        let mut sorted = tensors.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = BTreeMap::new();
        let pending: Vec<String> = self.pending.iter().map(u32::to_string).collect();
        for (k, v) in [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("checkpoint_sha256", manifest.checkpoint_sha256.clone()),
            ("block_len", manifest.fam.block_len.to_string()),
            ("fam_len", manifest.fam.fam_len.to_string()),
            ("mem_blocks", manifest.fam.mem_blocks.to_string()),
            ("dtype", manifest.dtype.clone()),
            ("block_index", self.block_index.to_string()),
            ("pending", pending.join(" ")),
            ("nll_sum", format!("{:?}", self.nll_sum)),
            ("scored", self.scored.to_string()),
            ("tokens_read", self.tokens_read.to_string()),
        ] {
            meta.insert(k.to_string(), v);
        }
        meta.insert("checksum".into(), checksum(&meta, &sorted));
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                let v = TensorView::new(Dtype::F32, s.clone(), b)
                    .map_err(|e| Error::Input(format!("state `{n}`: {e}")));
                v.map(|v| (n.clone(), v))
            })
            .collect::<Result<_>>()?;
        let hash_meta: std::collections::HashMap<String, String> = meta.into_iter().collect();
        let bytes = safetensors::serialize(views, Some(hash_meta)).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::io::write_atomic(path, |w| w.write_all(&bytes))
    }

    /// Reads a snapshot and checks that it belongs to the model of `manifest`.
    pub fn load(path: &Path, manifest: &Manifest) -> Result<Self> {
        let bad =
            |message: String| Error::Input(format!("state snapshot {}: {message}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("corrupt or truncated: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("corrupt or truncated: {e}")))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no `{k}` entry: not a famc state snapshot")))
        };
        if get("format")? != FORMAT {
            return Err(bad("not a famc state snapshot".into()));
        }
        if get("version")? != VERSION {
            return Err(bad(format!(
                "snapshot version {} (this famc reads {VERSION})",
                get("version")?
            )));
        }
        let mut stored: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect();
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        if checksum(&meta, &stored) != get("checksum")? {
            return Err(bad("checksum mismatch: the file is corrupt".into()));
        }
        if get("checkpoint_sha256")? != manifest.checkpoint_sha256 {
            return Err(bad(format!(
                "saved from another model (checkpoint sha256 {}, this model {})",
                get("checkpoint_sha256")?,
                manifest.checkpoint_sha256
            )));
        }
        let f = manifest.fam;
        for (k, want) in [
            ("block_len", f.block_len),
            ("fam_len", f.fam_len),
            ("mem_blocks", f.mem_blocks),
        ] {
            if get(k)? != want.to_string() {
                return Err(bad(format!(
                    "saved with {k} = {}, this model has {want}",
                    get(k)?
                )));
            }
        }
        if get("dtype")? != manifest.dtype {
            return Err(bad(format!(
                "saved from a {} export, this one is {}",
                get("dtype")?,
                manifest.dtype
            )));
        }
        let mut arrays = Vec::new();
        for s in &manifest.state {
            let view = st.tensor(&s.input).map_err(|_| {
                bad(format!(
                    "no state tensor `{}`: saved from another model or configuration",
                    s.input
                ))
            })?;
            if view.dtype() != Dtype::F32 || view.shape() != s.shape.as_slice() {
                return Err(bad(format!(
                    "state `{}` is {:?}{:?}, the model expects F32{:?}: saved from another model or configuration",
                    s.input,
                    view.dtype(),
                    view.shape(),
                    s.shape
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            arrays.push(ArrayD::from_shape_vec(IxDyn(view.shape()), data).expect("shape checked"));
        }
        if st.len() != manifest.state.len() {
            return Err(bad(format!(
                "{} state tensors, the model has {}: saved from another model or configuration",
                st.len(),
                manifest.state.len()
            )));
        }
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| bad(format!("`{k}` is not a number")))
        };
        let pending: Vec<u32> = get("pending")?
            .split_whitespace()
            .map(|w| {
                w.parse()
                    .map_err(|_| bad(format!("pending token `{w}` is not an id")))
            })
            .collect::<Result<_>>()?;
        if pending.len() > f.block_len
            || pending
                .iter()
                .any(|&t| t as usize >= manifest.model.vocab_size)
        {
            return Err(bad("pending tokens out of range".into()));
        }
        let nll_sum: f64 = get("nll_sum")?
            .parse()
            .map_err(|_| bad("`nll_sum` is not a number".into()))?;
        if !(nll_sum.is_finite() && nll_sum >= 0.0) {
            return Err(bad(format!(
                "`nll_sum` = {nll_sum}: a sum of negative log-likelihoods is finite and not negative"
            )));
        }
        // what the scorer that saved it holds: τ full blocks scored, the tokens since pending
        let block_index = num("block_index")?;
        let l = f.block_len as u64;
        let done = block_index
            .checked_mul(l)
            .filter(|&t| t.checked_add(l).is_some_and(|end| end <= i64::MAX as u64))
            .ok_or_else(|| {
                bad(format!(
                    "`block_index` = {block_index} is out of range: its positions do not fit int64"
                ))
            })?;
        let (scored, tokens_read) = (num("scored")?, num("tokens_read")?);
        if scored != done || tokens_read != done + pending.len() as u64 {
            return Err(bad(format!(
                "inconsistent position: block_index {block_index} (L = {l}) with {} pending tokens implies {done} scored of {} read, the file says {scored} of {tokens_read}",
                pending.len(),
                done + pending.len() as u64
            )));
        }
        if let Some((st, _)) = manifest
            .state
            .iter()
            .zip(&arrays)
            .find(|(_, a)| a.iter().any(|v| !v.is_finite()))
        {
            return Err(bad(format!(
                "state `{}` holds a non-finite value: the file is damaged",
                st.input
            )));
        }
        Ok(Snapshot {
            block_index: block_index as usize,
            state: arrays,
            pending,
            nll_sum,
            scored,
            tokens_read,
        })
    }
}
