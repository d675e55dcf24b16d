//! The device-held inputs of a decoding step whose shapes and host values never change, so
//! that a CUDA graph can capture it once and replay it for every token.

use candle_core::{DType, Device, Tensor};

use super::layout::AttentionMask;
use crate::{Error, Result};

/// Token ids and positions of one decoding step for `batch` rows, in device buffers that
/// keep their address, plus the key positions `0..capacity` of a [`super::KvCache`] with that
/// many slots. [`FixedStep::set`] writes a step's values into the buffers in place;
/// [`super::Llama::forward_fixed_step`] reads them there.
///
/// ```
/// use candle_core::Device;
/// use metal_candle::model::FixedStep;
/// let step = FixedStep::new(2, 16, &Device::Cpu)?;
/// step.set(&[7, 9], &[5, 5], 100)?; // rows 0 and 1 feed tokens 7 and 9 at position 5
/// assert!(step.set(&[7, 100], &[5, 5], 100).is_err()); // 100 is outside the vocabulary
/// # Ok::<(), metal_candle::Error>(())
/// ```
#[derive(Debug)]
pub struct FixedStep {
    /// (batch, 1) u32.
    ids: Tensor,
    /// (batch, 1) u32.
    positions: Tensor,
    /// (1, capacity) u32: 0, 1, ..., capacity − 1, made once (its upload could not be part
    /// of a graph).
    key_positions: Tensor,
}

impl FixedStep {
    /// Buffers for `batch` rows decoding into a cache of `capacity` slots on `device`.
    pub fn new(batch: usize, capacity: usize, device: &Device) -> Result<Self> {
        if batch == 0 || capacity == 0 {
            return Err(Error::shape(
                "FixedStep::new",
                format!("batch {batch} and capacity {capacity} must both be at least 1"),
            ));
        }
        Ok(Self {
            ids: Tensor::zeros((batch, 1), DType::U32, device)?,
            positions: Tensor::zeros((batch, 1), DType::U32, device)?,
            key_positions: Tensor::arange(0u32, capacity as u32, device)?.unsqueeze(0)?,
        })
    }

    /// Rows per step.
    pub fn batch(&self) -> usize {
        self.ids.dims()[0]
    }

    /// Cache slots the step attends over.
    pub fn capacity(&self) -> usize {
        self.key_positions.dims()[1]
    }

    /// Writes the next step's token per row (`ids`, each below `vocab_size`) and its position
    /// (`positions`, each below the capacity) into the buffers, in place.
    pub fn set(&self, ids: &[u32], positions: &[u32], vocab_size: usize) -> Result<()> {
        const OP: &str = "FixedStep::set";
        let b = self.batch();
        if ids.len() != b || positions.len() != b {
            return Err(Error::shape(
                OP,
                format!(
                    "{} ids and {} positions for a step of {b} rows",
                    ids.len(),
                    positions.len()
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::shape(
                OP,
                format!("token id {bad} is outside the vocabulary of {vocab_size} tokens"),
            ));
        }
        if let Some(&bad) = positions.iter().find(|&&p| p as usize >= self.capacity()) {
            return Err(Error::shape(
                OP,
                format!(
                    "position {bad} is past the {} slots of the cache",
                    self.capacity()
                ),
            ));
        }
        let device = self.ids.device();
        self.ids
            .slice_set(&Tensor::new(ids, device)?.unsqueeze(1)?, 0, 0)?;
        self.positions
            .slice_set(&Tensor::new(positions, device)?.unsqueeze(1)?, 0, 0)?;
        Ok(())
    }

    /// (batch, 1) u32 token ids.
    pub(crate) fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// (batch, 1) u32 positions.
    pub(crate) fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// The cache write index and attention bias of this step, computed on the device from the
    /// positions (see [`AttentionMask::DeviceSlots`]).
    pub(crate) fn device_slots(
        &self,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<AttentionMask> {
        let (b, capacity) = (self.batch(), self.capacity());
        // 1 where the slot is at or before the row's position, else 0; then 0 / −1e30 (in f32,
        // where 1·1e30 − 1e30 is exactly 0; a half-precision cast turns −1e30 into −inf or its
        // largest negative value, both of which softmax maps to 0).
        let visible = self.key_positions.broadcast_le(&self.positions)?;
        let bias = visible
            .to_dtype(DType::F32)?
            .affine(1e30, -1e30)?
            .to_dtype(dtype)?
            .reshape((b, 1, 1, capacity))?;
        let index = self
            .positions
            .reshape((b, 1, 1, 1))?
            .broadcast_as((b, kv_heads, 1, head_dim))?
            .contiguous()?;
        Ok(AttentionMask::DeviceSlots { index, bias })
    }
}
