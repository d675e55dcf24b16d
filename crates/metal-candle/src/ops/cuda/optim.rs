//! Host side of the AdamW update kernels (`kernels/optim.cu`), called by the optimiser's
//! in-place ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result};

use super::common::{load, OPTIM_PTX};

const MODULE: &str = "metal_candle_optim";

/// The element range of a contiguous layout.
fn range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => candle_core::bail!("adamw: {what} must be contiguous"),
    }
}

fn config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `[m; v]` (`state`, 2n f32) updated in place from the gradient `g` (n f32);
/// `params` = [beta1, beta2, grad_scale].
pub fn adamw_moments(
    state: &mut CudaStorage,
    sl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    params: [f32; 3],
) -> Result<()> {
    let (ga, gb) = range(gl, "the gradient")?;
    let (sa, sb) = range(sl, "the moments")?;
    let n = gb - ga;
    if sb - sa != 2 * n {
        candle_core::bail!(
            "adamw: moments hold {} values for a gradient of {n}",
            sb - sa
        )
    }
    if n == 0 {
        return Ok(());
    }
    let dev = g.device().clone();
    let f = load(&dev, "adamw_moments", MODULE, OPTIM_PTX)?;
    let gv = g.as_cuda_slice::<f32>()?.slice(ga..gb);
    let mut sv = state.as_cuda_slice_mut::<f32>()?.slice_mut(sa..sb);
    let n64 = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut sv)
        .arg(&gv)
        .arg(&n64)
        .arg(&params[0])
        .arg(&params[1])
        .arg(&params[2]);
    // SAFETY: argument types match the kernel; state holds 2n and g n f32 values.
    unsafe { b.launch(config(n)) }.w()?;
    Ok(())
}

/// The parameter `p` (n f32) stepped in place from `[m; v]`;
/// `params` = [lr, bc1, bc2, eps, decay].
pub fn adamw_param(
    p: &mut CudaStorage,
    pl: &Layout,
    state: &CudaStorage,
    sl: &Layout,
    params: [f32; 5],
) -> Result<()> {
    let (pa, pb) = range(pl, "the parameter")?;
    let (sa, sb) = range(sl, "the moments")?;
    let n = pb - pa;
    if sb - sa != 2 * n {
        candle_core::bail!(
            "adamw: moments hold {} values for a parameter of {n}",
            sb - sa
        )
    }
    if n == 0 {
        return Ok(());
    }
    let dev = state.device().clone();
    let f = load(&dev, "adamw_param", MODULE, OPTIM_PTX)?;
    let sv = state.as_cuda_slice::<f32>()?.slice(sa..sb);
    let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(pa..pb);
    let n64 = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut pv).arg(&sv).arg(&n64);
    for v in &params {
        b.arg(v);
    }
    // SAFETY: argument types match the kernel; p holds n and state 2n f32 values.
    unsafe { b.launch(config(n)) }.w()?;
    Ok(())
}
