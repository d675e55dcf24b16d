//! The llama family as a [`CausalLm`]: packed batches go through the model's segment-aware
//! attention, and the seven projections of every layer are LoRA targets.

use candle_core::Tensor;

use super::data::Batch;
use super::CausalLm;
use crate::lora::LoraLinear;
use crate::model::{Llama, SequenceLayout, TargetModule};
use crate::Result;

impl CausalLm for Llama {
    fn forward_batch(&self, batch: &Batch) -> Result<Tensor> {
        // One unpadded example per row needs no mask beyond the causal one.
        let layout = if batch.is_plain_causal() {
            SequenceLayout::Contiguous { offset: 0 }
        } else {
            SequenceLayout::Packed {
                segment_ids: batch.segment_ids.clone(),
            }
        };
        self.forward_train(&batch.input_ids, &layout)
    }

    fn lora_linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::with_capacity(self.num_layers() * TargetModule::ALL.len());
        for layer in 0..self.num_layers() {
            for target in TargetModule::ALL {
                if let Ok(p) = self.projection(layer, target) {
                    out.push((target.hf_path(layer), p));
                }
            }
        }
        out
    }

    fn lora_linear_mut(&mut self, path: &str) -> Option<&mut LoraLinear> {
        self.projection_by_path_mut(path).ok()
    }

    fn device(&self) -> &candle_core::Device {
        Llama::device(self)
    }
}
