//! The projections LoRA can target, and their Hugging Face / PEFT names.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// The prefix PEFT puts before a module path of the base model.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// One of the seven projections of a llama layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl TargetModule {
    /// All seven, in checkpoint order.
    pub const ALL: [TargetModule; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];
    /// The attention projections q, k, v, o.
    pub const ATTENTION: [TargetModule; 4] = [Self::Q, Self::K, Self::V, Self::O];

    /// The module's own name, as in PEFT's `target_modules` (`"q_proj"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The block holding it: `"self_attn"` or `"mlp"`.
    pub fn block(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    /// The module path in a Hugging Face checkpoint, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.block(), self.name())
    }

    /// The module path PEFT uses, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_path(self, layer: usize) -> String {
        format!("{PEFT_PREFIX}{}", self.hf_path(layer))
    }

    /// Parses a module path (HF or PEFT form, `.weight` optional) into (layer, target).
    ///
    /// ```
    /// use metal_candle::model::TargetModule;
    /// let (layer, t) = TargetModule::parse_path("base_model.model.model.layers.12.mlp.down_proj")?;
    /// assert_eq!((layer, t), (12, TargetModule::Down));
    /// # Ok::<(), metal_candle::Error>(())
    /// ```
    pub fn parse_path(path: &str) -> crate::Result<(usize, TargetModule)> {
        let bad = || {
            Error::Msg(format!(
                "{path:?} is not a projection path like \"model.layers.0.self_attn.q_proj\""
            ))
        };
        let rest = path.strip_prefix(PEFT_PREFIX).unwrap_or(path);
        let rest = rest.strip_suffix(".weight").unwrap_or(rest);
        let rest = rest.strip_prefix("model.layers.").ok_or_else(bad)?;
        let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
        let layer: usize = layer.parse().map_err(|_| bad())?;
        let (block, name) = rest.split_once('.').ok_or_else(bad)?;
        let target: TargetModule = name.parse().map_err(|_| bad())?;
        if target.block() != block {
            return Err(bad());
        }
        Ok((layer, target))
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TargetModule {
    type Err = Error;

    /// Accepts `q_proj` or its short form `q` (likewise k, v, o, gate, up, down).
    fn from_str(s: &str) -> crate::Result<Self> {
        let short = s.strip_suffix("_proj").unwrap_or(s);
        Ok(match short {
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "gate" => Self::Gate,
            "up" => Self::Up,
            "down" => Self::Down,
            _ => {
                return Err(Error::Msg(format!(
                    "unknown LoRA target module {s:?}; choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                )))
            }
        })
    }
}
