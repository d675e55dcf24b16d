//! Host side of causal attention on CUDA: batched cuBLAS GEMMs around the masked-softmax
//! kernels of `kernels/attention.cu`.
//!
//! The `rep = heads / kv_heads` query heads that share a key/value head are consecutive in
//! q's (batch, heads, s, d) layout, so q is read as `batch · kv_heads` matrices of
//! `rep · s` rows, each against one (t × d) K and V: grouped-query attention with no copy of
//! K or V, and K and V's gradients summed over the group by the GEMMs themselves. Scores are
//! f32; the probabilities and the score gradient are in the input dtype, as the GEMMs read them.
//! They exist only inside one call: nothing but q, k, v and the output is kept for backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{
    alloc_out, cuda_storage, fit_threads, input, load, to_tensor, with_elem, Elem, Kernel,
    ATTENTION_PTX,
};
use super::gemm::{gemm_batched, BatchedOperand};

const MODULE: &str = "metal_candle_attention";
/// Score elements each thread of the softmax kernels holds in registers (`C` in the kernel).
const PER_THREAD: usize = 8;

/// The problem's sizes, from q's and k's shapes.
#[derive(Clone, Copy)]
struct Sizes {
    /// batch · kv_heads: the number of independent GEMM problems.
    groups: usize,
    /// rep · s: query rows per group.
    rows: usize,
    s: usize,
    t: usize,
    d: usize,
    /// heads · s: query rows per batch element (indexes `first_key`).
    per_batch: usize,
}

impl Sizes {
    fn new(q: &Layout, k: &Layout) -> Result<Self> {
        let (b, heads, s, d) = q.shape().dims4()?;
        let (_, kv_heads, t, _) = k.shape().dims4()?;
        let sizes = Self {
            groups: b * kv_heads,
            rows: heads / kv_heads * s,
            s,
            t,
            d,
            per_batch: heads * s,
        };
        let scores = sizes.groups * sizes.rows * t;
        if scores > i32::MAX as usize {
            candle_core::bail!(
                "causal_attention: {scores} scores exceed the CUDA kernels' 32-bit row indices; split the batch"
            )
        }
        Ok(sizes)
    }

    fn score_count(&self) -> usize {
        self.groups * self.rows * self.t
    }

    fn q_operand<'a, 'b, T>(&self, data: &'a CudaView<'b, T>) -> BatchedOperand<'a, 'b, T> {
        BatchedOperand {
            data,
            trans: false,
            ld: self.d,
            stride: self.rows * self.d,
        }
    }

    /// K or V: (t × d) per group, optionally transposed.
    fn kv_operand<'a, 'b, T>(
        &self,
        data: &'a CudaView<'b, T>,
        trans: bool,
    ) -> BatchedOperand<'a, 'b, T> {
        BatchedOperand {
            data,
            trans,
            ld: self.d,
            stride: self.t * self.d,
        }
    }

    /// P or dS: (rows × t) per group, optionally transposed.
    fn score_operand<'a, 'b, T>(
        &self,
        data: &'a CudaView<'b, T>,
        trans: bool,
    ) -> BatchedOperand<'a, 'b, T> {
        BatchedOperand {
            data,
            trans,
            ld: self.t,
            stride: self.rows * self.t,
        }
    }

    fn launch_config(&self, f: &Kernel) -> Result<LaunchConfig> {
        let threads = (self.t.div_ceil(PER_THREAD).div_ceil(32) * 32).clamp(32, 1024) as u32;
        Ok(LaunchConfig {
            grid_dim: ((self.groups * self.rows) as u32, 1, 1),
            block_dim: (fit_threads(f, threads)?, 1, 1),
            shared_mem_bytes: 0,
        })
    }
}

/// `first_key`'s device buffer, or `None`.
fn first_key_storage(first_key: Option<&Tensor>) -> Result<Option<Tensor>> {
    first_key.map(|f| f.contiguous()).transpose()
}

/// Pushes `first_key` (its device pointer, or a null pointer) as a kernel argument.
macro_rules! push_first_key {
    ($builder:expr, $view:expr, $null:expr) => {
        match $view {
            Some(v) => $builder.arg(v),
            None => $builder.arg($null),
        }
    };
}

/// S = q·kᵀ in f32 for every group: (groups, rows, t).
fn scores<T: Elem>(
    dev: &CudaDevice,
    n: Sizes,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
) -> Result<CudaSlice<f32>> {
    let mut s = alloc_out::<f32>(dev, n.score_count())?;
    gemm_batched(
        dev,
        (n.rows, n.t, n.d),
        n.groups,
        1.0,
        n.q_operand(a),
        n.kv_operand(b, true),
        &mut s,
    )?;
    Ok(s)
}

/// The output (batch, heads, s, d) of causal attention for q, k, v (storage and layout each).
pub fn causal_attention_forward(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    first_key: Option<&Tensor>,
    scale: f32,
) -> Result<CudaStorage> {
    let n = Sizes::new(ql, kl)?;
    let dev = qs.device().clone();
    let (qi, ki, vi) = (input(qs, ql)?, input(ks, kl)?, input(vs, vl)?);
    let first_key = first_key_storage(first_key)?;
    let fk_guard = first_key.as_ref().map(|f| f.storage_and_layout());
    let fk = match &fk_guard {
        Some((s, l)) => Some(
            cuda_storage(s, "causal_attention: first_key")?
                .as_cuda_slice::<u32>()?
                .slice(l.start_offset()..),
        ),
        None => None,
    };
    let null = 0u64;
    with_elem!(qs.dtype(), "causal_attention", T => {
        let (q, k, v) = (qi.view::<T>()?, ki.view::<T>()?, vi.view::<T>()?);
        let s = scores(&dev, n, &q, &k)?;
        let mut p = alloc_out::<T>(&dev, n.score_count())?;
        let f = load(&dev, &format!("causal_softmax_fwd_{}", T::NAME), MODULE, ATTENTION_PTX)?;
        let cfg = n.launch_config(&f)?;
        let (s_i, t_i, pb_i) = (n.s as i32, n.t as i32, n.per_batch as i32);
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&s).arg(&mut p);
        push_first_key!(l, fk.as_ref(), &null);
        l.arg(&s_i).arg(&t_i).arg(&pb_i).arg(&scale);
        // SAFETY: argument types match the kernel; S and P hold groups·rows·t elements, one
        // block per row; first_key (when given) holds batch·s u32, checked by the op.
        unsafe { l.launch(cfg) }.w()?;
        drop(s);
        let mut y = alloc_out::<T>(&dev, n.groups * n.rows * n.d)?;
        let pv = p.slice(..);
        gemm_batched(&dev, (n.rows, n.d, n.t), n.groups, 1.0, n.score_operand(&pv, false), n.kv_operand(&v, false), &mut y)?;
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `(dq, dk, dv)` of causal attention for the upstream gradient `dy`; recomputes the scores.
pub fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    first_key: Option<&Tensor>,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = Sizes::new(q.layout(), k.layout())?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (qs, ks, vs, gs) = (
        cuda_storage(&qs, "causal_attention backward: q")?,
        cuda_storage(&ks, "causal_attention backward: k")?,
        cuda_storage(&vs, "causal_attention backward: v")?,
        cuda_storage(&gs, "causal_attention backward: dy")?,
    );
    let dev = qs.device().clone();
    let (qi, ki, vi, gi) = (
        input(qs, ql)?,
        input(ks, kl)?,
        input(vs, vl)?,
        input(gs, gl)?,
    );
    let first_key = first_key_storage(first_key)?;
    let fk_guard = first_key.as_ref().map(|f| f.storage_and_layout());
    let fk = match &fk_guard {
        Some((s, l)) => Some(
            cuda_storage(s, "causal_attention backward: first_key")?
                .as_cuda_slice::<u32>()?
                .slice(l.start_offset()..),
        ),
        None => None,
    };
    let null = 0u64;
    with_elem!(q.dtype(), "causal_attention backward", T => {
        let (qv, kv, vv, gv) = (qi.view::<T>()?, ki.view::<T>()?, vi.view::<T>()?, gi.view::<T>()?);
        let s = scores(&dev, n, &qv, &kv)?;
        // dP = dy·vᵀ, f32.
        let dp = scores(&dev, n, &gv, &vv)?;
        let mut p = alloc_out::<T>(&dev, n.score_count())?;
        let mut ds = alloc_out::<T>(&dev, n.score_count())?;
        let f = load(&dev, &format!("causal_softmax_bwd_{}", T::NAME), MODULE, ATTENTION_PTX)?;
        let cfg = n.launch_config(&f)?;
        let (s_i, t_i, pb_i) = (n.s as i32, n.t as i32, n.per_batch as i32);
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&s).arg(&dp).arg(&mut p).arg(&mut ds);
        push_first_key!(l, fk.as_ref(), &null);
        l.arg(&s_i).arg(&t_i).arg(&pb_i).arg(&scale);
        // SAFETY: as for the forward kernel; dP, P and dS hold groups·rows·t elements each.
        unsafe { l.launch(cfg) }.w()?;
        drop((s, dp));
        let (pv, dsv) = (p.slice(..), ds.slice(..));
        let kv_len = n.groups * n.t * n.d;
        // dv = Pᵀ·dy, dq = dS·k, dk = dSᵀ·q (each summed over the group's query heads).
        let mut dv = alloc_out::<T>(&dev, kv_len)?;
        gemm_batched(&dev, (n.t, n.d, n.rows), n.groups, 1.0, n.score_operand(&pv, true), n.q_operand(&gv), &mut dv)?;
        let mut dq = alloc_out::<T>(&dev, n.groups * n.rows * n.d)?;
        gemm_batched(&dev, (n.rows, n.d, n.t), n.groups, 1.0, n.score_operand(&dsv, false), n.kv_operand(&kv, false), &mut dq)?;
        let mut dk = alloc_out::<T>(&dev, kv_len)?;
        gemm_batched(&dev, (n.t, n.d, n.rows), n.groups, 1.0, n.score_operand(&dsv, true), n.q_operand(&qv), &mut dk)?;
        Ok((
            to_tensor(dq, &dev, ql.shape().clone()),
            to_tensor(dk, &dev, kl.shape().clone()),
            to_tensor(dv, &dev, vl.shape().clone()),
        ))
    })
}
