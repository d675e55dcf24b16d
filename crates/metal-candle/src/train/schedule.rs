//! Learning-rate schedules: constant, linear decay or cosine decay, each after a linear warmup.

use crate::{Error, Result};

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate until the end.
    Constant,
    /// Linear decay from the peak to `min_lr` at the last step (Hugging Face's "linear").
    Linear,
    /// Half a cosine from the peak to `min_lr` at the last step.
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(Error::InvalidConfig {
                name: "schedule",
                value: s.into(),
                expected: "constant, linear or cosine",
            }),
        }
    }
}

/// A learning-rate schedule over `total_steps` optimiser steps (0-based).
///
/// Warmup rises linearly: step `s < warmup` gets `peak · (s + 1) / warmup`, so the first step
/// already learns. After warmup the rate follows `kind` from `peak` down to `min_lr`, reaching
/// it at step `total_steps` (one past the last step).
///
/// ```
/// use metal_candle::train::{LrSchedule, ScheduleKind};
/// let s = LrSchedule::new(ScheduleKind::Cosine, 1e-3, 10, 110).unwrap();
/// assert!((s.lr_at(4) - 5e-4).abs() < 1e-12);   // warming up
/// assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);  // peak
/// assert!((s.lr_at(60) - 5e-4).abs() < 1e-12);  // half-way down the cosine
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Decay shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Final learning rate for the decaying schedules.
    pub min_lr: f64,
    /// Number of warmup steps.
    pub warmup_steps: usize,
    /// Number of optimiser steps in the run.
    pub total_steps: usize,
}

impl LrSchedule {
    /// A schedule decaying to zero. Rejects a peak that is not finite and > 0, zero total steps,
    /// and warmup longer than the run.
    pub fn new(
        kind: ScheduleKind,
        peak_lr: f64,
        warmup_steps: usize,
        total_steps: usize,
    ) -> Result<Self> {
        if !(peak_lr.is_finite() && peak_lr > 0.0) {
            return Err(Error::InvalidConfig {
                name: "lr",
                value: peak_lr.to_string(),
                expected: "a finite rate > 0",
            });
        }
        if total_steps == 0 {
            return Err(Error::InvalidConfig {
                name: "steps",
                value: "0".into(),
                expected: "at least 1 optimiser step",
            });
        }
        if warmup_steps > total_steps {
            return Err(Error::InvalidConfig {
                name: "warmup",
                value: format!("{warmup_steps} (run has {total_steps} steps)"),
                expected: "at most the number of steps",
            });
        }
        Ok(Self {
            kind,
            peak_lr,
            min_lr: 0.0,
            warmup_steps,
            total_steps,
        })
    }

    /// Sets the rate the decaying schedules end at.
    pub fn with_min_lr(mut self, min_lr: f64) -> Self {
        self.min_lr = min_lr;
        self
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let span = self.peak_lr - self.min_lr;
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Linear => self.min_lr + span * (1.0 - progress),
            ScheduleKind::Cosine => {
                self.min_lr + span * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
