//! Rendering a conversation into the prompt text a chat model was trained on, with the model's
//! own Jinja chat template (`tokenizer.chat_template` in GGUF metadata, `chat_template` in a
//! Hugging Face `tokenizer_config.json`).
//!
//! Rendered like transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! Python string methods (`.strip()`, `.startswith()`, ...) available, `raise_exception(msg)`
//! turned into an error, and `messages`, `add_generation_prompt`, `bos_token`, `eos_token` in
//! the context.

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template, checked when made.
///
/// ```
/// use metal_candle::generate::{ChatTemplate, Message};
/// # fn main() -> metal_candle::Result<()> {
/// let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
///               {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// let template = ChatTemplate::new(source, "", "<|im_end|>")?;
/// let prompt = template.render(&[Message::new("user", "Hi")], true)?;
/// assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env
}

impl ChatTemplate {
    /// Parses `source`; `bos_token`/`eos_token` are the strings the template may insert.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        environment()
            .template_from_str(&source)
            .map_err(|e| Error::Msg(format!("chat template does not parse: {e:#}")))?;
        Ok(Self {
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template of a Hugging Face `tokenizer_config.json` (`chat_template`, `bos_token`,
    /// `eos_token`).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: not JSON: {e}", path.display())))?;
        let source = match &json["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => {
                return Err(Error::Msg(format!(
                    "{}: has no chat_template; this model has no chat format",
                    path.display()
                )))
            }
            other => {
                return Err(Error::Msg(format!(
                    "{}: chat_template is {other}, expected a string",
                    path.display()
                )))
            }
        };
        // Special tokens are either plain strings or {"content": "..."} objects.
        let token = |key: &str| match &json[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        Self::new(source, token("bos_token"), token("eos_token"))
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply starts.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| Error::Msg(format!("chat template does not parse: {e:#}")))?;
        let ctx = Context {
            messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
        };
        template
            .render(ctx)
            .map_err(|e| Error::Msg(format!("rendering the chat template: {e:#}")))
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }
}
