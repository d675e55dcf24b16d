//! Host side of the decoding attention kernel (`kernels/attention.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Tensor};

use super::common::{
    alloc_out, cuda_storage, input, load, to_tensor, with_elem, Elem, ATTENTION_PTX,
};

const MODULE: &str = "metal_candle_attention";
/// Shared memory one block may use without opting in to more (bytes).
const SHARED_LIMIT: usize = 48 * 1024;

/// `softmax(q·kᵀ)·v` for one query per head: `q` (b, heads, 1, d) already scaled, `k` and `v`
/// (b, kv_heads, t, d) with rows of `d` contiguous elements (any batch and head strides, as
/// a view of a cache buffer has). `None` when the problem does not fit the kernel (head_dim
/// over 256, too many keys for shared memory, or other strides); the caller then composes it.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let (b, heads, s, d) = q.dims4()?;
    let (k_batch, kv_heads, t, kd) = k.dims4()?;
    if s != 1
        || kd != d
        || k_batch != b
        || v.dims() != k.dims()
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        return Ok(None);
    }
    let threads: usize = if d <= 128 { 128 } else { 256 };
    let shared = 4 * (d + t + threads + 32);
    if d == 0 || d > 256 || t == 0 || shared > SHARED_LIMIT || b * heads > i32::MAX as usize {
        return Ok(None);
    }
    // K and V: rows of d contiguous elements; batch and head strides read from the layouts.
    let strides = |x: &Tensor| -> Option<(i64, i64)> {
        let st = x.layout().stride();
        (st[3] == 1 && (st[2] == d || t == 1)).then_some((st[0] as i64, st[1] as i64))
    };
    let (Some((kbs, khs)), Some((vbs, vhs))) = (strides(k), strides(v)) else {
        return Ok(None);
    };
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let qs = cuda_storage(&qs, "decode_attention: q")?;
    let (ks, vs) = (
        cuda_storage(&ks, "decode_attention: k")?,
        cuda_storage(&vs, "decode_attention: v")?,
    );
    let dev = qs.device().clone();
    let qi = input(qs, ql)?;
    with_elem!(q.dtype(), "decode_attention", T => {
        let qv = qi.view::<T>()?;
        // K and V from their start offsets; the kernel applies the strides itself.
        let kv = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let vv = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        let mut y = alloc_out::<T>(&dev, b * heads * d)?;
        let f = load(&dev, &format!("decode_attn_{}", T::NAME), MODULE, ATTENTION_PTX)?;
        let cfg = LaunchConfig {
            grid_dim: ((b * heads) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads_i, rep_i, t_i, d_i) = ((heads) as i32, (heads / kv_heads) as i32, t as i32, d as i32);
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&qv).arg(&kv).arg(&vv).arg(&mut y).arg(&heads_i).arg(&rep_i).arg(&t_i).arg(&d_i);
        l.arg(&kbs).arg(&khs).arg(&vbs).arg(&vhs);
        // SAFETY: argument types match the kernel; q and y hold b·heads·d elements; every K/V
        // row the kernel reads (batch < b, head < kv_heads, t < t_len) lies inside the views
        // whose strides were checked above; shared memory is sized for d + t + threads + 32 floats.
        unsafe { l.launch(cfg) }.w()?;
        Ok(Some(to_tensor(y, &dev, (b, heads, 1, d))))
    })
}
