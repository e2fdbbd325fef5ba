//! Reading token ids and writing results without ever leaving a half-written file.

use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, ArrayView2};

use crate::error::{Error, Result};

/// Parses whitespace-separated token ids; `source` names the input in errors.
pub fn parse_token_ids(text: &str, source: &str, vocab_size: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (pos, word) in text.split_whitespace().enumerate() {
        let id: u64 = word.parse().map_err(|_| Error::Tokens {
            source_name: source.to_string(),
            message: format!("token {pos}: `{word}` is not a non-negative integer id"),
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

/// Reads a file of whitespace-separated token ids.
pub fn read_token_ids(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_token_ids(&text, &path.display().to_string(), vocab_size)
}

/// Writes `path` through a temporary file in the same directory, renamed into place once complete.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let werr = |message: String| Error::Write {
        path: path.to_path_buf(),
        message,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(werr("is a directory".into()));
    }
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
    {
        let mut buf = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut buf).map_err(|e| werr(e.to_string()))?;
        buf.flush().map_err(|e| werr(e.to_string()))?;
    }
    tmp.as_file().sync_all().map_err(|e| werr(e.to_string()))?;
    set_shareable(tmp.as_file()).map_err(|e| werr(e.to_string()))?;
    tmp.persist(path).map_err(|e| werr(e.error.to_string()))?;
    Ok(())
}

/// Temporary files are created private (0600); a finished output gets the usual 0644.
pub(crate) fn set_shareable(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
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
