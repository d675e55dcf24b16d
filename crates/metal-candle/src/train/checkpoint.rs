//! Checkpoints: adapter (PEFT format) + optimiser state + trainer state, written to a temporary
//! folder and renamed into place, so a crash never leaves a half-written checkpoint.

use std::path::{Path, PathBuf};

use super::data::DataPosition;
use super::metrics::MetricRecord;
use crate::{fs, Error, Result};

/// The optimiser state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state file inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The file in the checkpoints folder naming the newest checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Where the training data stream stands.
    pub data_position: DataPosition,
    /// State of the generator that seeds dropout.
    pub rng_state: u64,
    /// The run's seed.
    pub seed: u64,
    /// Settings that must match for a resume to be exact (batch size, seq len, targets, ...).
    pub fingerprint: String,
    /// Metrics logged so far (to redraw the whole loss curve after a resume).
    pub history: Vec<MetricRecord>,
}

/// The folder of checkpoint `step` under `checkpoints`.
pub fn checkpoint_dir(checkpoints: &Path, step: usize) -> PathBuf {
    checkpoints.join(format!("step-{step:06}"))
}

/// Writes a checkpoint: `write_contents` fills a temporary folder, which is then renamed to
/// `step-NNNNNN` and recorded in `latest`. Returns the checkpoint's folder.
pub fn write_checkpoint(
    checkpoints: &Path,
    state: &TrainerState,
    write_contents: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(checkpoints, state.step);
    let tmp = checkpoints.join(format!(
        ".step-{:06}.tmp-{}",
        state.step,
        std::process::id()
    ));
    let io = |p: &Path, e| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    write_contents(&tmp)?;
    fs::write_json_atomic(&tmp.join(STATE_FILE), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fs::write_atomic(&checkpoints.join(LATEST_FILE), name.as_bytes())?;
    Ok(final_dir)
}

/// Resolves `--resume PATH`: a checkpoint folder, or an output/checkpoints folder whose
/// `latest` file names one.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = dir.join(LATEST_FILE);
        if latest.is_file() {
            let name = String::from_utf8_lossy(&fs::read(&latest)?)
                .trim()
                .to_string();
            let ckpt = dir.join(&name);
            if ckpt.join(STATE_FILE).is_file() {
                return Ok(ckpt);
            }
            return Err(Error::Msg(format!(
                "{} names {name}, which is not a complete checkpoint",
                latest.display()
            )));
        }
    }
    Err(Error::Msg(format!(
        "{}: no checkpoint here (expected {STATE_FILE}, or a checkpoints/{LATEST_FILE} file)",
        path.display()
    )))
}

/// Reads a checkpoint's trainer state.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    fs::read_json(&dir.join(STATE_FILE))
}
