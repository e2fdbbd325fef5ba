//! Reading token ids and writing results without ever leaving a half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, ArrayView2};

use crate::error::{Error, Result};

/// Parses whitespace-separated token ids; `source` names the input in errors.
pub fn parse_token_ids(text: &str, source: &str, vocab_size: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (pos, word) in text.split_whitespace().enumerate() {
        let id: u64 = word.parse().map_err(|_| Error::Tokens {
            source_name: source.to_string(),
            message: format!(
                "token {pos}: `{}` is not a non-negative integer id",
                shown(word)
            ),
        })?;
        if id >= vocab_size as u64 {
            return Err(Error::Tokens {
                source_name: source.to_string(),
                message: format!("token {pos}: id {id} is out of range (vocab_size {vocab_size})"),
            });
        }
        ids.push(id as u32);
    }
    if ids.is_empty() {
        return Err(Error::Tokens {
            source_name: source.to_string(),
            message: "no token ids".into(),
        });
    }
    Ok(ids)
}

/// A word as error messages show it: whole when short, else its start and its length (a
/// multi-megabyte "token" must not be echoed whole).
pub fn shown(word: &str) -> String {
    const KEEP: usize = 32;
    if word.len() <= KEEP {
        return word.to_string();
    }
    let mut end = KEEP;
    while !word.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &word[..end], word.len())
}

/// Reads a file of whitespace-separated token ids.
pub fn read_token_ids(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_token_ids(&text, &path.display().to_string(), vocab_size)
}

/// Where [`write_atomic`] puts the content.
enum Target {
    /// A regular file (existing, with its permission bits, or new): a temporary beside it,
    /// renamed over it once complete.
    File {
        path: PathBuf,
        mode: Option<std::fs::Permissions>,
    },
    /// A character device, FIFO or socket (`/dev/null`, `/dev/stdout`, a named pipe): written
    /// straight into, never replaced.
    Special(PathBuf),
}

/// Classifies `path`, following symbolic links to what they name (a link stays a link).
fn target(path: &Path) -> Result<Target> {
    let werr = |message: String| Error::Write {
        path: path.to_path_buf(),
        message,
    };
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Target::File {
                    path: p,
                    mode: None,
                })
            }
            Err(e) => return Err(werr(e.to_string())),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let link = std::fs::read_link(&p).map_err(|e| werr(e.to_string()))?;
            p = match p.parent() {
                Some(dir) if link.is_relative() => dir.join(link),
                _ => link,
            };
            continue;
        }
        if ft.is_dir() {
            return Err(werr("is a directory".into()));
        }
        if ft.is_file() {
            return Ok(Target::File {
                path: p,
                mode: Some(meta.permissions()),
            });
        }
        return Ok(Target::Special(p));
    }
    Err(werr("too many levels of symbolic links".into()))
}

/// Writes `path` without ever leaving it half-written or replacing what it is: a regular file
/// (or a new one) is written to a temporary in the same directory and renamed over it once
/// complete, keeping its permission bits; a symbolic link's target is written that way and the
/// link kept; a device, FIFO or socket is written straight into, after the content is complete.
/// A failing `write` leaves the target as it was.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let werr = |message: String| Error::Write {
        path: path.to_path_buf(),
        message,
    };
    match target(path)? {
        Target::Special(dest) => {
            let mut content = Vec::new();
            write(&mut content).map_err(|e| werr(e.to_string()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(|e| werr(e.to_string()))?;
            f.write_all(&content)
                .and_then(|_| f.flush())
                .map_err(|e| werr(e.to_string()))
        }
        Target::File { path: dest, mode } => {
            let dir = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let mut tmp = tempfile::Builder::new()
                .prefix(".famc-")
                .suffix(".tmp")
                .tempfile_in(dir)
                .map_err(|e| {
                    werr(format!(
                        "cannot create a temporary file in {}: {e}",
                        dir.display()
                    ))
                })?;
            let _guard = crate::signal::register(tmp.path());
            {
                let mut buf = std::io::BufWriter::new(tmp.as_file_mut());
                write(&mut buf).map_err(|e| werr(e.to_string()))?;
                buf.flush().map_err(|e| werr(e.to_string()))?;
            }
            tmp.as_file().sync_all().map_err(|e| werr(e.to_string()))?;
            match mode {
                Some(m) => tmp.as_file().set_permissions(m),
                None => set_shareable(tmp.as_file()),
            }
            .map_err(|e| werr(e.to_string()))?;
            tmp.persist(&dest).map_err(|e| werr(e.error.to_string()))?;
            Ok(())
        }
    }
}

/// Temporary files are created private (0600); a new output gets what the umask allows of 0666.
pub(crate) fn set_shareable(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// The process's file mode creation mask.
#[cfg(unix)]
fn umask() -> u32 {
    static MASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MASK.get_or_init(|| {
        // SAFETY: umask only swaps the process's mask; it is put back at once, before any file
        // famc creates depends on it (the first call comes before the first output is made).
        unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old as u32
        }
    })
}

/// Writes a float32 `.npy` file atomically.
pub fn write_npy_f32(path: &Path, a: ArrayView2<f32>) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    write_atomic(path, |w| {
        a.write_npy(w)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
}

/// Reads a float32 `.npy` file of any rank.
pub fn read_npy_f32(path: &Path) -> Result<ArrayD<f32>> {
    use ndarray_npy::ReadNpyExt;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    ArrayD::<f32>::read_npy(std::io::BufReader::new(f))
        .map_err(|e| Error::Input(format!("{}: not a float32 .npy file: {e}", path.display())))
}

/// Syncs a directory's entries to disk, so renames into it are durable; best effort, since some
/// platforms cannot open a directory for that.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A single path component: no directory, no `..`, not absolute.
pub fn is_plain_file_name(name: &str) -> bool {
    if name.contains(['/', '\\']) {
        return false;
    }
    let mut c = Path::new(name).components();
    matches!(
        (c.next(), c.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}
