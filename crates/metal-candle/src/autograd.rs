//! Backpropagation from a non-scalar tensor with a given upstream gradient, as PyTorch's
//! `y.backward(gradient=dy)`.
//!
//! candle's [`Tensor::backward`] starts from a scalar. The usual stand-in,
//! `(y * dy).sum_all().backward()`, adds a multiply, a sum and their backward passes to the
//! graph; the backward of `sum_all` broadcasts its gradient back through candle's strided
//! path, which at small shapes costs more than the ops it is meant to measure.
//! [`backward_with`] hands `dy` to `y` directly.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::{Error, Result};

/// The gradients of `Σ y ⊙ dy` with respect to every variable `y` depends on: backpropagation
/// from `y` with upstream gradient `dy` (same shape, dtype and device as `y`). CPU and CUDA.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> metal_candle::Result<()> {
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let y = x.as_tensor().sqr()?;
/// let dy = Tensor::new(&[1f32, 0., 2.], &Device::Cpu)?;
/// let grads = metal_candle::autograd::backward_with(&y, &dy)?;
/// let dx: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1()?;
/// assert_eq!(dx, [2., 0., 12.]); // 2x ⊙ dy
/// # Ok(())
/// # }
/// ```
pub fn backward_with(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    if y.dims() != dy.dims() || y.dtype() != dy.dtype() || !y.device().same_device(dy.device()) {
        return Err(Error::shape(
            "backward_with",
            format!(
                "dy ({:?}, {:?}, {:?}) must match y ({:?}, {:?}, {:?})",
                dy.dims(),
                dy.dtype(),
                dy.device().location(),
                y.dims(),
                y.dtype(),
                y.device().location()
            ),
        ));
    }
    let root = y.apply_op1(SeedGradient { dy: dy.clone() })?;
    Ok(root.backward()?)
}

/// A scalar root whose backward hands `dy` to its input. Its value is zero and never read:
/// only [`backward_with`] creates one, and calls `backward` on it at once, so the gradient
/// reaching it is exactly 1 and `dy · 1 = dy`.
struct SeedGradient {
    dy: Tensor,
}

impl CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "metal-candle-seed-gradient"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let zero = s
            .device()
            .zeros_impl(&Shape::from(()), candle_core::DType::F32)?;
        Ok((zero, Shape::from(())))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _root: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.dy.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn equals_the_gradient_of_the_weighted_sum() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 4), &dev)?)?;
        let y = x.as_tensor().matmul(w.as_tensor())?.tanh()?;
        let dy = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let ours = backward_with(&y, &dy)?;
        let usual = (&y * &dy)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (a, b) = (
                ours.get(v.as_tensor()).unwrap(),
                usual.get(v.as_tensor()).unwrap(),
            );
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn rejects_a_gradient_of_another_shape() {
        let y = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let dy = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let e = backward_with(&y, &dy).unwrap_err().to_string();
        assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
    }
}
