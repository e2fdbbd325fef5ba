//! Generation: a loop over any [`LanguageModel`] as an iterator of tokens, samplers, and the FAM
//! decoder that drives the decode graph across block boundaries.

use ndarray::{concatenate, ArrayD, Axis, IxDyn};

use crate::contract::{IoDim, Role};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use std::sync::Arc;

use crate::runtime::{OutputTo, Tensor, Value};
use crate::session::{DecodeGraphs, FamModel, StreamState};

/// A causal language model that takes tokens one after another.
pub trait LanguageModel {
    /// Feeds `tokens` (at least one) after those fed before; returns the logits that follow the last.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id on ties).
    Greedy,
    /// A random draw from softmax(logits / temperature), restricted to the `top_k` most likely
    /// tokens and then to the smallest set whose probability reaches `top_p`.
    Random {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends when one of these is chosen; it is not yielded.
    pub stop_tokens: Vec<u32>,
}

/// Chooses tokens from logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        let seed = match &sampling {
            Sampling::Greedy => 0,
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                seed,
            } => {
                if !(*temperature > 0.0 && temperature.is_finite()) {
                    return Err(Error::Input(format!(
                        "temperature {temperature} must be positive"
                    )));
                }
                if *top_k == Some(0) {
                    return Err(Error::Input("top-k must be at least 1".into()));
                }
                if let Some(p) = top_p {
                    if !(*p > 0.0 && *p <= 1.0) {
                        return Err(Error::Input(format!("top-p {p} must be in (0, 1]")));
                    }
                }
                *seed
            }
        };
        Ok(Sampler {
            sampling,
            rng: SplitMix64::new(seed),
        })
    }

    /// The next token for `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        let Sampling::Random {
            temperature,
            top_k,
            top_p,
            ..
        } = &self.sampling
        else {
            return argmax();
        };
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = top_k {
            order.truncate(*k);
        }
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / *temperature as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = top_p {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= *top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (p, &i) in probs.iter().zip(&order) {
            r -= p;
            if r < 0.0 {
                return i as u32;
            }
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// The generation loop as an iterator: feeds the prompt, then yields each new token until
/// `max_new_tokens` or a stop token.
pub struct Generator<'a, M: LanguageModel> {
    model: &'a mut M,
    prompt: Option<Vec<u32>>,
    last: Option<u32>,
    sampler: Sampler,
    remaining: usize,
    stop: Vec<u32>,
    done: bool,
}

/// Generates after `prompt` with `opts`.
pub fn generate<'a, M: LanguageModel>(
    model: &'a mut M,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<Generator<'a, M>> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt holds no tokens".into()));
    }
    Ok(Generator {
        model,
        prompt: Some(prompt.to_vec()),
        last: None,
        sampler: Sampler::new(opts.sampling.clone())?,
        remaining: opts.max_new_tokens,
        stop: opts.stop_tokens.clone(),
        done: false,
    })
}

impl<M: LanguageModel> Iterator for Generator<'_, M> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Result<u32>> {
        if self.done || self.remaining == 0 {
            return None;
        }
        let input = match (self.prompt.take(), self.last) {
            (Some(p), _) => p,
            (None, Some(t)) => vec![t],
            (None, None) => return None,
        };
        let logits = match self.model.feed(&input) {
            Ok(l) => l,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let token = self.sampler.sample(&logits);
        if self.stop.contains(&token) {
            self.done = true;
            return None;
        }
        self.remaining -= 1;
        self.last = Some(token);
        Some(Ok(token))
    }
}

/// One stream of a FAM model, fed token by token through the decode graph and block by block
/// through the block graph (prompts); the state advances exactly at block boundaries.
///
/// Everything a decode call reads stays in the backend's values between calls (the stream's
/// memory, the block's FAM keys and values, the in-block cache): per token the token goes in, the
/// logits and one key and value row per layer come out, and the rows are written into the cache
/// in place (host memory: tract, ONNX Runtime's CPU provider; a GPU session's cache goes in from
/// the host).
pub struct FamDecoder<'m> {
    model: &'m FamModel,
    /// The model's decode and FAM-kv graphs, opened once per model and shared by its decoders.
    graphs: Arc<DecodeGraphs>,
    state: StreamState,
    block: Vec<u32>,
    /// Per layer: FAM keys then values [1, Hkv, F, Dh] of the current block, when F > 0.
    fam_kv_values: Option<Vec<Value>>,
    /// Per layer: cache keys then values [1, Hkv, L, Dh], held by the decode graph's backend;
    /// `None` only after a failed call.
    cache: Option<Vec<Value>>,
    /// How the decode and FAM-kv graphs meet the stream, by famc.json's roles.
    binding: DecodeBinding,
}

/// Where a decode or FAM-kv graph input comes from.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Token,
    Position,
    BlockIndex,
    /// The stream state's tensor at this index of famc.json's `state` list.
    State(usize),
    /// The FAM-kv graph's output at this index.
    FamKv(usize),
    /// The decoder's cache at this index.
    Cache(usize),
}

/// The decode and FAM-kv graphs' inputs and outputs, bound once by the roles of famc.json's
/// contract.
#[derive(Debug)]
struct DecodeBinding {
    decode: Vec<Feed>,
    fam_kv: Vec<Feed>,
    /// The decode graph's logits output.
    logits: usize,
    /// The decode graph's new key/value rows: (output index, cache index).
    rows: Vec<(usize, usize)>,
    /// The shape of each cache the decoder keeps (one stream).
    caches: Vec<Vec<usize>>,
}

impl DecodeBinding {
    fn new(m: &crate::export::Manifest, dir: &std::path::Path) -> Result<Self> {
        let err = |message: String| Error::Export {
            dir: dir.to_path_buf(),
            message,
        };
        let c = &m.contract;
        let mut caches: Vec<(Role, Option<usize>, Vec<usize>)> = Vec::new();
        let mut feed = |graph: &str, io: &crate::contract::Io| -> Result<Feed> {
            let unfed = || {
                err(format!(
                    "{graph} graph input `{}` has role {}, which famc's decoder cannot feed",
                    io.name, io.role
                ))
            };
            Ok(match io.role {
                Role::InputIds if graph == "decode" => Feed::Token,
                Role::Position if graph == "decode" => Feed::Position,
                Role::BlockIndex if graph == "fam_kv" => Feed::BlockIndex,
                Role::Fam | Role::MemK | Role::MemV => {
                    Feed::State(m.state_index(io.role, io.layer).ok_or_else(unfed)?)
                }
                Role::FamK | Role::FamV if graph == "decode" => Feed::FamKv(
                    c.fam_kv
                        .as_ref()
                        .and_then(|g| g.output_index(io.role, io.layer))
                        .ok_or_else(unfed)?,
                ),
                Role::CacheK | Role::CacheV if graph == "decode" => {
                    let shape = io
                        .shape
                        .iter()
                        .enumerate()
                        .map(|(i, d)| match d {
                            IoDim::Fixed(n) => Some(*n),
                            IoDim::Sym(_) => (i == 0).then_some(1),
                        })
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(unfed)?;
                    caches.push((io.role, io.layer, shape));
                    Feed::Cache(caches.len() - 1)
                }
                _ => return Err(unfed()),
            })
        };
        let decode = c
            .decode
            .inputs
            .iter()
            .map(|io| feed("decode", io))
            .collect::<Result<Vec<_>>>()?;
        let fam_kv = match &c.fam_kv {
            Some(g) => g
                .inputs
                .iter()
                .map(|io| feed("fam_kv", io))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let logits = c
            .decode
            .output_index(Role::Logits, None)
            .ok_or_else(|| err("famc.json's contract gives the decode graph no logits".into()))?;
        let rows = caches
            .iter()
            .enumerate()
            .map(|(i, &(role, layer, _))| {
                let new = if role == Role::CacheK {
                    Role::NewK
                } else {
                    Role::NewV
                };
                c.decode
                    .output_index(new, layer)
                    .map(|o| (o, i))
                    .ok_or_else(|| {
                        err(format!(
                            "famc.json's contract gives the decode graph no {new} output for layer {layer:?}"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeBinding {
            decode,
            fam_kv,
            logits,
            rows,
            caches: caches.into_iter().map(|(_, _, shape)| shape).collect(),
        })
    }
}

impl<'m> FamDecoder<'m> {
    /// A new stream on `model` (its decode graphs are opened on the first decoder of the model).
    pub fn new(model: &'m FamModel) -> Result<Self> {
        Self::from_state(model, model.new_state())
    }

    /// A stream on `model` that resumes at a block boundary from `state` (e.g. a snapshot's).
    pub fn from_state(model: &'m FamModel, state: StreamState) -> Result<Self> {
        let m = model.manifest();
        let dir = model.export_dir();
        let graphs = model.decode_graphs()?;
        let fam_kv = graphs.fam_kv.as_ref();
        let binding = DecodeBinding::new(m, dir)?;
        if fam_kv.is_none() && binding.decode.iter().any(|f| matches!(f, Feed::FamKv(_))) {
            return Err(Error::Export {
                dir: dir.to_path_buf(),
                message:
                    "the decode graph takes FAM keys and values but the export has no fam_kv graph"
                        .into(),
            });
        }
        let zeros = |shape: &[usize]| Tensor::F32(ArrayD::<f32>::zeros(IxDyn(shape)));
        let cache = if model.run_options().host_state {
            binding
                .caches
                .iter()
                .map(|s| Value::host(zeros(s)))
                .collect()
        } else {
            let runner = graphs.decode.checkout()?;
            binding
                .caches
                .iter()
                .map(|s| runner.hold(zeros(s)))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(FamDecoder {
            model,
            graphs,
            state,
            block: Vec::new(),
            fam_kv_values: None,
            cache: Some(cache),
            binding,
        })
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.state.block_index() * self.model.fam_params().block_len + self.block.len()
    }

    /// The in-block key/value caches, per layer keys then values [1, Hkv, L, Dh] (empty only
    /// after a failed call): where they lie and that they stay put, for tests and `famc doctor`.
    pub fn caches(&self) -> &[Value] {
        self.cache.as_deref().unwrap_or(&[])
    }

    /// The stream's state after its last full block.
    pub fn state(&self) -> &StreamState {
        &self.state
    }

    fn refresh_fam_kv(&mut self) -> Result<()> {
        let Some(runner) = self.graphs.fam_kv.as_ref() else {
            return Ok(());
        };
        let mut runner = runner.checkout()?;
        let tau = Value::host(Tensor::I64(ArrayD::from_elem(
            IxDyn(&[1]),
            self.state.block_index() as i64,
        )));
        let values = self.state.values();
        let inputs: Vec<&Value> = self
            .binding
            .fam_kv
            .iter()
            .map(|feed| match *feed {
                Feed::State(i) => &values[i],
                _ => &tau,
            })
            .collect();
        let host = self.model.run_options().host_state;
        let outputs = (0..runner.output_names().len())
            .map(|_| {
                if host {
                    OutputTo::Host
                } else {
                    OutputTo::Backend
                }
            })
            .collect();
        self.fam_kv_values = Some(runner.run_values(&inputs, outputs)?);
        Ok(())
    }

    fn decode_one(&mut self, token: u32) -> Result<Vec<f32>> {
        let m = self.model.manifest();
        if token as usize >= m.model.vocab_size {
            return Err(Error::Input(format!(
                "token id {token} at position {} is out of range (vocab_size {})",
                self.position(),
                m.model.vocab_size
            )));
        }
        crate::session::check_position(
            0,
            self.state.block_index(),
            self.model.fam_params().block_len,
        )?;
        if self.graphs.fam_kv.is_some() && self.fam_kv_values.is_none() {
            self.refresh_fam_kv()?;
        }
        let cache = self.cache.take().ok_or_else(|| {
            Error::Input("a decode call of this stream failed earlier: start a new stream".into())
        })?;
        let token_value = Value::host(Tensor::I64(ArrayD::from_elem(IxDyn(&[1, 1]), token as i64)));
        let pos = Value::host(Tensor::I64(ArrayD::from_elem(
            IxDyn(&[1]),
            self.position() as i64,
        )));
        let state = self.state.values();
        let fam_kv = self.fam_kv_values.as_deref().unwrap_or(&[]);
        let inputs = self
            .binding
            .decode
            .iter()
            .map(|feed| match *feed {
                Feed::Token => Ok(&token_value),
                Feed::Position => Ok(&pos),
                Feed::State(i) => Ok(&state[i]),
                Feed::Cache(i) => Ok(&cache[i]),
                Feed::FamKv(i) => fam_kv.get(i).ok_or_else(|| {
                    Error::Input("the FAM-kv graph returned too few outputs".into())
                }),
                Feed::BlockIndex => unreachable!("the decode graph takes no block index"),
            })
            .collect::<Result<Vec<&Value>>>()?;
        let outputs = (0..m.contract.decode.outputs.len())
            .map(|_| OutputTo::Host)
            .collect();
        let mut out: Vec<Option<Value>> = self
            .graphs
            .decode
            .checkout()?
            .run_values(&inputs, outputs)?
            .into_iter()
            .map(Some)
            .collect();
        let mut take = |i: usize| {
            out.get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| Error::Input(format!("the decode graph returned no output #{i}")))
        };
        let logits = take(self.binding.logits)?.into_host_f32()?;
        if let Some(v) = logits.iter().find(|v| !v.is_finite()) {
            return Err(Error::Backend {
                backend: self.model.backend().name(),
                message: format!(
                    "the decode graph returned a non-finite logit ({v}) at position {}: the computation overflowed float32",
                    self.position()
                ),
            });
        }
        let rows = self
            .binding
            .rows
            .iter()
            .map(|&(o, c)| Ok((take(o)?, c)))
            .collect::<Result<Vec<_>>>()?;
        let mut cache = cache;
        for (row, c) in &rows {
            cache[*c].write_at(2, self.block.len(), row)?;
        }
        self.cache = Some(cache);
        self.block.push(token);
        if self.block.len() == m.fam.block_len {
            self.finish_block()?;
        }
        Ok(logits.iter().copied().collect())
    }

    /// At a block boundary: the block graph advances the state over the completed block.
    fn finish_block(&mut self) -> Result<Vec<f32>> {
        let block = std::mem::take(&mut self.block);
        let logits = self
            .model
            .step(std::slice::from_mut(&mut self.state), &[&block])?;
        self.fam_kv_values = None;
        Ok(logits[0].row(block.len() - 1).to_vec())
    }
}

impl LanguageModel for FamDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let l = self.model.fam_params().block_len;
        let mut last = None;
        let mut rest = tokens;
        while !rest.is_empty() {
            if self.block.is_empty() && rest.len() >= l {
                // whole blocks of a prompt go through the block graph at once
                self.block.extend_from_slice(&rest[..l]);
                last = Some(self.finish_block()?);
                rest = &rest[l..];
            } else {
                last = Some(self.decode_one(rest[0])?);
                rest = &rest[1..];
            }
        }
        last.ok_or_else(|| Error::Input("nothing to feed".into()))
    }
}

/// Concatenates logits rows; a helper for tests and tools comparing decode and block logits.
pub fn stack_rows(rows: &[Vec<f32>]) -> Result<ndarray::Array2<f32>> {
    let views: Vec<_> = rows
        .iter()
        .map(|r| ndarray::ArrayView1::from(r.as_slice()).insert_axis(Axis(0)))
        .collect();
    concatenate(Axis(0), &views).map_err(|e| Error::Input(e.to_string()))
}
