//! Attention of one new query per head over cached keys and values: the decoding step.

use candle_core::Tensor;

use super::{check_same, softmax_last_dim};
use crate::{Error, Result};

/// `softmax(q·kᵀ)·v` for one query per head, with grouped key/value heads: `q` (batch, heads,
/// 1, head_dim), already scaled by `1/√head_dim`; `k` and `v` (batch, kv_heads, keys,
/// head_dim), where `heads` is a multiple of `kv_heads` and query head `h` attends with
/// key/value head `h / (heads / kv_heads)`. Returns (batch, heads, 1, head_dim).
///
/// Decoding a token runs this once per layer. On CUDA, when nothing needs a gradient, it is one
/// kernel (scores, softmax and the weighted sum in shared memory, K and V read through their
/// strides, so a view of a cache buffer is not copied) instead of two matmuls and a softmax;
/// elsewhere, or when the keys do not fit the kernel's shared memory, it runs as those ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::new(&[[[[1f32, 0.]]], [[[0f32, 1.]]]], &dev)?.reshape((1, 2, 1, 2))?;
/// let k = Tensor::new(&[[[[1f32, 0.], [0., 1.]]]], &dev)?; // one kv head, two keys
/// let v = Tensor::new(&[[[[10f32, 0.], [0., 10.]]]], &dev)?;
/// let y = metal_candle::ops::single_query_attention(&q, &k, &v)?;
/// assert_eq!(y.dims(), &[1, 2, 1, 2]);
/// let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
/// assert!(y[0] > y[1] && y[3] > y[2]); // each head leans to its own key
/// # Ok(())
/// # }
/// ```
pub fn single_query_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    const OP: &str = "single_query_attention";
    let (Ok((b, heads, s, d)), Ok((kb, kv_heads, _, kd))) = (q.dims4(), k.dims4()) else {
        return Err(Error::shape(
            OP,
            format!(
                "q must be (batch, heads, 1, head_dim) and k (batch, kv_heads, keys, head_dim); got {:?} and {:?}",
                q.dims(),
                k.dims()
            ),
        ));
    };
    if s != 1 || kb != b || kd != d || v.dims() != k.dims() {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?}, k {:?} and v {:?} do not fit: q needs one query per head, k and v the same shape with q's batch and head_dim",
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
    check_same(OP, &[("q", q), ("k", k), ("v", v)])?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda()
        && super::cuda::supports(q.dtype())
        && ![q, k, v].iter().any(|t| t.track_op())
    {
        if let Some(y) = super::cuda::decode_attention(q, k, v)? {
            return Ok(y);
        }
    }
    // The query heads that share a key/value head are stacked as rows of one matmul.
    let rep = heads / kv_heads;
    let scores = q.reshape((b, kv_heads, rep, d))?.matmul(&k.t()?)?;
    let probs = softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?.reshape((b, heads, 1, d))?)
}
