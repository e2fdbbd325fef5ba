//! SIGINT and SIGTERM: remove the temporary files and directories famc is writing, say so, and
//! exit (130 or 143), instead of leaving hidden temporaries of up to gigabytes behind.
//!
//! Writers register what they create ([`register`]) and drop the guard once the temporary has
//! been renamed into place or removed. [`install`] is the binary's; a library user that does not
//! call it keeps the default signal behaviour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

fn registry() -> &'static Mutex<BTreeMap<u64, PathBuf>> {
    static TEMPS: OnceLock<Mutex<BTreeMap<u64, PathBuf>>> = OnceLock::new();
    TEMPS.get_or_init(Default::default)
}

/// A registered temporary: removed if a signal ends the process while the guard lives.
#[derive(Debug)]
pub struct TempGuard(u64);

impl Drop for TempGuard {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// The signal being handled, once the handler has started (0 before).
static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether a SIGINT or SIGTERM is being handled. A writer whose temporaries the handler is
/// removing can fail for that reason alone; the caller then waits for the handler's exit
/// ([`wait_for_handler`]) rather than report that failure.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst) != 0
}

/// Waits (at most 30 s) for the signal handler, which exits the process; exits with 128 + the
/// signal itself if it has not by then.
pub fn wait_for_handler() -> ! {
    for _ in 0..3000 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::process::exit(128 + INTERRUPTED.load(Ordering::SeqCst))
}

/// Registers a temporary file or directory for removal on SIGINT/SIGTERM.
pub fn register(path: &Path) -> TempGuard {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, path.to_path_buf());
    TempGuard(id)
}

/// Removes every registered temporary; returns how many existed.
fn remove_all() -> usize {
    let paths: Vec<PathBuf> = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    paths
        .iter()
        .filter(|p| match std::fs::symlink_metadata(p) {
            // the writing thread may still add files while the directory is emptied: retry
            Ok(m) if m.is_dir() => (0..20).any(|_| std::fs::remove_dir_all(p).is_ok()),
            Ok(_) => std::fs::remove_file(p).is_ok(),
            Err(_) => false,
        })
        .count()
}

type Hook = Box<dyn FnOnce() + Send>;

fn shutdown_hook() -> &'static Mutex<Option<Hook>> {
    static HOOK: OnceLock<Mutex<Option<Hook>>> = OnceLock::new();
    HOOK.get_or_init(Default::default)
}

/// Makes the next SIGINT or SIGTERM call `hook` (a server's graceful shutdown) instead of
/// exiting; the one after that exits as usual.
pub fn on_next_signal(hook: impl FnOnce() + Send + 'static) {
    *shutdown_hook().lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
}

/// Handles SIGINT and SIGTERM on a thread of their own: temporaries removed, a message on
/// stderr, exit status 128 + the signal's number. Idempotent.
pub fn install() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
                .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
            std::thread::Builder::new()
                .name("famc-signals".into())
                .spawn(move || {
                    for sig in signals.forever() {
                        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                        let hook = shutdown_hook().lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(hook) = hook {
                            eprintln!("famc: {name}: finishing the requests in flight, then stopping (again to stop at once)");
                            hook();
                            continue;
                        }
                        INTERRUPTED.store(sig, Ordering::SeqCst);
                        let removed = remove_all();
                        let what = if removed == 0 {
                            String::new()
                        } else {
                            format!("; removed {removed} temporary file(s)")
                        };
                        eprintln!(
                            "famc: interrupted by {name}{what}; outputs were left as they were"
                        );
                        std::process::exit(128 + sig);
                    }
                })
                .map(|_| ())
                .map_err(|e| format!("cannot start the signal thread: {e}"))
        })
        .clone()
        .map_err(Error::Input)
}
