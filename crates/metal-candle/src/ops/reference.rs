//! The same maths as the fused ops, composed from plain candle ops.
//!
//! These are the oracle in tests, the baseline in benchmarks and the path on devices without
//! a fused kernel. Half-precision inputs are computed in f32 and rounded once at the end, as the
//! fused kernels do, except in [`rope`] and [`swiglu`]: they are the llama model's own
//! compositions, kept in the model's dtype on devices without a fused kernel (element-wise,
//! each output is a couple of roundings, with no long sum whose error f32 would contain).
//! Autograd flows through candle's own ops.

use candle_core::{DType, Result, Tensor, D};

fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// `softmax(x)` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let xf = upcast(x)?;
    let m = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(x.dtype())
}

/// `x / sqrt(mean(x²) + eps) ⊙ weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = upcast(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.broadcast_mul(&upcast(weight)?)?.to_dtype(x.dtype())
}

/// `(x − mean) / sqrt(var + eps) ⊙ weight + bias` over the last dimension (biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = upcast(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(&upcast(weight)?)?
        .broadcast_add(&upcast(bias)?)?
        .to_dtype(x.dtype())
}

/// `scale · (x·A)·B` with `a` (in, r) and `b` (r, out).
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let xf = upcast(x)?;
    let (lead, k) = split_last(x)?;
    let t = xf.reshape(((), k))?.matmul(&upcast(a)?)?;
    let y = (t.matmul(&upcast(b)?)? * scale)?;
    let mut dims = lead;
    dims.push(b.dim(1)?);
    y.reshape(dims)?.to_dtype(x.dtype())
}

/// `x·Wᵀ + bias + scale·(x·A)·B` with `w` (out, in), `a` (in, r), `b` (r, out).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (lead, k) = split_last(x)?;
    let x2 = upcast(x)?.reshape(((), k))?;
    let mut y = x2.matmul(&upcast(w)?.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&upcast(bias)?)?;
    }
    let delta = (x2.matmul(&upcast(a)?)?.matmul(&upcast(b)?)? * scale)?;
    let mut dims = lead;
    dims.push(w.dim(0)?);
    (y + delta)?.reshape(dims)?.to_dtype(x.dtype())
}

fn split_last(x: &Tensor) -> Result<(Vec<usize>, usize)> {
    let dims = x.dims();
    match dims.split_last() {
        Some((&k, lead)) => Ok((lead.to_vec(), k)),
        None => candle_core::bail!("expected a tensor with at least one dimension, got a scalar"),
    }
}

/// `logsumexp(logits_row) − logits_row[target]` per row, in f32 (f64 for f64 logits), through
/// candle-nn's `log_softmax` and a gather.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(D::Minus1)?;
    let rows = logits.elem_count().checked_div(n).unwrap_or(0);
    let log_probs = candle_nn::ops::log_softmax(&upcast(logits)?.reshape((rows, n))?, D::Minus1)?;
    let picked = log_probs.gather(&targets.reshape((rows, 1))?, 1)?;
    picked.neg()?.reshape(targets.shape())
}

/// The rotary embedding of `x` (batch, heads, seq, head_dim) by `cos` and `sin` (batch or 1,
/// seq, head_dim/2): `x·cos + rotate_half(x)·sin` with `rotate_half(x) = (−x2, x1)`, in the
/// inputs' dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `silu(gate)·up`, in the inputs' dtype.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Causal attention `softmax(scale·q·kᵀ + mask)·v` with grouped key/value heads: `q` (batch,
/// heads, s, d), `k` and `v` (batch, kv_heads, t, d); query `i` sees keys
/// `first_key[b][i] ..= i + t − s` (`first_key` (batch, s) u32, or 0), and a query that sees
/// no key gets zeros. Scores, softmax and the weighted sum in f32.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    first_key: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let (_, kv_heads, t, _) = k.dims4()?;
    let rep = heads / kv_heads;
    let starts: Vec<Vec<u32>> = match first_key {
        Some(f) => f.to_dtype(DType::U32)?.to_vec2()?,
        None => vec![vec![0; s]; b],
    };
    // 1 where query i may see key j, for the rep query heads stacked along the rows.
    let mut mask = Vec::with_capacity(b * rep * s * t);
    for row in &starts {
        for _ in 0..rep {
            for (i, &lo) in row.iter().enumerate() {
                mask.extend((0..t).map(|j| f32::from(j >= lo as usize && j <= i + t - s)));
            }
        }
    }
    let scores = (upcast(q)?
        .reshape((b, kv_heads, rep * s, d))?
        .matmul(&upcast(k)?.t()?)?
        * scale)?;
    let mask = Tensor::from_vec(mask, (b, 1, rep * s, t), q.device())?.to_dtype(scores.dtype())?;
    let blocked = ((&mask - 1.0)? * 1e30)?;
    let probs = softmax_last_dim(&scores.broadcast_add(&blocked)?)?.broadcast_mul(&mask)?;
    probs
        .matmul(&upcast(v)?)?
        .reshape((b, heads, s, d))?
        .to_dtype(q.dtype())
}
