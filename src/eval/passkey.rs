//! PassKey: a key placed in the first block, asked for at the end of block N (docs/passkey.md).
//!
//! Token ids (vocabulary of 32; `export/passkey.py` uses the same layout and generator):
//!
//! | ids | meaning |
//! |---|---|
//! | 0 | BOS |
//! | 1 | KEY marker |
//! | 2 | QUERY marker |
//! | 3 … 18 | the 16 key values |
//! | 19 … 31 | 13 filler tokens |
//!
//! A sample at distance N blocks (block length L) holds (N+1)·L tokens: BOS at 0, filler
//! everywhere else but KEY at a position p in [1, L−2] of block 0 followed by the key value at
//! p+1, and QUERY at the last position, (N+1)·L − 1. Recall is the share of samples whose argmax
//! prediction at the QUERY position is the key.

use std::path::Path;

use crate::error::{Error, Result};
use crate::export::MANIFEST_FILE;
use crate::model::{Checkpoint, FamDefaults, FamParams};
use crate::reference::Reference;
use crate::runtime::{BackendKind, RunOptions};
use crate::session::FamModel;

use super::Engine;

/// Vocabulary size the task needs.
pub const VOCAB: u32 = 32;
/// Beginning of sequence, position 0.
pub const BOS: u32 = 0;
/// Precedes the key value.
pub const KEY: u32 = 1;
/// The question, at the last position; the key value is the answer.
pub const QUERY: u32 = 2;
/// First key value id.
pub const KEY0: u32 = 3;
/// Number of key values: chance recall is 1 / NUM_KEYS.
pub const NUM_KEYS: u32 = 16;
/// First filler id.
pub const FILLER0: u32 = 19;
/// Number of filler tokens.
pub const NUM_FILLERS: u32 = 13;

pub use crate::rng::SplitMix64;

/// One PassKey sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// (N+1)·L token ids, QUERY last.
    pub ids: Vec<u32>,
    /// The key value the model must predict after the last token.
    pub answer: u32,
}

fn check_layout(block_len: usize, distance_blocks: usize) -> Result<()> {
    if block_len < 3 {
        return Err(Error::Input(format!(
            "PassKey needs a block length of at least 3 (BOS, KEY, key value), got {block_len}"
        )));
    }
    if distance_blocks == 0 {
        return Err(Error::Input(
            "the PassKey distance must be at least 1 block".into(),
        ));
    }
    let tokens = distance_blocks
        .checked_add(1)
        .and_then(|n| n.checked_mul(block_len));
    match tokens {
        Some(n) if n <= MAX_SAMPLE_TOKENS => Ok(()),
        _ => Err(Error::Input(format!(
            "--distance-blocks {distance_blocks}: a sample of {} blocks of {block_len} tokens is longer than famc evaluates (at most {MAX_SAMPLE_TOKENS} tokens)",
            distance_blocks as u128 + 1
        ))),
    }
}

/// The longest PassKey sample, in tokens (each sample is held whole while it is evaluated).
pub const MAX_SAMPLE_TOKENS: usize = 1 << 26;
/// The most tokens of one distance's samples held at once.
pub const MAX_HELD_TOKENS: usize = 1 << 28;

/// Draws one sample: fillers for every position first, then the key's position, then the key.
pub fn sample(rng: &mut SplitMix64, block_len: usize, distance_blocks: usize) -> Result<Sample> {
    check_layout(block_len, distance_blocks)?;
    let n = (distance_blocks + 1) * block_len;
    let mut ids: Vec<u32> = (0..n).map(|_| FILLER0 + rng.below(NUM_FILLERS)).collect();
    let p = 1 + rng.below(block_len as u32 - 2) as usize;
    let answer = KEY0 + rng.below(NUM_KEYS);
    ids[0] = BOS;
    ids[p] = KEY;
    ids[p + 1] = answer;
    ids[n - 1] = QUERY;
    Ok(Sample { ids, answer })
}

/// `count` samples from a generator seeded with `seed`.
pub fn samples(
    seed: u64,
    block_len: usize,
    distance_blocks: usize,
    count: usize,
) -> Result<Vec<Sample>> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| sample(&mut rng, block_len, distance_blocks))
        .collect()
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct PasskeyOptions {
    /// Distances N in blocks, one figure each.
    pub distances: Vec<usize>,
    /// Samples per distance.
    pub samples: usize,
    /// Seed of the sample generator.
    pub seed: u64,
    /// Evaluate the same weights with F = 0 (plain block sliding-window attention).
    pub bswa: bool,
    /// Who runs the model.
    pub engine: Engine,
    /// Streams per batch on the graph backends.
    pub batch: usize,
    /// How the graph backends run.
    pub run_options: RunOptions,
}

impl Default for PasskeyOptions {
    fn default() -> Self {
        PasskeyOptions {
            distances: vec![16],
            samples: 256,
            seed: 12345,
            bswa: false,
            engine: Engine::Graphs(BackendKind::Tract),
            batch: 32,
            run_options: RunOptions::default(),
        }
    }
}

/// Recall at one distance.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PasskeyResult {
    /// Distance N in blocks between the key's block and the question's.
    pub distance_blocks: usize,
    /// Tokens per sample, (N+1)·L.
    pub tokens: usize,
    /// Samples whose argmax at the QUERY position is the key.
    pub correct: usize,
    /// Samples evaluated.
    pub samples: usize,
    /// correct / samples.
    pub recall: f64,
}

/// A whole evaluation: the FAM parameters used and one result per distance.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PasskeyReport {
    /// FAM parameters the model ran with (F = 0 under `bswa`).
    pub fam: FamParams,
    /// The engine's name.
    pub engine: String,
    /// The generator's seed.
    pub seed: u64,
    /// Recall of a uniform guess over the key values.
    pub chance: f64,
    /// One per requested distance, in order.
    pub results: Vec<PasskeyResult>,
}

enum Runner {
    Graphs(Box<FamModel>),
    Reference(Box<Reference>),
}

impl Runner {
    /// Logits of the last token of each sequence (all of one length).
    fn last_logits(&mut self, seqs: &[&[u32]], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        match self {
            Runner::Reference(r) => {
                for ids in seqs {
                    let logits = r.forward(ids)?;
                    let last = logits.row(logits.nrows() - 1);
                    out.push(last.iter().map(|&v| v as f32).collect());
                }
            }
            Runner::Graphs(m) => {
                let l_len = m.fam_params().block_len;
                for group in seqs.chunks(batch.max(1)) {
                    let mut states = m.new_batch(group.len())?;
                    let len = group[0].len();
                    let mut last = Vec::new();
                    for start in (0..len).step_by(l_len) {
                        let end = (start + l_len).min(len);
                        let blocks: Vec<&[u32]> = group.iter().map(|s| &s[start..end]).collect();
                        last = m.step_batch(&mut states, &blocks)?;
                    }
                    out.extend(last.iter().map(|l| l.row(l.nrows() - 1).to_vec()));
                }
            }
        }
        Ok(out)
    }
}

/// Index of the largest value; NaN never wins, so a broken model scores a miss.
fn argmax(v: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

fn open(path: &Path, opts: &PasskeyOptions) -> Result<(Runner, FamParams)> {
    if path.join(MANIFEST_FILE).exists() {
        let kind = match opts.engine {
            Engine::Graphs(kind) => kind,
            Engine::Reference => {
                return Err(Error::Input(format!(
                    "the reference needs a checkpoint directory; {} is an export",
                    path.display()
                )))
            }
        };
        if opts.bswa {
            return Err(Error::Input(format!(
                "the BSWA comparison (F = 0) recompiles the weights and needs a checkpoint directory; {} is an export",
                path.display()
            )));
        }
        let m = FamModel::open(path, kind, &opts.run_options)?;
        let fam = m.fam_params();
        return Ok((Runner::Graphs(Box::new(m)), fam));
    }
    let mut ck = Checkpoint::load(path)?;
    let mut fam = ck.fam_params(FamDefaults::default())?;
    if opts.bswa {
        // With F = 0 the learned prompt is unused; dropping it lets any F = 0 model be built.
        fam.fam_len = 0;
        ck.weights.fam_init = None;
    }
    let runner = match opts.engine {
        Engine::Reference => Runner::Reference(Box::new(Reference::new(&ck, fam)?)),
        Engine::Graphs(kind) => Runner::Graphs(Box::new(FamModel::compile(
            &ck,
            fam,
            kind,
            &opts.run_options,
        )?)),
    };
    Ok((runner, fam))
}

/// Evaluates PassKey recall of the model at `path` (an export or a checkpoint directory).
pub fn evaluate(path: &Path, opts: &PasskeyOptions) -> Result<PasskeyReport> {
    if opts.samples == 0 {
        return Err(Error::Input("--samples must be at least 1".into()));
    }
    if opts.distances.is_empty() {
        return Err(Error::Input("no PassKey distance given".into()));
    }
    let (mut runner, fam) = open(path, opts)?;
    for &distance in &opts.distances {
        check_layout(fam.block_len, distance)?;
        let held = (distance as u128 + 1) * fam.block_len as u128 * opts.samples as u128;
        if held > MAX_HELD_TOKENS as u128 {
            return Err(Error::Input(format!(
                "--samples {} at --distance-blocks {distance}: {held} tokens, more than famc holds for one distance (at most {MAX_HELD_TOKENS})",
                opts.samples
            )));
        }
    }
    let vocab = match &runner {
        Runner::Graphs(m) => m.manifest().model.vocab_size,
        Runner::Reference(r) => r.config().vocab_size,
    };
    if vocab < VOCAB as usize {
        return Err(Error::Input(format!(
            "PassKey uses token ids up to {}, but the model's vocab_size is {vocab}",
            VOCAB - 1
        )));
    }
    let mut results = Vec::with_capacity(opts.distances.len());
    for &distance in &opts.distances {
        let set = samples(opts.seed, fam.block_len, distance, opts.samples)?;
        let seqs: Vec<&[u32]> = set.iter().map(|s| s.ids.as_slice()).collect();
        let logits = runner.last_logits(&seqs, opts.batch)?;
        let correct = set
            .iter()
            .zip(&logits)
            .filter(|(s, l)| argmax(l) == Some(s.answer as usize))
            .count();
        results.push(PasskeyResult {
            distance_blocks: distance,
            tokens: set[0].ids.len(),
            correct,
            samples: set.len(),
            recall: correct as f64 / set.len() as f64,
        });
    }
    Ok(PasskeyReport {
        fam,
        engine: opts.engine.name().to_string(),
        seed: opts.seed,
        chance: 1.0 / f64::from(NUM_KEYS),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_skips_nan_and_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, f32::NAN, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN]), None);
    }

    #[test]
    fn layout_is_refused_when_it_cannot_fit() {
        let mut rng = SplitMix64::new(0);
        assert!(sample(&mut rng, 2, 4).is_err());
        assert!(sample(&mut rng, 8, 0).is_err());
    }
}
