//! LoRA hyper-parameters.

use crate::{Error, Result};

/// Hyper-parameters of one LoRA adapter.
///
/// ```
/// use metal_candle::training::LoRAConfig;
/// let c = LoRAConfig::new(512, 512, 8, 16.0); // in, out, rank, alpha
/// assert_eq!(c.scaling(), 2.0);               // alpha / rank
/// assert_eq!(c.clone().with_rslora(true).scaling(), 16.0 / 8f64.sqrt());
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoRAConfig {
    /// Input features of the adapted layer.
    pub in_features: usize,
    /// Output features of the adapted layer.
    pub out_features: usize,
    /// Rank r of the update `B·A`.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (or `alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the LoRA input, applied in training mode only.
    pub dropout: f64,
    /// rsLoRA scaling `alpha / √r` (Kalajdzievski 2023) instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoRAConfig {
    /// A configuration with no dropout and standard scaling. Values are checked by
    /// [`LoRAConfig::validate`], which every constructor of a layer calls.
    pub fn new(in_features: usize, out_features: usize, rank: usize, alpha: f64) -> Self {
        Self {
            in_features,
            out_features,
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
        }
    }

    /// Sets the dropout probability on the LoRA input (training mode only).
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Chooses rsLoRA scaling (`alpha / √r`).
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// The factor the low-rank update is multiplied by.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Rejects rank 0, alpha ≤ 0 (or not finite), dropout outside [0, 1) and zero-sized layers.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidConfig {
                name: "rank",
                value: "0".into(),
                expected: "a rank >= 1",
            });
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidConfig {
                name: "alpha",
                value: self.alpha.to_string(),
                expected: "a finite number > 0",
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidConfig {
                name: "dropout",
                value: self.dropout.to_string(),
                expected: "a probability in [0, 1)",
            });
        }
        if self.in_features == 0 || self.out_features == 0 {
            return Err(Error::InvalidConfig {
                name: "in_features/out_features",
                value: format!("{}/{}", self.in_features, self.out_features),
                expected: "both >= 1",
            });
        }
        Ok(())
    }
}
