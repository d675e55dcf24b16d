//! Softmax over the last dimension on CUDA.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{
    aligned16, alloc_out, cuda_storage, fit_threads, input, load, row_config, row_packs,
    row_threads, rows_and_len, to_tensor, with_elem, Elem, SOFTMAX_PTX,
};

const MODULE: &str = "metal_candle_softmax";
/// Packs each thread of the softmax forward pass keeps in registers (`RSF` in softmax.cu):
/// four whatever the type, so 16-bit rows take half the threads of f32 rows.
const SOFTMAX_FWD_PACKS: usize = 4;

/// Packs of `width` each thread of the backward pass keeps (`RSB` in softmax.cu): it holds x
/// and dy, 16 elements of each.
const fn softmax_bwd_packs(width: usize) -> usize {
    row_packs(width, 16, 4)
}

/// Packs per thread in the cross-entropy (`RCE` in softmax.cu), whatever the type: its rows
/// are a vocabulary long and stay in registers up to 4096 packs.
const CE_PACKS: usize = 4;

/// `softmax(x)` over the last dimension of `x` (storage `s` under layout `l`).
pub fn softmax_forward(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let (rows, n) = rows_and_len("softmax_last_dim", l.shape())?;
    let x = input(s, l)?;
    with_elem!(s.dtype(), "softmax_last_dim", T => {
        let xv = x.view::<T>()?;
        let mut y = alloc_out::<T>(&dev, rows * n)?;
        if rows > 0 {
            let vec = n % T::VEC == 0 && aligned16(&xv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("softmax_fwd_{}_{suffix}", T::NAME), MODULE, SOFTMAX_PTX)?;
            let cfg = row_config(rows, fit_threads(&f, row_threads(n / width, SOFTMAX_FWD_PACKS))?);
            let stream = dev.cuda_stream();
            let (rows_i, n_i) = (rows as i32, n as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&mut y).arg(&rows_i).arg(&n_i);
            // SAFETY: argument types match the kernel signature; buffers hold rows * n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `dx = y ⊙ (dy − Σ dy ⊙ y)` for the softmax *input* `x` and the gradient `dy` of its output:
/// the kernel recomputes `y = softmax(x)` in f32 (for bf16/f16, a stored, rounded `y` makes
/// `dy − Σ dy ⊙ y` cancel badly on peaked rows; the bytes moved are the same).
pub fn softmax_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (xs, gs) = (
        cuda_storage(&xs, "softmax backward: x")?,
        cuda_storage(&gs, "softmax backward: dy")?,
    );
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len("softmax_last_dim backward", xl.shape())?;
    let (xi, gi) = (input(xs, xl)?, input(gs, gl)?);
    with_elem!(xs.dtype(), "softmax_last_dim backward", T => {
        let (xv, gv) = (xi.view::<T>()?, gi.view::<T>()?);
        let mut dx = alloc_out::<T>(&dev, rows * n)?;
        if rows > 0 {
            let vec = n % T::VEC == 0 && aligned16(&xv, &dev) && aligned16(&gv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("softmax_bwd_{}_{suffix}", T::NAME), MODULE, SOFTMAX_PTX)?;
            let cfg = row_config(rows, fit_threads(&f, row_threads(n / width, softmax_bwd_packs(width)))?);
            let stream = dev.cuda_stream();
            let (rows_i, n_i) = (rows as i32, n as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&gv).arg(&mut dx).arg(&rows_i).arg(&n_i);
            // SAFETY: argument types match the kernel signature; buffers hold rows * n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(to_tensor(dx, &dev, xl.shape().clone()))
    })
}

/// Per row of `x` (storage `xs` under `xl`): `logsumexp(x) − x[t]` with `t` the row's target
/// (u32 storage `ts` under `tl`, one per row), as f32. The caller checks the targets are in
/// range (the kernel writes NaN for one that is not).
pub fn cross_entropy_forward(
    xs: &CudaStorage,
    xl: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
) -> Result<CudaStorage> {
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len("cross_entropy", xl.shape())?;
    let (x, t) = (input(xs, xl)?, input(ts, tl)?);
    let tv = t.view::<u32>()?;
    with_elem!(xs.dtype(), "cross_entropy", T => {
        let xv = x.view::<T>()?;
        let mut loss = alloc_out::<f32>(&dev, rows)?;
        if rows > 0 {
            let vec = n % T::VEC == 0 && aligned16(&xv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("ce_fwd_{}_{suffix}", T::NAME), MODULE, SOFTMAX_PTX)?;
            let cfg = row_config(rows, fit_threads(&f, row_threads(n / width, CE_PACKS))?);
            let stream = dev.cuda_stream();
            let (rows_i, n_i) = (rows as i32, n as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&tv).arg(&mut loss).arg(&rows_i).arg(&n_i);
            // SAFETY: argument types match the kernel signature; x holds rows * n elements,
            // t and loss rows each.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(f32::wrap_cuda_slice(loss, dev.clone()))
    })
}

/// `dx = g · (softmax(x) − onehot(t))` per row, for the logits `x`, the u32 targets `t` (one
/// per row) and the f32 upstream gradient `g` of each row's loss.
pub fn cross_entropy_backward(x: &Tensor, t: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (x, t, g) = (x.contiguous()?, t.contiguous()?, g.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ts, tl) = t.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (xs, ts, gs) = (
        cuda_storage(&xs, "cross_entropy backward: logits")?,
        cuda_storage(&ts, "cross_entropy backward: targets")?,
        cuda_storage(&gs, "cross_entropy backward: gradient")?,
    );
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len("cross_entropy backward", xl.shape())?;
    let (xi, ti, gi) = (input(xs, xl)?, input(ts, tl)?, input(gs, gl)?);
    let (tv, gv) = (ti.view::<u32>()?, gi.view::<f32>()?);
    with_elem!(xs.dtype(), "cross_entropy backward", T => {
        let xv = xi.view::<T>()?;
        let mut dx = alloc_out::<T>(&dev, rows * n)?;
        if rows > 0 {
            let vec = n % T::VEC == 0 && aligned16(&xv, &dev);
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("ce_bwd_{}_{suffix}", T::NAME), MODULE, SOFTMAX_PTX)?;
            let cfg = row_config(rows, fit_threads(&f, row_threads(n / width, CE_PACKS))?);
            let stream = dev.cuda_stream();
            let (rows_i, n_i) = (rows as i32, n as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&tv).arg(&gv).arg(&mut dx).arg(&rows_i).arg(&n_i);
            // SAFETY: argument types match the kernel signature; x and dx hold rows * n
            // elements, t and g rows each.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(to_tensor(dx, &dev, xl.shape().clone()))
    })
}
