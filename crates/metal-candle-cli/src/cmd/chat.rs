//! `metal-candle chat`: a conversation with history. In a terminal it prompts with `> `; piped,
//! every input line is one user turn and every reply one block of output. `/reset` forgets the
//! history, `/exit` (or end of input) quits.

use std::io::{BufRead, IsTerminal, Write};

use metal_candle::generate::Message;

use super::device::DeviceArgs;
use super::models::{self, ModelArgs};
use super::sampling_args::SamplingArgs;

/// Chat with a llama-family instruct model (default SmolLM2-135M-Instruct).
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut lm = models::load_lm(&args.model, &args.device)?;
    if lm.template.is_none() {
        return Err(
            "this model has no chat template; use `metal-candle generate` for plain text".into(),
        );
    }
    let interactive = std::io::stdin().is_terminal();
    let cfg = args.sampling.config(lm.eos_token_ids.clone());
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut history = start.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let user = line.trim();
        match user {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = start.clone();
                if interactive {
                    eprintln!("(history cleared)");
                }
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", user.to_string()));
        let ids = lm.encode_chat(&lm.render_chat(&history)?)?;
        let out = lm.generate_to_stdout(&ids, &cfg)?;
        if !interactive {
            writeln!(std::io::stdout())?;
        }
        history.push(Message::new("assistant", out.text.trim().to_string()));
    }
    Ok(())
}
