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

/// Writes `bytes` to `path` atomically, creating the parent folder if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
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

/// Writes named tensors as safetensors, atomically. Tensors are moved to the CPU first.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        host.push((
            name.clone(),
            t.to_device(&candle_core::Device::Cpu)?.contiguous()?,
        ));
    }
    let bytes = safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| {
            Error::Msg(format!(
                "{}: could not serialise safetensors: {e}",
                path.display()
            ))
        })?;
    write_atomic(path, &bytes)
}

/// Reads a whole file, naming the path on failure.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a JSON file into `T`, naming the path and the problem on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Msg(format!("{}: invalid JSON: {e}", path.display())))
}

/// Loads every tensor of a safetensors file onto `device`, naming the path on failure.
pub fn read_safetensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let bytes = read(path)?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::Msg(format!(
            "{}: not a valid safetensors file ({e})",
            path.display()
        ))
    })
}
