//! The threads that run blocks: each gathers the blocks that concurrent sequences are waiting on
//! and runs those of equal length as one batch (one block-graph call for all of them). While one
//! thread runs its batch the next gathers and runs another, on a block-graph runner of its own
//! (`RunnerPool`).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::Array2;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::session::{FamModel, StreamState};

/// One sequence's next block (a full one advances its state; a shorter one only gives logits).
struct Job {
    state: StreamState,
    block: Vec<u32>,
    reply: oneshot::Sender<(StreamState, Result<Array2<f32>>)>,
}

/// Counters of the blocks run, for `/v2/models/<name>/stats`.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Block-graph calls.
    pub calls: AtomicU64,
    /// Blocks run (the sum of the calls' batch sizes).
    pub blocks: AtomicU64,
    /// The largest batch run so far.
    pub largest: AtomicU64,
}

/// A handle to the batching threads; they end when every handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts `workers` threads: each call runs at most `max_batch` blocks, gathered for up to
    /// `delay` after the first arrives.
    pub fn spawn(
        model: Arc<FamModel>,
        max_batch: usize,
        delay: Duration,
        stats: Arc<BatchStats>,
        workers: usize,
    ) -> Result<(Self, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..workers.max(1))
            .map(|i| {
                let (model, rx, stats) = (model.clone(), rx.clone(), stats.clone());
                std::thread::Builder::new()
                    .name(format!("famc-batcher-{i}"))
                    .spawn(move || run(&model, &rx, max_batch.max(1), delay, &stats))
                    .map_err(|e| Error::Input(format!("cannot start a batching thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Batcher { tx }, handles))
    }

    /// Runs `block` on `state`; gives the state back (advanced when the block was full) with the
    /// block's logits [T, V] or the error.
    pub async fn run(
        &self,
        state: StreamState,
        block: Vec<u32>,
    ) -> std::result::Result<(StreamState, Result<Array2<f32>>), Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                state,
                block,
                reply,
            })
            .map_err(|_| Error::Input("the server is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Input("the batching threads stopped".into()))
    }
}

fn run(
    model: &FamModel,
    rx: &Mutex<mpsc::Receiver<Job>>,
    max_batch: usize,
    delay: Duration,
    stats: &BatchStats,
) {
    while let Some(mut jobs) = gather(rx, max_batch, delay) {
        // blocks of one length run together, in arrival order
        while !jobs.is_empty() {
            let len = jobs[0].block.len();
            let (group, rest): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| j.block.len() == len);
            jobs = rest;
            run_group(model, group, stats);
        }
    }
}

/// The next batch's jobs, gathered by one thread at a time (the others run theirs meanwhile);
/// `None` once every handle is gone.
fn gather(rx: &Mutex<mpsc::Receiver<Job>>, max_batch: usize, delay: Duration) -> Option<Vec<Job>> {
    // a poisoned lock only means another batching thread panicked while gathering
    let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
    let mut jobs = vec![rx.recv().ok()?];
    let deadline = Instant::now() + delay;
    // blocks already waiting join at once; then wait up to `delay` for a full batch
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
    }
    Some(jobs)
}

fn run_group(model: &FamModel, group: Vec<Job>, stats: &BatchStats) {
    let mut states = Vec::with_capacity(group.len());
    let mut blocks = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    for job in group {
        states.push(job.state);
        blocks.push(job.block);
        replies.push(job.reply);
    }
    let n = states.len() as u64;
    let result = {
        let views: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        // a panic inside a backend must not take the server down: it fails this batch only
        std::panic::catch_unwind(AssertUnwindSafe(|| model.step(&mut states, &views)))
            .unwrap_or_else(|_| {
                Err(Error::Backend {
                    backend: model.backend().name(),
                    message: "the block run panicked".into(),
                })
            })
    };
    stats.calls.fetch_add(1, Ordering::Relaxed);
    stats.blocks.fetch_add(n, Ordering::Relaxed);
    stats.largest.fetch_max(n, Ordering::Relaxed);
    match result {
        Ok(logits) => {
            for ((state, reply), l) in states.into_iter().zip(replies).zip(logits) {
                let _ = reply.send((state, Ok(l)));
            }
        }
        Err(e) => {
            let (backend, message) = match e {
                Error::Backend { backend, message } => (backend, message),
                other => (model.backend().name(), other.to_string()),
            };
            for (state, reply) in states.into_iter().zip(replies) {
                let message = message.clone();
                let _ = reply.send((state, Err(Error::Backend { backend, message })));
            }
        }
    }
}
