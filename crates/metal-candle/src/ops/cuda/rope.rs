//! The rotary embedding on CUDA (kernel in `kernels/elementwise.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{
    aligned16, alloc_out, cuda_storage, grid_stride_config, input, load, with_elem, Elem,
    ELEMENTWISE_PTX,
};
use super::swiglu::MODULE;

/// Rotates `x` (storage `s` under layout `l`, (batch, heads, seq, head_dim)) by the angles of
/// `cos` and `sin` (batch or 1, seq, head_dim/2), or with `inverse` by their negatives, which
/// is the backward pass (the kernel flips the sign of `sin` as it reads it).
pub fn rope_forward(
    s: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<CudaStorage> {
    let &[_, heads, seq, head_dim] = l.dims() else {
        candle_core::bail!(
            "rope: x must be (batch, heads, seq, head_dim), got {:?}",
            l.dims()
        )
    };
    if [heads, seq, head_dim]
        .iter()
        .any(|&v| v > i32::MAX as usize)
    {
        candle_core::bail!(
            "rope: shape {:?} is too large for the CUDA kernel (32-bit dims)",
            l.dims()
        )
    }
    let dev = s.device().clone();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let (cs, ss) = (
        cuda_storage(&cs, "rope: cos")?,
        cuda_storage(&ss, "rope: sin")?,
    );
    let batched = i32::from(cl.dims()[0] != 1);
    let n = l.shape().elem_count();
    let half = head_dim / 2;
    let (x, c, sn) = (input(s, l)?, input(cs, cl)?, input(ss, sl)?);
    with_elem!(s.dtype(), "rope", T => {
        let (xv, cv, sv) = (x.view::<T>()?, c.view::<T>()?, sn.view::<T>()?);
        let mut y = alloc_out::<T>(&dev, n)?;
        if n > 0 {
            // Packs never straddle the two halves of a row: half_dim is a whole number of them.
            let vec = half.is_multiple_of(T::VEC)
                && aligned16(&xv, &dev)
                && aligned16(&cv, &dev)
                && aligned16(&sv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("rope_{}_{suffix}", T::NAME), MODULE, ELEMENTWISE_PTX)?;
            // Work items: packs of pairs, half of the elements over the pack width.
            let items = n / 2 / width;
            let cfg = grid_stride_config(&dev, &f, items)?;
            let stream = dev.cuda_stream();
            let (nv, half_i, seq_i, heads_i) = (items as u64, half as i32, seq as i32, heads as i32);
            let sign: f32 = if inverse { -1.0 } else { 1.0 };
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&cv).arg(&sv).arg(&mut y);
            b.arg(&nv).arg(&half_i).arg(&seq_i).arg(&heads_i).arg(&batched).arg(&sign);
            // SAFETY: argument types match the kernel signature; x and y hold n elements, the
            // tables (batch or 1) · seq · half_dim, as `ops::rope` checked.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    })
}
