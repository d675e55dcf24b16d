//! A weight source that invents every tensor a model asks for, for speed measurements and
//! checks that need no checkpoint.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Random normal values of standard deviation `std` for every weight, ones for norm weights.
/// Speed does not depend on the values, so benchmarks load full-size configs this way (not
/// zeros: GPUs run faster on zeros). A model's output head stays tied to its embedding
/// when the config ties them: no separate `lm_head.weight` is reported.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use metal_candle::model::{load::RandomWeights, Llama, LlamaConfig};
/// # fn main() -> metal_candle::Result<()> {
/// let json = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
///   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}"#;
/// let config = LlamaConfig::from_json_str(json, "config.json")?;
/// let vb = VarBuilder::from_backend(Box::new(RandomWeights::new(0.02)), DType::F32, Device::Cpu);
/// let model = Llama::load(vb, &config)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights {
    std: f32,
}

impl RandomWeights {
    /// Weights drawn from N(0, std²).
    pub fn new(std: f32) -> Self {
        Self { std }
    }
}

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
        Tensor::randn(0f32, self.std, s, dev)?.to_dtype(dtype)
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
        !name.ends_with("lm_head.weight")
    }
}
