//! SwiGLU, the gated activation of llama MLPs: `silu(gate)·up`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type};
use super::{check_same, kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// `silu(gate)·up = gate·σ(gate)·up`, element-wise over two tensors of the same shape (any
/// rank). Differentiable in both.
///
/// Fused, it reads `gate` and `up` once and writes the output once; the backward pass reads
/// them and the upstream gradient once and writes both gradients in the same pass. Composed,
/// candle materialises `silu(gate)` forward, and backward computes a gradient for each
/// input of every op it went through.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let gate = Tensor::new(&[0f32, 1.], &Device::Cpu)?;
/// let up = Tensor::new(&[3f32, 2.], &Device::Cpu)?;
/// let y: Vec<f32> = metal_candle::ops::swiglu(&gate, &up)?.to_vec1()?;
/// // silu(0) = 0, silu(1) = σ(1) = 0.7310586
/// assert_eq!(y[0], 0.);
/// assert!((y[1] - 2. * 0.731_058_6).abs() < 1e-6);
/// # Ok(())
/// # }
/// ```
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu";
    if gate.dims() != up.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "gate has shape {:?} but up has shape {:?}; they must match (broadcast \
                 explicitly first)",
                gate.dims(),
                up.dims()
            ),
        ));
    }
    check_same(OP, &[("gate", gate), ("up", up)])?;
    Ok(match kernel_path(gate.device(), gate.dtype()) {
        KernelPath::Fused => gate.apply_op2(up, SwiGlu)?,
        KernelPath::Reference => reference::swiglu(gate, up)?,
    })
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "metal-candle-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_float_type!(gs.dtype(), "swiglu", T => {
            let (g, u) = (cpu::contiguous::<T>(gs, gl)?, cpu::contiguous::<T>(us, ul)?);
            Ok((cpu::to_storage(cpu::swiglu::forward(&g, &u)), gl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::swiglu_forward(gs, gl, us, ul)?,
            gl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(gate, up, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `(d_gate, d_up)` through the device's kernel, both from one pass.
fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    match gate.device() {
        candle_core::Device::Cpu => {
            let (gs, gl) = gate.storage_and_layout();
            let (us, ul) = up.storage_and_layout();
            let (ds, dl) = dy.storage_and_layout();
            let (Storage::Cpu(gs), Storage::Cpu(us), Storage::Cpu(ds)) = (&*gs, &*us, &*ds) else {
                candle_core::bail!("swiglu backward: gate, up and dy must all be on the CPU")
            };
            with_float_type!(gate.dtype(), "swiglu backward", T => {
                let g = cpu::contiguous::<T>(gs, gl)?;
                let (u, d) = (cpu::contiguous::<T>(us, ul)?, cpu::contiguous::<T>(ds, dl)?);
                let (dg, du) = cpu::swiglu::backward(&g, &u, &d);
                Ok((cpu::to_tensor(dg, gate.dims())?, cpu::to_tensor(du, gate.dims())?))
            })
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => super::cuda::swiglu_backward(gate, up, dy),
        _ => candle_core::bail!(
            "swiglu backward: no fused kernel for {:?}",
            gate.device().location()
        ),
    }
}
