//! The residual step of a pre-norm transformer fused with the norm that follows it.

use candle_core::Tensor;

use super::norm::check_norm_args;
use super::{check_same, rms_norm};
use crate::{Error, Result};

/// `s = x + r` and `rms_norm(s, weight, eps)`, returned as `(s, normed)`: a decoder layer's
/// residual add and the next norm, which read the same row.
///
/// At batch-1 decoding every kernel launch costs more host time than its GPU work, and each
/// layer has two of these pairs. On CUDA, when nothing needs a gradient and a row fits the
/// kernel's registers, both come from one kernel; otherwise (training, the CPU, Metal) the add
/// and [`rms_norm`] run as two ops with the same result. `s` is rounded to the dtype before
/// the norm reads it, as the separate add stores it.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
/// let r = Tensor::new(&[[1f32, 0.], [-3., 0.]], &dev)?;
/// let w = Tensor::ones(2, DType::F32, &dev)?;
/// let (s, y) = metal_candle::ops::add_rms_norm(&x, &r, &w, 1e-6)?;
/// assert_eq!(s.to_vec2::<f32>()?, [[2., 2.], [0., 4.]]);
/// let y = y.to_vec2::<f32>()?;
/// assert!((y[0][0] - 1.0).abs() < 1e-5 && (y[1][1] - 2f32.sqrt()).abs() < 1e-5);
/// # Ok(())
/// # }
/// ```
pub fn add_rms_norm(x: &Tensor, r: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if x.dims() != r.dims() {
        return Err(Error::shape(
            "add_rms_norm",
            format!(
                "x has shape {:?} but the residual r {:?}; they must match",
                x.dims(),
                r.dims()
            ),
        ));
    }
    check_same("add_rms_norm", &[("x", x), ("r", r)])?;
    check_norm_args("add_rms_norm", x, &[("weight", weight)], eps)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && super::cuda::supports(x.dtype())
        && ![x, r, weight].iter().any(|t| t.track_op())
    {
        if let Some(fused) = super::cuda::add_rms_norm_forward(x, r, weight, eps)? {
            return Ok(fused);
        }
    }
    let s = (x + r)?;
    let y = rms_norm(&s, weight, eps)?;
    Ok((s, y))
}
