//! Streaming over unlimited input: token sources read incrementally, and a scorer that never
//! holds more than one block (plus one token) of input and one block of logits.

use std::io::BufRead;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView1};

use crate::error::{Error, Result};
use crate::session::{BatchState, FamModel, StreamState};
use crate::snapshot::Snapshot;

/// The longest word [`TokenReader`] holds while waiting for the rest of it (ids have at most 20
/// digits; leading zeros beyond that are refused).
const MAX_ID_CHARS: usize = 64;

/// Token ids parsed incrementally from whitespace-separated text (a file or stdin).
pub struct TokenReader<R> {
    reader: R,
    source: String,
    vocab_size: usize,
    /// Bytes of an unfinished word (or character) waiting for the next read.
    carry: Vec<u8>,
    position: u64,
    bytes_read: u64,
    done: bool,
}

impl<R: BufRead> TokenReader<R> {
    /// Reads ids from `reader`; `source` names it in errors.
    pub fn new(reader: R, source: impl Into<String>, vocab_size: usize) -> Self {
        TokenReader {
            reader,
            source: source.into(),
            vocab_size,
            carry: Vec::new(),
            position: 0,
            bytes_read: 0,
            done: false,
        }
    }

    /// Bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    fn parse(&mut self, word: &str, out: &mut Vec<u32>) -> Result<()> {
        let err = |message: String| Error::Tokens {
            source_name: self.source.clone(),
            message,
        };
        let id: u64 = word.parse().map_err(|_| {
            err(format!(
                "token {}: `{}` is not a non-negative integer id",
                self.position,
                crate::io::shown(word)
            ))
        })?;
        if id >= self.vocab_size as u64 {
            return Err(err(format!(
                "token {}: id {id} is out of range (vocab_size {})",
                self.position, self.vocab_size
            )));
        }
        out.push(id as u32);
        self.position += 1;
        Ok(())
    }

    /// The next chunk of ids (empty at the end of input).
    pub fn next_chunk(&mut self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        while out.is_empty() && !self.done {
            let mut buf = vec![0u8; 1 << 16];
            let n = self.reader.read(&mut buf).map_err(|e| Error::Tokens {
                source_name: self.source.clone(),
                message: e.to_string(),
            })?;
            self.bytes_read += n as u64;
            if n == 0 {
                self.done = true;
            }
            let mut bytes = std::mem::take(&mut self.carry);
            bytes.extend_from_slice(&buf[..n]);
            // a character cut by the read boundary waits for the rest of it, like a word
            let valid = match std::str::from_utf8(&bytes) {
                Ok(_) => bytes.len(),
                Err(e) if e.error_len().is_none() && !self.done => e.valid_up_to(),
                Err(_) => {
                    return Err(Error::Tokens {
                        source_name: self.source.clone(),
                        message: format!("not UTF-8 text near token {}", self.position),
                    })
                }
            };
            let tail = bytes.split_off(valid);
            let text = String::from_utf8(bytes).expect("validated above");
            // a word cut by the chunk boundary waits for the rest of it
            let (complete, rest) = match text.rfind(char::is_whitespace) {
                _ if self.done => (text.as_str(), ""),
                Some(i) => text.split_at(i),
                None => ("", text.as_str()),
            };
            for word in complete.split_whitespace() {
                self.parse(word, &mut out)?;
            }
            // an id has at most 20 digits: a longer unfinished word is not one, however it ends
            if rest.len() > MAX_ID_CHARS {
                return Err(Error::Tokens {
                    source_name: self.source.clone(),
                    message: format!(
                        "token {}: `{}` is not a non-negative integer id",
                        self.position,
                        crate::io::shown(rest)
                    ),
                });
            }
            self.carry = rest.as_bytes().to_vec();
            self.carry.extend_from_slice(&tail);
        }
        Ok(out)
    }
}

/// Running negative log-likelihood of a stream: token i predicts token i + 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ScoreStats {
    /// Tokens read.
    pub tokens: u64,
    /// Predictions scored (tokens − 1 for a whole stream).
    pub scored: u64,
    /// Sum of −log p(next token).
    pub nll_sum: f64,
}

impl ScoreStats {
    /// Mean negative log-likelihood per scored prediction.
    pub fn mean_nll(&self) -> f64 {
        if self.scored == 0 {
            f64::NAN
        } else {
            self.nll_sum / self.scored as f64
        }
    }

    /// Perplexity, exp(mean NLL).
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// −log softmax(logits)[target], in f64.
pub fn nll(logits: ArrayView1<f32>, target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// Σ −log softmax(row)[target] over logits rows [T, V] and each row's target.
fn nll_of_logits(logits: &Array2<f32>, targets: &[u32]) -> f64 {
    logits
        .rows()
        .into_iter()
        .zip(targets)
        .map(|(row, &target)| nll(row, target))
        .sum()
}

/// Σ −log p of the rows' targets, from the score graph's log-probabilities.
fn nll_of_logprobs(logprobs: &Array1<f32>) -> f64 {
    -logprobs.iter().map(|&v| f64::from(v)).sum::<f64>()
}

/// Scores one stream block by block. A block runs once its next token is known, so that its last
/// prediction has a target; state therefore always sits after a full block, with at most L + 1
/// tokens buffered. Where the model scores in the graph ([`FamModel::scores_in_graph`]) only the
/// targets' log-probabilities come back from each block, not its logits.
pub struct Scorer<'m> {
    model: &'m FamModel,
    state: StreamState,
    pending: Vec<u32>,
    committed: ScoreStats,
}

impl<'m> Scorer<'m> {
    /// A new stream.
    pub fn new(model: &'m FamModel) -> Self {
        Scorer {
            model,
            state: model.new_state(),
            pending: Vec::new(),
            committed: ScoreStats::default(),
        }
    }

    /// Continues a stream from a snapshot taken by [`Scorer::snapshot`].
    pub fn resume(model: &'m FamModel, snap: Snapshot) -> Self {
        Scorer {
            model,
            state: StreamState::from_host(snap.block_index, snap.state),
            pending: snap.pending,
            committed: ScoreStats {
                tokens: snap.tokens_read,
                scored: snap.scored,
                nll_sum: snap.nll_sum,
            },
        }
    }

    fn block_len(&self) -> usize {
        self.model.fam_params().block_len
    }

    /// Feeds more tokens; runs every block whose next token is now known.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let l = self.block_len();
        self.committed.tokens += tokens.len() as u64;
        let mut rest = tokens;
        loop {
            let take = (l + 1).saturating_sub(self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() <= l {
                return Ok(());
            }
            let (block, targets) = (&self.pending[..l], &self.pending[1..=l]);
            self.committed.nll_sum += if self.model.scores_in_graph() {
                // only the targets' log-probabilities come back, not [L, V] logits
                nll_of_logprobs(&self.model.step_scored(&mut self.state, block, targets)?)
            } else {
                let logits = self
                    .model
                    .step(std::slice::from_mut(&mut self.state), &[block])?;
                nll_of_logits(&logits[0], targets)
            };
            self.committed.scored += l as u64;
            self.pending.drain(..l);
        }
    }

    /// The totals so far: the committed blocks plus the predictions inside the pending tokens,
    /// which are computed on a copy of the state and committed only when their block is full.
    pub fn totals(&self) -> Result<ScoreStats> {
        let mut stats = self.committed;
        let n = self.pending.len();
        if n > 1 {
            let (block, targets) = (&self.pending[..n - 1], &self.pending[1..]);
            stats.nll_sum += if self.model.scores_in_graph() {
                nll_of_logprobs(&self.model.preview_scored(&self.state, block, targets)?)
            } else {
                nll_of_logits(&self.model.preview(&self.state, block)?, targets)
            };
            stats.scored += n as u64 - 1;
        }
        Ok(stats)
    }

    /// The stream's state after its last full block, where the backend holds it.
    pub fn state(&self) -> &StreamState {
        &self.state
    }

    /// The stream's whole state after its last full block, with the tokens read since (the
    /// state copied out of the backend).
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            block_index: self.state.block_index(),
            state: self.state.to_host()?,
            pending: self.pending.clone(),
            nll_sum: self.committed.nll_sum,
            scored: self.committed.scored,
            tokens_read: self.committed.tokens,
        })
    }
}

/// Scores several independent streams, running the blocks of streams at the same stage as one
/// batch whose state stays in the backend; each result equals scoring that stream alone.
pub fn score_batch(model: &FamModel, streams: &[&[u32]]) -> Result<Vec<ScoreStats>> {
    let l = model.fam_params().block_len;
    let mut stats = vec![ScoreStats::default(); streams.len()];
    for (s, ids) in streams.iter().enumerate() {
        stats[s].tokens = ids.len() as u64;
    }
    // a stream scores full blocks while one more token follows: live at `start` iff len > start + l
    let mut live: Vec<usize> = (0..streams.len()).collect();
    let mut batch = model.new_batch(streams.len())?;
    let mut finished: Vec<Option<StreamState>> = (0..streams.len()).map(|_| None).collect();
    let mut start = 0;
    loop {
        let scoring = |s: usize| streams[s].len() > start + l;
        if !live.iter().all(|&s| scoring(s)) {
            // streams leaving the batch keep their state for the tail
            let mut kept = Vec::new();
            let mut kept_live = Vec::new();
            for (&s, state) in live.iter().zip(batch.into_streams()?) {
                if scoring(s) {
                    kept_live.push(s);
                    kept.push(state);
                } else {
                    finished[s] = Some(state);
                }
            }
            live = kept_live;
            if live.is_empty() {
                break;
            }
            batch = BatchState::from_streams(&kept)?;
        }
        let blocks: Vec<&[u32]> = live
            .iter()
            .map(|&s| &streams[s][start..start + l])
            .collect();
        let logits = model.step_batch(&mut batch, &blocks)?;
        for (&s, lg) in live.iter().zip(logits) {
            stats[s].nll_sum += nll_of_logits(&lg, &streams[s][start + 1..start + l + 1]);
            stats[s].scored += l as u64;
        }
        start += l;
    }
    for (s, ids) in streams.iter().enumerate() {
        let done = (stats[s].scored as usize).min(ids.len());
        let tail = &ids[done..];
        if tail.len() > 1 {
            let state = finished[s].as_ref().expect("every stream leaves the batch");
            let logits = model.preview(state, tail)?;
            stats[s].nll_sum += nll_of_logits(&logits, &tail[1..]);
            stats[s].scored += tail.len() as u64 - 1;
        }
    }
    Ok(stats)
}

/// Tokenizes UTF-8 text with a checkpoint's or export's `tokenizer.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, with a clear error when there is none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Input(format!(
                "{} has no tokenizer.json: --text needs the model's tokenizer (use --tokens with ids instead)",
                dir.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            Error::Input(format!(
                "{}: cannot load the tokenizer: {e}",
                path.display()
            ))
        })?;
        Ok(TextTokenizer { inner })
    }

    /// Ids of `text`; `first` adds the tokenizer's special tokens (such as BOS) at the start.
    pub fn encode(&self, text: &str, first: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, first)
            .map_err(|e| Error::Input(format!("cannot tokenize the text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("cannot decode ids: {e}")))
    }
}

/// Reads UTF-8 text in pieces cut after a newline (about 64 KiB each), so that a long text is
/// tokenized piece by piece rather than held whole.
pub struct TextChunks<R> {
    reader: R,
    source: String,
    done: bool,
}

impl<R: BufRead> TextChunks<R> {
    pub fn new(reader: R, source: impl Into<String>) -> Self {
        TextChunks {
            reader,
            source: source.into(),
            done: false,
        }
    }

    /// The next piece of text, or `None` at the end.
    pub fn next_piece(&mut self) -> Result<Option<String>> {
        if self.done {
            return Ok(None);
        }
        let mut piece = Vec::new();
        while piece.len() < 1 << 16 {
            let n = self
                .reader
                .read_until(b'\n', &mut piece)
                .map_err(|e| Error::Tokens {
                    source_name: self.source.clone(),
                    message: e.to_string(),
                })?;
            if n == 0 {
                self.done = true;
                break;
            }
        }
        if piece.is_empty() {
            return Ok(None);
        }
        String::from_utf8(piece)
            .map(Some)
            .map_err(|_| Error::Tokens {
                source_name: self.source.clone(),
                message: "not UTF-8 text".into(),
            })
    }
}

/// The process's peak resident set size so far (Linux `VmHWM`), when the platform tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
