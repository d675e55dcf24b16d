//! Turning a growing list of token ids into text pieces that are always valid UTF-8.
//!
//! A byte-level tokenizer can split one character over several tokens (an emoji is often four
//! byte tokens): decoding token by token would print U+FFFD replacement characters. The
//! streamer decodes a short window of recent tokens and emits only the text that the newest
//! token added, holding it back while the window still ends in an incomplete character (the
//! approach of Hugging Face's text-generation-inference). Decoding a window rather than one
//! token also keeps the spaces that SentencePiece-style decoders attach to word starts.

use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Streams decoded text as tokens arrive. See the module docs.
///
/// ```no_run
/// # fn main() -> metal_candle::Result<()> {
/// # let tokenizer: tokenizers::Tokenizer = unimplemented!();
/// use metal_candle::generate::TextStreamer;
/// let mut stream = TextStreamer::new(&tokenizer);
/// for token in [9906u32, 1917] {
///     if let Some(piece) = stream.push(token)? {
///         print!("{piece}");
///     }
/// }
/// if let Some(rest) = stream.finish()? {
///     print!("{rest}");
/// }
/// # Ok(())
/// # }
/// ```
pub struct TextStreamer<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    /// Start of the window decoded for context (already emitted text).
    prefix_offset: usize,
    /// End of the tokens whose text has been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<'a> TextStreamer<'a> {
    /// A streamer that leaves special tokens (EOS, chat markers) out of the text.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens: true,
        }
    }

    /// Keep special tokens in the text (`false` leaves them out, the default).
    pub fn with_special_tokens(mut self, keep: bool) -> Self {
        self.skip_special_tokens = !keep;
        self
    }

    fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(tokens, self.skip_special_tokens)
            .map_err(|e| Error::Msg(format!("decoding tokens {tokens:?}: {e}")))
    }

    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end decodes to
    /// U+FFFD, as the tokenizer decodes it).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        match full.get(prefix.len()..) {
            Some(rest) if !rest.is_empty() => Ok(Some(rest.to_string())),
            _ => Ok(None),
        }
    }

    /// Every token pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Cuts generated text at the first stop string, across piece boundaries.
///
/// Text that could still be the start of a stop string is held back until it is known not to
/// be; once a stop string is complete, the text before it is released and the rest dropped.
///
/// ```
/// use metal_candle::generate::StopStrings;
/// let mut stops = StopStrings::new(vec!["\nUser:".to_string()]);
/// let (a, done) = stops.push("Paris.\nUs");
/// assert_eq!((a.as_str(), done), ("Paris.", false));
/// let (b, done) = stops.push("er: more");
/// assert_eq!((b.as_str(), done), ("", true));
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds a piece; returns the text safe to emit and whether a stop string was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            self.stopped = true;
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                let p = &self.pending;
                (1..s.len().min(p.len() + 1))
                    .filter(|&n| s.is_char_boundary(n) && p.ends_with(&s[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The held-back tail at the end of generation (no stop string followed it).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}
