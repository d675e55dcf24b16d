//! Rotary position embedding in the "rotate half" layout of Hugging Face llama checkpoints.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type};
use super::{check_same, kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// Rotates `x` (batch, heads, seq, head_dim) by the angles whose cosines and sines are `cos`
/// and `sin` (batch, seq, head_dim/2), or (1, seq, head_dim/2) shared by every batch row: for
/// `j < half = head_dim/2`,
/// `y[j] = x[j]·cos[j] − x[j+half]·sin[j]` and `y[j+half] = x[j+half]·cos[j] + x[j]·sin[j]`.
///
/// Differentiable in `x` only: `cos` and `sin` are constants (a position table), and no
/// gradient reaches them even when they are tracked. The backward pass is the same kernel
/// rotating the other way, so no negated copy of `sin` is made. `x` may be a strided view,
/// such as the (batch, seq, heads, head_dim) projection transposed to put heads first.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// // One head of two elements at one position, rotated by 90°: (1, 0) becomes (0, 1).
/// let x = Tensor::new(&[1f32, 0.], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
/// let cos = Tensor::new(&[0f32], &Device::Cpu)?.reshape((1, 1, 1))?;
/// let sin = Tensor::new(&[1f32], &Device::Cpu)?.reshape((1, 1, 1))?;
/// let y: Vec<f32> = metal_candle::ops::rope(&x, &cos, &sin)?.flatten_all()?.to_vec1()?;
/// assert_eq!(y, [0., 1.]);
/// # Ok(())
/// # }
/// ```
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope";
    let &[batch, _, seq, head_dim] = x.dims() else {
        return Err(Error::shape(
            OP,
            format!(
                "x has shape {:?}; expected (batch, heads, seq, head_dim)",
                x.dims()
            ),
        ));
    };
    if head_dim % 2 != 0 {
        return Err(Error::shape(
            OP,
            format!(
                "x has shape {:?}: head_dim {head_dim} is odd; the rotation pairs element j \
                 with element j + head_dim/2",
                x.dims()
            ),
        ));
    }
    let half = head_dim / 2;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        let fits =
            matches!(t.dims(), &[b, s, h] if (b == batch || b == 1) && s == seq && h == half);
        if !fits {
            return Err(Error::shape(
                OP,
                format!(
                    "{name} has shape {:?} but x has shape {:?}; {name} must be ({batch} or 1, \
                     {seq}, {half}): (batch, seq, head_dim/2)",
                    t.dims(),
                    x.dims()
                ),
            ));
        }
    }
    if cos.dims() != sin.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "cos has shape {:?} but sin has shape {:?}; they must match",
                cos.dims(),
                sin.dims()
            ),
        ));
    }
    check_same(OP, &[("x", x), ("cos", cos), ("sin", sin)])?;
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused => x.apply_op1(Rope {
            cos: cos.clone(),
            sin: sin.clone(),
            inverse: false,
        })?,
        KernelPath::Reference => reference::rope(x, cos, sin)?,
    })
}

/// The rotation by the angles of `cos`/`sin` (by their negatives when `inverse`: the backward
/// pass, since a rotation's transpose is its inverse).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "metal-candle-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[_, heads, seq, head_dim] = l.dims() else {
            candle_core::bail!(
                "rope: x must be (batch, heads, seq, head_dim), got {:?}",
                l.dims()
            )
        };
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("rope: cos and sin must be on the CPU, with x")
        };
        let dims = cpu::rope::RopeDims {
            heads,
            seq,
            head_dim,
            tables_batched: cl.dims()[0] != 1,
        };
        with_float_type!(s.dtype(), "rope", T => {
            let x = cpu::contiguous::<T>(s, l)?;
            let (c, sn) = (cpu::contiguous::<T>(cs, cl)?, cpu::contiguous::<T>(ss, sl)?);
            let y = cpu::rope::rotate(&x, &c, &sn, &dims, self.inverse);
            Ok((cpu::to_storage(y), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::rope_forward(s, l, &self.cos, &self.sin, self.inverse)?;
        Ok((y, l.shape().clone()))
    }

    /// `dx = rope(dy, cos, −sin)`: the same kernel with the sign flag flipped, on any device.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(dy.apply_op1_no_bwd(&inverse)?))
    }
}
