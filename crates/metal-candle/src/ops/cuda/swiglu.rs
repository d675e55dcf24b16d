//! SwiGLU on CUDA (kernels in `kernels/elementwise.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{
    aligned16, alloc_out, cuda_storage, grid_stride_config, input, load, to_tensor, with_elem,
    Elem, ELEMENTWISE_PTX,
};

pub(super) const MODULE: &str = "metal_candle_elementwise";

/// `silu(g)·u` for `g` (storage `gs` under `gl`) and `u` of the same shape.
pub fn swiglu_forward(
    gs: &CudaStorage,
    gl: &Layout,
    us: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    let dev = gs.device().clone();
    let n = gl.shape().elem_count();
    let (g, u) = (input(gs, gl)?, input(us, ul)?);
    with_elem!(gs.dtype(), "swiglu", T => {
        let (gv, uv) = (g.view::<T>()?, u.view::<T>()?);
        let mut y = alloc_out::<T>(&dev, n)?;
        if n > 0 {
            let vec = n.is_multiple_of(T::VEC) && aligned16(&gv, &dev) && aligned16(&uv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("swiglu_fwd_{}_{suffix}", T::NAME), MODULE, ELEMENTWISE_PTX)?;
            let nv = (n / width) as u64;
            let cfg = grid_stride_config(&dev, &f, n / width)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&uv).arg(&mut y).arg(&nv);
            // SAFETY: argument types match the kernel signature; every buffer holds n elements
            // (nv packs of `width`).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `(d_gate, d_up)` for [`swiglu_forward`] and the upstream gradient `dy`, written by one
/// kernel in one pass.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gs, gl) = gate.storage_and_layout();
    let (us, ul) = up.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let (gs, us, ds) = (
        cuda_storage(&gs, "swiglu backward: gate")?,
        cuda_storage(&us, "swiglu backward: up")?,
        cuda_storage(&ds, "swiglu backward: dy")?,
    );
    let dev = gs.device().clone();
    let n = gl.shape().elem_count();
    let (gi, ui, di) = (input(gs, gl)?, input(us, ul)?, input(ds, dl)?);
    with_elem!(gs.dtype(), "swiglu backward", T => {
        let (gv, uv, dv) = (gi.view::<T>()?, ui.view::<T>()?, di.view::<T>()?);
        let mut dg = alloc_out::<T>(&dev, n)?;
        let mut du = alloc_out::<T>(&dev, n)?;
        if n > 0 {
            let vec = n.is_multiple_of(T::VEC)
                && aligned16(&gv, &dev)
                && aligned16(&uv, &dev)
                && aligned16(&dv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("swiglu_bwd_{}_{suffix}", T::NAME), MODULE, ELEMENTWISE_PTX)?;
            let nv = (n / width) as u64;
            let cfg = grid_stride_config(&dev, &f, n / width)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&uv).arg(&dv).arg(&mut dg).arg(&mut du).arg(&nv);
            // SAFETY: argument types match the kernel signature; every buffer holds n elements
            // (nv packs of `width`).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((to_tensor(dg, &dev, gl.shape().clone()), to_tensor(du, &dev, gl.shape().clone())))
    })
}
