//! `metal-candle generate`: one prompt in (flag or stdin), the continuation streamed to stdout.

use std::io::Read;

use metal_candle::generate::Message;

use super::device::DeviceArgs;
use super::models::{self, ModelArgs};
use super::sampling_args::SamplingArgs;

/// Generate text from a prompt with a llama-family model (default SmolLM2-135M-Instruct).
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; read from stdin when absent.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Print token counts and speed to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let prompt = match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("reading the prompt from stdin: {e}"))?;
            s
        }
    };
    if prompt.trim().is_empty() {
        return Err("empty prompt: pass --prompt or pipe text on stdin".into());
    }
    let mut lm = models::load_lm(&args.model, &args.device)?;
    let ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system.clone()));
        }
        messages.push(Message::new("user", prompt.trim_end().to_string()));
        lm.encode_chat(&lm.render_chat(&messages)?)?
    } else {
        lm.encode(&prompt)?
    };
    let cfg = args.sampling.config(lm.eos_token_ids.clone());
    let out = lm.generate_to_stdout(&ids, &cfg)?;
    if args.stats {
        let s = out.stats;
        eprintln!(
            "{} prompt tokens, {} new tokens ({:?}); prefill {:.0} tok/s, decode {:.1} tok/s",
            s.prompt_tokens,
            s.new_tokens,
            out.finish,
            s.prefill_tokens_per_s(),
            s.decode_tokens_per_s()
        );
    }
    Ok(())
}
