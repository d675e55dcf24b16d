//! Training metrics: one JSON object per line, and the loss curve drawn at the end.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// One logged optimiser step (and, every `eval_every` steps, the validation loss).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricRecord {
    /// Optimiser step, from 1.
    pub step: usize,
    /// Mean training loss per target token over the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (not padding) processed in this step.
    pub tokens: usize,
    /// Training throughput over this step.
    pub tokens_per_sec: f64,
    /// Validation loss, on steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
}

/// Appends records to a JSONL file.
#[derive(Debug)]
pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Creates (truncates) `path` and writes `history` first (a resumed run's earlier steps).
    pub fn create(path: &Path, history: &[MetricRecord]) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let mut log = Self {
            file,
            path: path.to_path_buf(),
        };
        for r in history {
            log.append(r)?;
        }
        Ok(log)
    }

    /// Writes one record as a line.
    pub fn append(&mut self, record: &MetricRecord) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::Msg(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(|e| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        })
    }
}
