//! Writing files atomically: a crash or a full disk never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `path` by calling `write` on a temporary path in the same folder, then renaming it
/// over `path` (atomic on POSIX file systems). On error the temporary file is removed.
///
/// ```
/// # fn main() -> metal_candle::Result<()> {
/// let dir = std::env::temp_dir().join(format!("mc-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("hello.txt");
/// metal_candle::fs::write_atomic_with(&path, |tmp| {
///     std::fs::write(tmp, "hi").map_err(|e| metal_candle::Error::Msg(e.to_string()))
/// })?;
/// assert_eq!(std::fs::read_to_string(&path).unwrap(), "hi");
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = write(&tmp).and_then(|()| {
        // Flush the data to disk before the rename makes it visible.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the original error matters more
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Msg(format!("{}: cannot serialise JSON: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Msg(format!("{}: not a file path", path.display())))?
        .to_string_lossy();
    Ok(path.with_file_name(format!(".{name}.tmp-{}", std::process::id())))
}
