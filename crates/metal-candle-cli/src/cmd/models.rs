//! Where the commands find their models when `--model` is a folder, a GGUF file, a Hub id, or
//! absent (the fetched assets), and the loaded language model with what generation needs.

use std::path::{Path, PathBuf};

use candle_core::Device;
use metal_candle::assets::Assets;
use metal_candle::generate::{
    generate_text, CachedLlama, ChatTemplate, GeneratedText, GenerationConfig, Message,
};
use metal_candle::lora::{LoRAConfig, LoRALayer};
use metal_candle::model::load::{load, ModelSource, TextTokenizer};

use super::device::DeviceArgs;

type BoxError = Box<dyn std::error::Error>;

/// The sentence-embedding model folder for `--model` (a local folder), or all-MiniLM-L6-v2
/// from the fetched assets.
pub fn embedding_model_dir(model: Option<&str>) -> Result<PathBuf, BoxError> {
    match model {
        Some(m) if Path::new(m).is_dir() => Ok(PathBuf::from(m)),
        Some(m) => Err(format!(
            "--model {m}: no such folder (it needs config.json, tokenizer.json, model.safetensors)"
        )
        .into()),
        None => {
            let dir = Assets::in_dir(&Assets::default_dir()).minilm_dir;
            if dir.is_dir() {
                Ok(dir)
            } else {
                Err(format!(
                    "no --model given and the default {} is missing; run scripts/fetch-assets.sh \
                     (and set METAL_CANDLE_ASSETS to its folder) or pass --model",
                    dir.display()
                )
                .into())
            }
        }
    }
}

/// Which language model to run, and with which adapter.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face folder, .gguf file or Hub id (owner/name); default: SmolLM2-135M-Instruct
    /// from the fetched assets (scripts/fetch-assets.sh).
    #[arg(long)]
    pub model: Option<String>,
    /// LoRA adapter folder in PEFT format (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights (no LoRA work per token) instead of running it unmerged.
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
    /// On CUDA, launch every kernel of a decoding step from the host instead of replaying the
    /// step as a CUDA graph (same output; graphs are faster).
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

/// A loaded language model with its tokenizer and chat template.
pub struct LoadedLm {
    pub model: CachedLlama,
    pub tokenizer: tokenizers::Tokenizer,
    pub text_tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub eos_token_ids: Vec<u32>,
}

impl LoadedLm {
    /// Token ids of a plain prompt (with the tokenizer's own special tokens, as transformers'
    /// `tokenizer(text)` does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BoxError> {
        Ok(self.text_tokenizer.encode(text, true)?)
    }

    /// Token ids of a rendered chat prompt (the template already wrote the special tokens).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, BoxError> {
        Ok(self.text_tokenizer.encode(text, false)?)
    }

    /// `messages` rendered with the model's chat template, ending where the reply starts.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, BoxError> {
        let template = self
            .template
            .as_ref()
            .ok_or("this model has no chat template; drop --chat")?;
        Ok(template.render(messages, true)?)
    }

    /// Generates from `ids`, streaming the text to stdout as it decodes, then a newline.
    pub fn generate_to_stdout(
        &mut self,
        ids: &[u32],
        cfg: &GenerationConfig,
    ) -> Result<GeneratedText, BoxError> {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let out = generate_text(&mut self.model, &self.tokenizer, ids, cfg, |piece| {
            stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .map_err(|e| metal_candle::Error::Msg(e.to_string()))
        })?;
        writeln!(stdout)?;
        Ok(out)
    }
}

/// Loads the model `args` name on `device` (see [`ModelArgs`]).
pub fn load_lm(args: &ModelArgs, device_args: &DeviceArgs) -> Result<LoadedLm, BoxError> {
    let device = device_args.device()?;
    let dtype = device_args.dtype(&device)?;
    let source = match &args.model {
        Some(m) => ModelSource::parse(m)?,
        None => {
            let gguf = Assets::in_dir(&Assets::default_dir()).smollm2_gguf;
            if !gguf.is_file() {
                return Err(format!(
                    "no --model given and the default {} is missing; run scripts/fetch-assets.sh \
                     (and set METAL_CANDLE_ASSETS to its folder) or pass --model",
                    gguf.display()
                )
                .into());
            }
            ModelSource::parse(&gguf.display().to_string())?
        }
    };
    let loaded = load(&source, dtype, &device)?;
    let text_tokenizer = loaded.tokenizer;
    let template = match text_tokenizer.chat_template() {
        Some(src) => Some(ChatTemplate::new(
            src,
            text_tokenizer.bos_token().unwrap_or_default(),
            text_tokenizer.eos_token().unwrap_or_default(),
        )?),
        None => None,
    };
    let mut eos_token_ids = text_tokenizer.eos_token_ids().to_vec();
    eos_token_ids.extend(loaded.model.config().eos_token_ids.iter().copied());
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let mut model = CachedLlama::new(loaded.model);
    model.set_cuda_graphs(!args.no_cuda_graphs);
    if let Some(dir) = &args.adapter {
        model.set_adapters(read_peft_adapter(dir, &device)?)?;
        if args.merge_adapter {
            model.merge_adapters()?;
        }
    }
    Ok(LoadedLm {
        model,
        tokenizer: text_tokenizer.inner().clone(),
        text_tokenizer,
        template,
        eos_token_ids,
    })
}

/// Reads a PEFT LoRA adapter folder into (module path, layer) pairs. PEFT stores lora_A as
/// (r, in) and lora_B as (out, r): the transposes of this crate's A (in, r) and B (r, out).
pub fn read_peft_adapter(
    dir: &Path,
    device: &Device,
) -> Result<Vec<(String, LoRALayer)>, BoxError> {
    // The library's reader checks the config (unsupported PEFT options, per-module alpha) and
    // pairs lora_A with lora_B; here each pair only becomes a layer in our (in, r)/(r, out) layout.
    let adapter = metal_candle::lora::PeftAdapter::load(dir, device)?;
    let mut out = Vec::with_capacity(adapter.modules.len());
    for (path, (a, b)) in &adapter.modules {
        let (rank, in_features) = a.dims2()?;
        let out_features = b.dim(0)?;
        let cfg = LoRAConfig::new(
            in_features,
            out_features,
            rank,
            adapter.config.alpha_for(path),
        )
        .with_rslora(adapter.config.use_rslora);
        out.push((
            path.clone(),
            LoRALayer::from_tensors(a.t()?.contiguous()?, b.t()?.contiguous()?, &cfg)?,
        ));
    }
    Ok(out)
}
