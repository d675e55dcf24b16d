//! Chat conversations rendered with the model's own Jinja chat template, with a mask that keeps
//! only the assistant's tokens in the loss.

use minijinja::Environment;

use super::EncodeText;
use crate::{Error, Result};

/// ChatML, used by SmolLM2 and Qwen2, and the fallback for models that ship no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (others are passed to the template as they are).
    pub role: String,
    /// The text of the message.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a Hugging Face style Jinja template (`tokenizer.chat_template`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Msg(format!("the chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// ChatML with SmolLM2's special tokens.
    pub fn chatml() -> Self {
        // The constant template compiles; a failure here would be a bug in this file.
        Self::new(CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>")
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// The text of `messages`, with the assistant header appended when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Msg(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Msg(format!("chat template: {e}")))
    }

    /// Tokens of a conversation and, per token, whether it is trained on: the tokens of each
    /// assistant reply (and its end marker) are, the rest (system, user, headers) are not.
    ///
    /// The conversation is rendered growing one message at a time; each rendering must extend
    /// the previous one (true of ordinary templates). The text between "everything before
    /// message k with the assistant header" and "everything up to message k" is the reply.
    pub fn encode(
        &self,
        messages: &[Message],
        tok: &dyn EncodeText,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let mut tokens = Vec::new();
        let mut trainable = Vec::new();
        let mut done = String::new();
        let push = |text: &str,
                    train: bool,
                    tokens: &mut Vec<u32>,
                    trainable: &mut Vec<bool>|
         -> Result<()> {
            if !text.is_empty() {
                let ids = tok.encode(text)?;
                trainable.extend(std::iter::repeat_n(train, ids.len()));
                tokens.extend(ids);
            }
            Ok(())
        };
        for k in 0..messages.len() {
            let upto = self.render(&messages[..=k], false)?;
            if messages[k].role == "assistant" {
                let header = self.render(&messages[..k], true)?;
                let prompt_part = strip_prefix(&header, &done, k)?;
                push(prompt_part, false, &mut tokens, &mut trainable)?;
                let reply = strip_prefix(&upto, &header, k)?;
                push(reply, true, &mut tokens, &mut trainable)?;
            } else {
                push(
                    strip_prefix(&upto, &done, k)?,
                    false,
                    &mut tokens,
                    &mut trainable,
                )?;
            }
            done = upto;
        }
        if !trainable.iter().any(|&t| t) {
            return Err(Error::Msg(
                "the conversation has no assistant message to learn from".into(),
            ));
        }
        Ok((tokens, trainable))
    }
}

fn strip_prefix<'a>(text: &'a str, prefix: &str, k: usize) -> Result<&'a str> {
    text.strip_prefix(prefix).ok_or_else(|| {
        Error::Msg(format!(
            "the chat template does not render conversations incrementally (message {k} changes earlier text), \
             so assistant tokens cannot be located; use {{\"prompt\", \"completion\"}} records instead"
        ))
    })
}
