//! Runners of one loaded graph for callers that run at once: a model's independent streams take
//! a runner each instead of queueing behind one lock around the graph.
//!
//! A second runner shares what the first loaded: on tract the same optimised plans (each runner
//! has only its own run state); on ONNX Runtime's CPU provider another session over the same
//! shared initializers and prepacked-weights container (`ort_weights`). GPU sessions stay one
//! per graph (another would build another engine and hold another copy in device memory).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{open_graph, BackendKind, EpKind, GraphRunner, RunOptions};
use crate::error::Result;

/// Opens one more runner of a loaded graph, sharing its weights.
pub type Forker = Arc<dyn Fn() -> Result<Box<dyn GraphRunner>> + Send + Sync>;

struct Slots {
    idle: Vec<Box<dyn GraphRunner>>,
    opened: usize,
}

/// The runners of one graph: [`RunnerPool::checkout`] lends an idle one, opens another while
/// fewer than the limit exist, or waits for one to come back.
pub struct RunnerPool {
    slots: Mutex<Slots>,
    back: Condvar,
    fork: Option<Forker>,
    limit: usize,
}

impl RunnerPool {
    /// Opens the graph at `path` for `kind`, letting up to `opts`' [`RunOptions::concurrency`]
    /// callers run it at once (its default: [`default_concurrency`]).
    pub fn open(kind: BackendKind, path: &Path, opts: &RunOptions) -> Result<Self> {
        let first = open_graph(kind, path, opts)?;
        let fork = match (first.forker(), kind, opts.ep.kind) {
            (Some(f), _, _) => Some(f),
            (None, BackendKind::Ort, EpKind::Cpu) => {
                let (path, opts) = (path.to_path_buf(), opts.clone());
                let f: Forker = Arc::new(move || open_graph(kind, &path, &opts));
                Some(f)
            }
            _ => None,
        };
        let limit = match &fork {
            Some(_) => opts
                .concurrency
                .unwrap_or_else(|| default_concurrency(kind, opts))
                .max(1),
            None => 1,
        };
        Ok(Self::with_runner(first, fork, limit))
    }

    /// A pool of `first` and the runners `fork` opens, at most `limit` in all.
    pub fn with_runner(first: Box<dyn GraphRunner>, fork: Option<Forker>, limit: usize) -> Self {
        RunnerPool {
            slots: Mutex::new(Slots {
                idle: vec![first],
                opened: 1,
            }),
            back: Condvar::new(),
            fork,
            limit: limit.max(1),
        }
    }

    /// An idle runner, a new one (shared weights) while fewer than the limit are open, or the
    /// first to come back.
    pub fn checkout(&self) -> Result<Checkout<'_>> {
        let mut slots = self.lock();
        loop {
            if let Some(runner) = slots.idle.pop() {
                return Ok(self.lend(runner));
            }
            if let (Some(fork), true) = (&self.fork, slots.opened < self.limit) {
                slots.opened += 1;
                drop(slots);
                // opening can take a while (an ONNX Runtime session): not under the lock
                let runner = fork().inspect_err(|_| self.lock().opened -= 1)?;
                return Ok(self.lend(runner));
            }
            slots = self.back.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runners open so far.
    pub fn opened(&self) -> usize {
        self.lock().opened
    }

    /// The most runners this pool opens.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lend(&self, runner: Box<dyn GraphRunner>) -> Checkout<'_> {
        Checkout {
            pool: self,
            runner: Some(runner),
        }
    }

    // a poisoned lock only means a caller panicked while holding it; the slots stay consistent
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A runner lent by a [`RunnerPool`], back in the pool when dropped.
pub struct Checkout<'a> {
    pool: &'a RunnerPool,
    runner: Option<Box<dyn GraphRunner>>,
}

impl Deref for Checkout<'_> {
    type Target = dyn GraphRunner;
    fn deref(&self) -> &Self::Target {
        self.runner.as_deref().expect("held until dropped")
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.runner.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(runner) = self.runner.take() {
            self.pool.lock().idle.push(runner);
            self.pool.back.notify_one();
        }
    }
}

/// The default of [`RunOptions::concurrency`]. tract: one runner per core this process may use (its runs share one thread pool per thread
/// count, so they take turns on the cores rather than crowd them). ONNX Runtime: as many as
/// the cores hold sessions of `opts.intra_threads` each (default: every core, so one); its
/// spinning pools, oversubscribed, ran `famc serve` 0.8x slower with two sessions on two cores.
pub fn default_concurrency(kind: BackendKind, opts: &RunOptions) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match kind {
        BackendKind::Tract => cores,
        BackendKind::Ort => (cores / opts.intra_threads.unwrap_or(cores).max(1)).max(1),
    }
}
