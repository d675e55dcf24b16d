//! Where a model comes from: a local folder, a GGUF file, or a Hugging Face Hub id.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// A model location as a user writes it on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face folder (config.json + safetensors).
    HfDir(PathBuf),
    /// A llama.cpp GGUF file.
    Gguf(PathBuf),
    /// A Hub repository `owner/name`, at a revision (default `main`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl ModelSource {
    /// Interprets `spec`: an existing folder or `.gguf` file, else a Hub id `owner/name` or
    /// `owner/name@revision`.
    ///
    /// ```
    /// use metal_candle::model::load::ModelSource;
    /// let s = ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct@main")?;
    /// assert_eq!(s, ModelSource::Hub { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "main".into() });
    /// assert!(ModelSource::parse("./no/such/model/here").is_err());
    /// # Ok::<(), metal_candle::Error>(())
    /// ```
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::HfDir(path.to_path_buf()));
        }
        if path.is_file() {
            let is_gguf = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            return if is_gguf {
                Ok(Self::Gguf(path.to_path_buf()))
            } else {
                Err(Error::file(spec, "is a file but not a .gguf; pass a GGUF file, a Hugging Face model folder or a Hub id"))
            };
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return Err(Error::Msg(format!("{spec:?}: empty revision after '@'"))),
            None => (spec, "main"),
        };
        if is_hub_id(repo) {
            return Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        Err(Error::Msg(format!(
            "{spec:?} is neither an existing folder or .gguf file nor a Hugging Face Hub id (owner/name)"
        )))
    }

    /// The local folder or file holding the model: the path itself, or for a Hub id the
    /// snapshot folder in the Hugging Face cache (`HF_HOME` or `~/.cache/huggingface`),
    /// downloading it first when built with the `hub` feature.
    pub fn resolve(&self) -> Result<ModelSource> {
        self.resolve_in(&Cache::from_env())
    }

    /// [`ModelSource::resolve`] with an explicit Hub cache.
    pub fn resolve_in(&self, cache: &Cache) -> Result<ModelSource> {
        match self {
            Self::HfDir(_) | Self::Gguf(_) => Ok(self.clone()),
            Self::Hub { repo, revision } => {
                let hub_repo = Repo::with_revision(repo.clone(), RepoType::Model, revision.clone());
                if let Some(config) = cache.repo(hub_repo.clone()).get("config.json") {
                    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
                    return Ok(Self::HfDir(dir));
                }
                download(repo, revision, cache).map(Self::HfDir)
            }
        }
    }
}

/// `owner/name` with the characters the Hub allows.
fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !part.starts_with('.')
    };
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

#[cfg(feature = "hub")]
fn download(repo: &str, revision: &str, cache: &Cache) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let api = ApiBuilder::from_cache(cache.clone())
        .build()
        .map_err(|e| Error::Msg(format!("Hugging Face Hub client: {e}")))?;
    let hub = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let get = |file: &str| {
        hub.get(file)
            .map_err(|e| Error::Msg(format!("downloading {file} of {repo}@{revision}: {e}")))
    };
    let config = get("config.json")?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let _ = get(optional); // not every repository has every one of these
    }
    match get("model.safetensors") {
        Ok(_) => {}
        Err(single_err) => {
            let index = get("model.safetensors.index.json").map_err(|_| single_err)?;
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(index.display(), e.to_string()))?;
            let shards: std::collections::BTreeSet<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .into_iter()
                .flatten()
                .filter_map(|(_, f)| f.as_str())
                .collect();
            for shard in shards {
                get(shard)?;
            }
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(not(feature = "hub"))]
fn download(repo: &str, revision: &str, cache: &Cache) -> Result<PathBuf> {
    Err(Error::Msg(format!(
        "{repo}@{revision} is not in the Hugging Face cache at {}; build with `--features hub` to download it, or pass a local folder or .gguf file",
        cache.path().display()
    )))
}
