//! A weight source that invents every tensor a model asks for: random normal values (std 0.02),
//! ones for norm weights. Speed does not depend on the values, so the generation benchmarks load
//! full-size configs this way without any checkpoint. (Not zeros: GPUs run faster on zeros.)

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if name.contains("norm") && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} was asked for without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Tied output heads stay tied: report no separate lm_head.
        !name.ends_with("lm_head.weight")
    }
}
