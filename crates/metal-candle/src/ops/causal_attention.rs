//! Causal self-attention with grouped key/value heads, forward and backward, that never keeps
//! the (queries × keys) matrices.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type};
use super::{check_same, kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// `softmax(scale·q·kᵀ + causal mask)·v` for `q` (batch, heads, s, d) and `k`, `v` (batch,
/// kv_heads, t, d) with `t ≥ s`: query `i` sees keys `lo ..= i + t − s`, the `s` queries
/// being the last `s` of the `t` positions (a prefill after `t − s` cached tokens). Query head
/// `h` attends with key/value head `h / (heads / kv_heads)` (grouped-query attention; no copy
/// of K or V is made per query head). Returns (batch, heads, s, d). Differentiable in q, k, v.
///
/// `first_key` (batch, s) u32, when given, is `lo` per query: packed rows, where attention
/// must stay inside each example, pass the position at which the query's example starts. A
/// query that sees no key (`lo > i + t − s`) gets zeros and passes no gradient.
///
/// The composed form (`reference::causal_attention`) materialises the scores, the mask, the
/// probabilities and, for autograd, keeps each of them alive until the backward pass: for a
/// 1B-parameter llama at batch 8 × 512 that is hundreds of MB per layer. This op keeps only its
/// inputs and output. On CUDA the scores and probabilities exist only inside one call (batched
/// cuBLAS GEMMs around a masked-softmax kernel; the backward pass recomputes them); on the CPU
/// each query row is computed in a row-sized buffer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::ones((1, 2, 3, 4), candle_core::DType::F32, &dev)?; // 2 heads, 3 queries
/// let k = Tensor::ones((1, 1, 3, 4), candle_core::DType::F32, &dev)?; // 1 kv head
/// let v = Tensor::new(&[[1f32; 4], [2.; 4], [3.; 4]], &dev)?.reshape((1, 1, 3, 4))?;
/// let y = metal_candle::ops::causal_attention(&q, &k, &v, 0.5, None)?;
/// // Equal scores: query i averages the values of keys 0..=i.
/// let y: Vec<f32> = y.get(0)?.get(0)?.get(2)?.to_vec1()?;
/// assert!((y[0] - 2.0).abs() < 1e-6);
/// # Ok(())
/// # }
/// ```
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    first_key: Option<&Tensor>,
) -> Result<Tensor> {
    check_args(q, k, v, scale, first_key)?;
    Ok(match kernel_path(q.device(), q.dtype()) {
        KernelPath::Fused => q.apply_op3(
            k,
            v,
            CausalAttention {
                scale,
                first_key: first_key.cloned(),
            },
        )?,
        KernelPath::Reference => reference::causal_attention(q, k, v, scale, first_key)?,
    })
}

/// Checks every shape, dtype and device (clear errors before any kernel runs).
fn check_args(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    first_key: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "causal_attention";
    let (Ok((b, heads, s, d)), Ok((kb, kv_heads, t, kd))) = (q.dims4(), k.dims4()) else {
        return Err(Error::shape(
            OP,
            format!(
                "q must be (batch, heads, s, head_dim) and k (batch, kv_heads, t, head_dim); got {:?} and {:?}",
                q.dims(),
                k.dims()
            ),
        ));
    };
    if kb != b || kd != d || v.dims() != k.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?}, k {:?} and v {:?} do not fit: k and v must have the same shape, with q's batch and head_dim",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        ));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::shape(
            OP,
            format!("{heads} query heads cannot share {kv_heads} key/value heads evenly"),
        ));
    }
    if t < s {
        return Err(Error::shape(
            OP,
            format!("{s} queries but only {t} keys: the queries are the last s of the t positions, so t must be at least s"),
        ));
    }
    if !scale.is_finite() {
        return Err(Error::Msg(format!(
            "{OP}: scale is {scale}; it must be finite"
        )));
    }
    check_same(OP, &[("q", q), ("k", k), ("v", v)])?;
    if let Some(f) = first_key {
        if f.dims() != [b, s] || f.dtype() != DType::U32 {
            return Err(Error::shape(
                OP,
                format!(
                    "first_key is {:?} {:?}; it must be u32 of shape [{b}, {s}] (batch, queries)",
                    f.dtype(),
                    f.dims()
                ),
            ));
        }
        if !f.device().same_device(q.device()) {
            return Err(Error::Msg(format!(
                "{OP}: first_key is on {:?} but q is on {:?}",
                f.device().location(),
                q.device().location()
            )));
        }
    }
    Ok(())
}

struct CausalAttention {
    scale: f64,
    first_key: Option<Tensor>,
}

impl CausalAttention {
    fn first_key_on_cpu(&self) -> candle_core::Result<Option<Vec<u32>>> {
        self.first_key
            .as_ref()
            .map(|f| f.flatten_all()?.to_vec1::<u32>())
            .transpose()
    }
}

/// The CPU kernel's dimensions from the layouts of q and k.
fn cpu_dims<'a>(
    ql: &Layout,
    kl: &Layout,
    scale: f64,
    first_key: Option<&'a [u32]>,
) -> candle_core::Result<cpu::attention::Dims<'a>> {
    let (batch, heads, s, d) = ql.shape().dims4()?;
    let (_, kv_heads, t, _) = kl.shape().dims4()?;
    Ok(cpu::attention::Dims {
        batch,
        heads,
        kv_heads,
        s,
        t,
        d,
        scale,
        first_key,
    })
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "metal-candle-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let first_key = self.first_key_on_cpu()?;
        let dims = cpu_dims(ql, kl, self.scale, first_key.as_deref())?;
        with_float_type!(qs.dtype(), "causal_attention", T => {
            let q = cpu::contiguous::<T>(qs, ql)?;
            let (k, v) = (cpu::contiguous::<T>(ks, kl)?, cpu::contiguous::<T>(vs, vl)?);
            let y = cpu::attention::forward(&q, &k, &v, &dims);
            Ok((cpu::to_storage(y), ql.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::causal_attention_forward(
            (qs, ql),
            (ks, kl),
            (vs, vl),
            self.first_key.as_ref(),
            self.scale as f32,
        )?;
        Ok((y, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.device() {
            candle_core::Device::Cpu => self.cpu_backward(q, k, v, dy)?,
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => super::cuda::causal_attention_backward(
                q,
                k,
                v,
                dy,
                self.first_key.as_ref(),
                self.scale as f32,
            )?,
            _ => candle_core::bail!(
                "causal_attention backward: no fused kernel for {:?}",
                q.device().location()
            ),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl CausalAttention {
    fn cpu_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let first_key = self.first_key_on_cpu()?;
        let dims = cpu_dims(q.layout(), k.layout(), self.scale, first_key.as_deref())?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) =
            (&*qs, &*ks, &*vs, &*gs)
        else {
            candle_core::bail!("causal_attention backward: q, k, v and dy must all be on the CPU")
        };
        with_float_type!(q.dtype(), "causal_attention backward", T => {
            let q = cpu::contiguous::<T>(qs, ql)?;
            let (k, v) = (cpu::contiguous::<T>(ks, kl)?, cpu::contiguous::<T>(vs, vl)?);
            let g = cpu::contiguous::<T>(gs, gl)?;
            let (dq, dk, dv) = cpu::attention::backward(&q, &k, &v, &g, &dims);
            Ok((
                cpu::to_tensor(dq, ql.dims())?,
                cpu::to_tensor(dk, kl.dims())?,
                cpu::to_tensor(dv, vl.dims())?,
            ))
        })
    }
}
