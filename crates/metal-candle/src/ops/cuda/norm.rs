//! RMSNorm and LayerNorm over the last dimension on CUDA.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{
    aligned16, alloc_out, allow_dynamic_smem, cuda_storage, fit_threads, input, load, row_config,
    row_packs, row_threads, rows_and_len, sm_count, to_tensor, with_elem, Elem, Kernel, NORM_PTX,
};

const MODULE: &str = "metal_candle_norm";
/// Packs per thread held in registers, forward (`RF` in norm.cu), whatever their width.
const FWD_PACKS: usize = 4;

/// Backward (`RB` in norm.cu): x, dy and the weight-gradient sums all live in registers.
const fn bwd_packs(width: usize) -> usize {
    row_packs(width, 8, 2)
}

/// Packs per thread of the staged backward of 16-bit rows (`RBS` in norm.cu).
const STAGED_PACKS: usize = 2;

/// Blocks per SM of the staged backward (see `backward`).
const STAGED_BLOCKS_PER_SM: u32 = 3;

/// Blocks per SM of LayerNorm's staged backward with saved statistics: 2 ran fastest in the
/// lab (bf16 8×2048×4096, H200: 125.7 µs against 142.2 at 3, the most that fit).
const SAVED_BLOCKS_PER_SM: u32 = 2;

/// The row statistics of a LayerNorm forward pass, mean and 1/std of each row in f32: what its
/// backward needs besides x, so that it reduces two sums per row instead of four. The forward
/// saves them when gradients are tracked ([`crate::ops::layer_norm`]); the backward takes them
/// where its 16-bit staged kernel applies and recomputes them otherwise.
pub struct LayerNormStats {
    /// (mean, 1/std) per row.
    data: CudaSlice<f32>,
    rows: usize,
}

/// `x / sqrt(mean(x²) + eps) ⊙ w` over the last dimension.
pub fn rms_norm_forward(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    Ok(forward("rms", xs, xl, ws, wl, None, eps, false)?.0)
}

/// `(x − mean) / sqrt(var + eps) ⊙ w + b` over the last dimension (biased variance), and the
/// row statistics when `save_stats` is set (for the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    eps: f64,
    save_stats: bool,
) -> Result<(CudaStorage, Option<LayerNormStats>)> {
    forward("layer", xs, xl, ws, wl, Some((bs, bl)), eps, save_stats)
}

/// [`layer_norm_forward`] on tensors, with the statistics: the forward half of a training
/// step, for benchmarks and tests that call [`layer_norm_backward`] themselves.
pub fn layer_norm_forward_with_stats(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LayerNormStats)> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (y, stats) = layer_norm_forward(
        cuda_storage(&xs, "x")?,
        xl,
        cuda_storage(&ws, "weight")?,
        wl,
        cuda_storage(&bs, "bias")?,
        bl,
        eps,
        true,
    )?;
    let Some(stats) = stats else {
        candle_core::bail!("layer_norm: the forward pass returned no statistics")
    };
    let y = candle_core::Storage::Cuda(y);
    Ok((
        Tensor::from_storage(
            y,
            xl.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ),
        stats,
    ))
}

/// The norm forward of `kind`; LayerNorm's (`bias` given) also writes the row statistics when
/// `save_stats` is set.
#[allow(clippy::too_many_arguments)]
fn forward(
    kind: &str,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    eps: f64,
    save_stats: bool,
) -> Result<(CudaStorage, Option<LayerNormStats>)> {
    let op = if kind == "rms" {
        "rms_norm"
    } else {
        "layer_norm"
    };
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len(op, xl.shape())?;
    let (x, w) = (input(xs, xl)?, input(ws, wl)?);
    let b = bias.map(|(s, l)| input(s, l)).transpose()?;
    with_elem!(xs.dtype(), op, T => {
        let (xv, wv) = (x.view::<T>()?, w.view::<T>()?);
        let bv = b.as_ref().map(|b| b.view::<T>()).transpose()?;
        let mut y = alloc_out::<T>(&dev, rows * n)?;
        let mut stats = match (&bv, save_stats) {
            (Some(_), true) => Some(alloc_out::<f32>(&dev, 2 * rows)?),
            _ => None,
        };
        if rows > 0 {
            let vec = n % T::VEC == 0
                && aligned16(&xv, &dev)
                && aligned16(&wv, &dev)
                && bv.as_ref().is_none_or(|b| aligned16(b, &dev));
            let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
            let f = load(&dev, &format!("{kind}_fwd_{}_{suffix}", T::NAME), MODULE, NORM_PTX)?;
            let cfg = row_config(rows, fit_threads(&f, row_threads(n / width, FWD_PACKS))?);
            let stream = dev.cuda_stream();
            let (rows_i, n_i, eps_f) = (rows as i32, n as i32, eps as f32);
            let null = 0u64;
            let mut l = stream.launch_builder(&f);
            l.arg(&xv).arg(&wv);
            if let Some(bv) = &bv {
                l.arg(bv);
            }
            l.arg(&mut y);
            if bv.is_some() {
                match &mut stats {
                    Some(st) => l.arg(st),
                    None => l.arg(&null),
                };
            }
            l.arg(&rows_i).arg(&n_i).arg(&eps_f);
            // SAFETY: argument types match the kernel signature; x and y hold rows * n elements,
            // w (and b) n elements; LayerNorm's statistics pointer is null or 2 * rows floats.
            unsafe { l.launch(cfg) }.w()?;
        }
        let stats = stats.map(|data| LayerNormStats { data, rows });
        Ok((T::wrap_cuda_slice(y, dev.clone()), stats))
    })
}

/// Gradients of RMSNorm: `(dx, dw)`.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (dx, mut grads) = backward("rms", x, w, dy, eps, None)?;
    match grads.pop() {
        Some(dw) => Ok((dx, dw)),
        None => candle_core::bail!("rms_norm backward: missing weight gradient"),
    }
}

/// Gradients of LayerNorm: `(dx, dw, db)`, from the forward pass's row statistics where given
/// (and the kernel for them applies: 16-bit rows that fit the staged kernel), else with the
/// statistics recomputed from x.
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    stats: Option<&LayerNormStats>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, grads) = backward("layer", x, w, dy, eps, stats)?;
    match <[Tensor; 2]>::try_from(grads) {
        Ok([dw, db]) => Ok((dx, dw, db)),
        Err(_) => candle_core::bail!("layer_norm backward: missing weight or bias gradient"),
    }
}

/// Runs the backward kernel of `kind` and the column reductions of its partial gradients:
/// returns dx and the parameter gradients (dw for rms; dw, db for layer).
fn backward(
    kind: &str,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    stats: Option<&LayerNormStats>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let op = if kind == "rms" {
        "rms_norm backward"
    } else {
        "layer_norm backward"
    };
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (xs, ws, gs) = (
        cuda_storage(&xs, "x")?,
        cuda_storage(&ws, "weight")?,
        cuda_storage(&gs, "dy")?,
    );
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len(op, xl.shape())?;
    let n_params = if kind == "rms" { 1 } else { 2 };
    let (xi, wi, gi) = (input(xs, xl)?, input(ws, wl)?, input(gs, gl)?);
    with_elem!(xs.dtype(), op, T => {
        let (xv, wv, gv) = (xi.view::<T>()?, wi.view::<T>()?, gi.view::<T>()?);
        let mut dx = alloc_out::<T>(&dev, rows * n)?;
        let mut grads = Vec::with_capacity(n_params);
        if rows == 0 {
            // No rows: the parameter gradients are zero.
            for _ in 0..n_params {
                grads.push(Tensor::zeros(n, w.dtype(), w.device())?);
            }
            return Ok((to_tensor(dx, &dev, xl.shape().clone()), grads));
        }
        let vec = n % T::VEC == 0 && aligned16(&xv, &dev) && aligned16(&wv, &dev) && aligned16(&gv, &dev);
        // Saved statistics serve only the rows they were computed for.
        let stats = stats.filter(|s| s.rows == rows && kind == "layer");
        let variant = if stats.is_some() { "saved" } else { "staged" };
        let (f, threads, smem) = match staged_kernel::<T>(kind, variant, &dev, vec, n)? {
            Some(staged) => staged,
            None => {
                let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
                let f = load(&dev, &format!("{kind}_bwd_{}_{suffix}", T::NAME), MODULE, NORM_PTX)?;
                let threads = fit_threads(&f, row_threads(n / width, bwd_packs(width)))?;
                (f, threads, 0)
            }
        };
        let saved = smem > 0 && stats.is_some();
        // The staged kernel ran fastest at 3 blocks per SM, below the most that fit (4 for
        // LayerNorm bf16, 5 for RMSNorm at 4096; H200: 166.8 / 122.1 µs against 172.1 / 128.9);
        // with saved statistics at 2.
        let max_per_sm = match (smem > 0, saved) {
            (false, _) => u32::MAX,
            (true, false) => STAGED_BLOCKS_PER_SM,
            (true, true) => SAVED_BLOCKS_PER_SM,
        };
        let groups = backward_groups(&f, &dev, threads, smem, max_per_sm, rows)?;
        // One partial row per block and parameter, fully written by the kernel.
        let mut parts: Vec<CudaSlice<f32>> = Vec::with_capacity(n_params);
        for _ in 0..n_params {
            // SAFETY: every block writes its whole partial row before the reduction reads it.
            parts.push(unsafe { dev.alloc::<f32>(groups * n) }?);
        }
        let stream = dev.cuda_stream();
        let (rows_i, n_i, eps_f, groups_i) = (rows as i32, n as i32, eps as f32, groups as i32);
        let mut l = stream.launch_builder(&f);
        l.arg(&xv).arg(&wv).arg(&gv).arg(&mut dx);
        for p in parts.iter_mut() {
            l.arg(p);
        }
        match stats {
            Some(st) if saved => l.arg(&st.data).arg(&rows_i).arg(&n_i),
            _ => l.arg(&rows_i).arg(&n_i).arg(&eps_f),
        };
        let cfg = LaunchConfig { grid_dim: (groups as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: argument types match the kernel signature; x, dy, dx hold rows * n elements,
        // w n elements, each partial buffer groups * n floats, the saved statistics 2 * rows
        // floats (their row count checked above); the grid has `groups` blocks, at most `rows`;
        // a staged kernel gets the shared memory it needs (`staged_kernel`).
        unsafe { l.launch(cfg) }.w()?;
        let reduce = load(&dev, &format!("reduce_cols_{}", T::NAME), MODULE, NORM_PTX)?;
        for p in &parts {
            let mut out = alloc_out::<T>(&dev, n)?;
            let mut l = stream.launch_builder(&reduce);
            l.arg(p).arg(&groups_i).arg(&n_i).arg(&mut out);
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(32) as u32, 1, 1), block_dim: (32, 32, 1), shared_mem_bytes: 0 };
            // SAFETY: `p` holds groups * n floats, `out` n elements.
            unsafe { l.launch(cfg) }.w()?;
            grads.push(to_tensor(out, &dev, n));
        }
        Ok((to_tensor(dx, &dev, xl.shape().clone()), grads))
    })
}

/// Blocks of the backward grid: as many as fit on the GPU at once (each keeps its partial
/// sums in registers across rows), at most `max_per_sm` per SM, never more than there are
/// rows.
fn backward_groups(
    f: &CudaFunction,
    dev: &CudaDevice,
    threads: u32,
    smem: u32,
    max_per_sm: u32,
    rows: usize,
) -> Result<usize> {
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
        .w()?
        .clamp(1, max_per_sm.max(1));
    Ok(((sm_count(dev)? * per_sm) as usize).min(rows).max(1))
}

/// The staged backward kernel of `kind` (`norm_bwd_staged` in norm.cu; `variant` "staged", or
/// "saved" for LayerNorm with saved statistics), its threads per block and its shared memory in
/// bytes, when it applies: 16-bit rows in 16-byte packs that fit [`STAGED_PACKS`] per thread,
/// and two slots of x and dy rows (4·n·2 bytes) within what the device grants a block. `None`
/// otherwise; the register-only kernel then runs.
fn staged_kernel<T: Elem>(
    kind: &str,
    variant: &str,
    dev: &CudaDevice,
    vec: bool,
    n: usize,
) -> Result<Option<(Kernel, u32, u32)>> {
    if !vec || std::mem::size_of::<T>() != 2 {
        return Ok(None);
    }
    let f = load(
        dev,
        &format!("{kind}_bwd_{variant}_{}", T::NAME),
        MODULE,
        NORM_PTX,
    )?;
    let packs = n / T::VEC;
    let threads = fit_threads(&f, row_threads(packs, STAGED_PACKS))?;
    let smem = 4 * n * std::mem::size_of::<T>();
    if packs > STAGED_PACKS * threads as usize || !allow_dynamic_smem(dev, &f, smem)? {
        return Ok(None);
    }
    Ok(Some((f, threads, smem as u32)))
}

/// `s = x + r` and `y = rms_norm(s) ⊙ w` in one launch, for inference (no gradients): `None`
/// when a row does not fit the kernel's registers (the caller then runs the two ops).
pub fn add_rms_norm_forward(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let (x, r) = (x.contiguous()?, r.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (rs, rl) = r.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let xs = cuda_storage(&xs, "add_rms_norm: x")?;
    let dev = xs.device().clone();
    let (rows, n) = rows_and_len("add_rms_norm", xl.shape())?;
    let (xi, ri) = (
        input(xs, xl)?,
        input(cuda_storage(&rs, "add_rms_norm: r")?, rl)?,
    );
    let wi = input(cuda_storage(&ws, "add_rms_norm: w")?, wl)?;
    with_elem!(xs.dtype(), "add_rms_norm", T => {
        let (xv, rv, wv) = (xi.view::<T>()?, ri.view::<T>()?, wi.view::<T>()?);
        let vec = n % T::VEC == 0
            && aligned16(&xv, &dev)
            && aligned16(&rv, &dev)
            && aligned16(&wv, &dev);
        let (suffix, width) = if vec { ("v", T::VEC) } else { ("s", 1) };
        let f = load(&dev, &format!("add_rms_fwd_{}_{suffix}", T::NAME), MODULE, NORM_PTX)?;
        let threads = fit_threads(&f, row_threads(n / width, FWD_PACKS))?;
        // The kernel holds the whole row in registers: fwd_packs packs per thread.
        if n / width > FWD_PACKS * threads as usize {
            return Ok(None);
        }
        let mut s = alloc_out::<T>(&dev, rows * n)?;
        let mut y = alloc_out::<T>(&dev, rows * n)?;
        if rows > 0 {
            let cfg = row_config(rows, threads);
            let stream = dev.cuda_stream();
            let (rows_i, n_i, eps_f) = (rows as i32, n as i32, eps as f32);
            let mut l = stream.launch_builder(&f);
            l.arg(&xv).arg(&rv).arg(&wv).arg(&mut s).arg(&mut y).arg(&rows_i).arg(&n_i).arg(&eps_f);
            // SAFETY: argument types match the kernel signature; x, r, s and y hold rows * n
            // elements, w n elements; each row fits the registers (checked above).
            unsafe { l.launch(cfg) }.w()?;
        }
        Ok(Some((to_tensor(s, &dev, xl.shape().clone()), to_tensor(y, &dev, xl.shape().clone()))))
    })
}
