//! A linear layer with a frozen weight: `x·Wᵀ + bias`, differentiable in `x` only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type, Elem};
use super::{check_same, kernel_path, KernelPath};
use crate::{Error, Result};

/// `x·Wᵀ + bias` with `w` (out, in) and `bias` (out) held constant: the gradient flows to `x`
/// only (`dx = dy·W`).
///
/// candle's autograd differentiates a matmul with respect to both operands whether or not the
/// weight is trainable: for a language model's output head that is a (tokens × hidden) ·
/// (tokens × vocab) product and a (hidden × vocab) temporary per step, thrown away. This op
/// computes only `dx`. When `w` or `bias` are themselves part of a gradient computation
/// (tracked), candle's composition runs instead so that they get their gradients.
///
/// A strided `x` is made contiguous once (the GEMM needs row-major rows).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let w = Tensor::new(&[[1f32, 2.], [0., 1.], [3., 0.]], &dev)?; // (out 3, in 2)
/// let bias = Tensor::new(&[0f32, 1., 0.], &dev)?;
/// let x = Var::new(&[[1f32, 1.]], &dev)?;
/// let y = metal_candle::ops::frozen_linear(x.as_tensor(), &w, Some(&bias))?;
/// assert_eq!(y.to_vec2::<f32>()?, [[3., 2., 3.]]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f32>()?, [[4., 3.]]); // Σ rows of W
/// # Ok(())
/// # }
/// ```
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "frozen_linear";
    let Some(&k) = x.dims().last() else {
        return Err(Error::shape(OP, "x is a scalar; expected (..., in)"));
    };
    let n = match w.dims() {
        &[n, wk] if wk == k => n,
        dims => {
            return Err(Error::shape(
                OP,
                format!(
                    "W has shape {dims:?} but must be (out, {k}) to match x {:?}",
                    x.dims()
                ),
            ))
        }
    };
    check_same(OP, &[("x", x), ("W", w)])?;
    if let Some(b) = bias {
        if b.dims() != [n] {
            return Err(Error::shape(
                OP,
                format!("bias has shape {:?}; expected [{n}]", b.dims()),
            ));
        }
        check_same(OP, &[("x", x), ("bias", b)])?;
    }
    let frozen = !w.track_op() && !bias.is_some_and(Tensor::track_op);
    if !frozen || kernel_path(x.device(), x.dtype()) == KernelPath::Reference {
        let y = x.broadcast_matmul(&w.t()?)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let op = FrozenLinear {
        w: w.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct FrozenLinear {
    /// (out, in), contiguous.
    w: Tensor,
    /// (out), contiguous.
    bias: Option<Tensor>,
}

/// Rows, inner dim and output shape of an `x` (..., k) → (..., n) product.
fn dims(xl: &Layout, n: usize) -> (usize, usize, Shape) {
    let d = xl.dims();
    let k = d.last().copied().unwrap_or(1);
    let mut out = d.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    (d[..d.len() - 1].iter().product(), k, Shape::from(out))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "metal-candle-frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.w.dim(0)?;
        let (m, k, out_shape) = dims(xl, n);
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen_linear: W is not on the CPU")
        };
        let start = xl.start_offset();
        let y = xs.matmul(
            ws,
            (1, m, n, k),
            &Layout::contiguous_with_offset((m, k), start),
            &wl.transpose(0, 1)?,
        )?;
        let Some(bias) = &self.bias else {
            return Ok((y, out_shape));
        };
        let (bs, bl) = bias.storage_and_layout();
        let Storage::Cpu(bs) = &*bs else {
            candle_core::bail!("frozen_linear: bias is not on the CPU")
        };
        with_float_type!(xs.dtype(), "frozen_linear", T => {
            let b = cpu::contiguous::<T>(bs, bl)?;
            let Some(mut y) = T::take(y) else {
                candle_core::bail!("frozen_linear: the GEMM returned another dtype")
            };
            for row in y.chunks_exact_mut(n.max(1)) {
                for (v, b) in row.iter_mut().zip(b.iter()) {
                    *v = T::from_acc(v.to_acc() + b.to_acc());
                }
            }
            Ok((cpu::to_storage(y), out_shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, out_shape) = dims(xl, self.w.dim(0)?);
        let y = super::cuda::frozen_linear_forward(xs, xl, &self.w, self.bias.as_ref())?;
        Ok((y, out_shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.w.dim(0)?;
        let dx = dy
            .contiguous()?
            .reshape(((), n))?
            .matmul(&self.w)?
            .reshape(x.shape())?;
        Ok(Some(dx))
    }
}
