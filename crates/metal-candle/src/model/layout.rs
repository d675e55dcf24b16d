//! How the tokens of a batch relate to each other: their RoPE positions and which keys each
//! query may attend to (causal, padded or packed batches).

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The arrangement of the sequences in a batch of token ids (batch, seq).
///
/// - [`SequenceLayout::Contiguous`]: every row is one sequence with no padding (the usual
///   case, and decoding with a [`super::KvCache`]).
/// - [`SequenceLayout::Padded`]: rows of different lengths padded on the left or the right;
///   positions count only real tokens, and padding is never attended to.
/// - [`SequenceLayout::Packed`]: several examples per row (training); positions restart at
///   each example and attention stays inside it (block-diagonal causal mask).
#[derive(Debug, Clone)]
pub enum SequenceLayout {
    /// Each row is one unpadded sequence; `offset` tokens of it are already in the cache.
    Contiguous {
        /// Number of tokens before this chunk (the cache length; 0 without a cache).
        offset: usize,
    },
    /// Padded rows. `attention_mask` is (batch, cached + seq), 1 for real tokens and 0 for
    /// padding, covering the cached tokens too (as in Hugging Face `generate`).
    Padded {
        /// 1 = real token, 0 = padding; integer or float dtype.
        attention_mask: Tensor,
    },
    /// Packed rows. `segment_ids` is (batch, seq): each maximal run of equal ids is one
    /// example. Not usable with a cache.
    Packed {
        /// Example ids; a new example starts wherever the id changes.
        segment_ids: Tensor,
    },
}

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub(crate) enum AttentionMask {
    /// Causal over the keys: query `i` of the chunk sees keys `lo ..= cached + i`, with
    /// `lo` from `first_key` (batch, seq) u32 for packed rows, else 0. What
    /// [`crate::ops::causal_attention`] computes without materialising a mask.
    Causal {
        /// The start of each query's example (packed rows), or `None`.
        first_key: Option<Tensor>,
    },
    /// Any other pattern (padded rows): an additive bias (batch, 1, seq, cached + seq) in the
    /// compute dtype, 0 where attention is allowed and a large negative number where not.
    Bias(Tensor),
    /// One decoding step into fixed cache slots whose positions live on the device (what a
    /// CUDA graph replays: no shape or host value changes between steps). Each row writes
    /// its new key and value at its position and attends to every slot up to it.
    DeviceSlots {
        /// (batch, kv_heads, 1, head_dim) u32: each row's position, repeated, for
        /// `scatter_set` along the cache's position axis.
        index: Tensor,
        /// (batch, 1, 1, capacity) in the compute dtype: 0 for slots at or before the row's
        /// position and a large negative number after it.
        bias: Tensor,
    },
}

/// What attention needs from a layout: RoPE positions and the mask.
#[derive(Debug, Clone)]
pub(crate) struct PreparedLayout {
    /// (batch, seq) u32.
    pub positions: Tensor,
    pub mask: AttentionMask,
}

impl SequenceLayout {
    /// Positions and attention bias for a chunk of `batch × seq` tokens after `cached` cached
    /// ones.
    pub(crate) fn prepare(
        &self,
        batch: usize,
        seq: usize,
        cached: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<PreparedLayout> {
        match self {
            SequenceLayout::Contiguous { offset } => {
                if *offset != cached {
                    return Err(Error::shape(
                        "Llama::forward",
                        format!("seqlen_offset is {offset} but the KV cache holds {cached} tokens; pass the cache length as the offset"),
                    ));
                }
                let row: Vec<u32> = (cached..cached + seq).map(|p| p as u32).collect();
                let positions = Tensor::new(row, device)?.unsqueeze(0)?.repeat((batch, 1))?;
                Ok(PreparedLayout {
                    positions,
                    mask: AttentionMask::Causal { first_key: None },
                })
            }
            SequenceLayout::Padded { attention_mask } => {
                let dims = attention_mask.dims();
                if dims != [batch, cached + seq] {
                    return Err(Error::shape(
                        "Llama::forward",
                        format!(
                            "attention_mask is {dims:?} but the batch needs [{batch}, {}] (batch, cached {cached} + new {seq} tokens)",
                            cached + seq
                        ),
                    ));
                }
                let mask: Vec<Vec<u32>> = attention_mask
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|row| row.into_iter().map(|m| u32::from(m != 0.0)).collect())
                    .collect();
                // A token's position counts the real tokens before it (padding takes none).
                let positions =
                    Tensor::from_vec(fix_positions(&mask, cached, seq), (batch, seq), device)?;
                let allowed = |row: usize, q: usize, k: usize| k <= cached + q && mask[row][k] == 1;
                let bias = bias_tensor(batch, seq, cached + seq, allowed, dtype, device)?;
                Ok(PreparedLayout {
                    positions,
                    mask: AttentionMask::Bias(bias),
                })
            }
            SequenceLayout::Packed { segment_ids } => {
                if cached != 0 {
                    return Err(Error::shape(
                        "Llama::forward",
                        "a packed batch cannot be used with a KV cache holding tokens",
                    ));
                }
                let dims = segment_ids.dims();
                if dims != [batch, seq] {
                    return Err(Error::shape(
                        "Llama::forward",
                        format!("segment_ids is {dims:?} but the input ids are [{batch}, {seq}]"),
                    ));
                }
                let segs: Vec<Vec<i64>> = segment_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
                // Position = distance from the start of the token's run of equal ids.
                let mut starts = vec![vec![0usize; seq]; batch];
                let mut positions = Vec::with_capacity(batch * seq);
                for (r, row) in segs.iter().enumerate() {
                    for i in 0..seq {
                        starts[r][i] = if i > 0 && row[i] == row[i - 1] {
                            starts[r][i - 1]
                        } else {
                            i
                        };
                        positions.push((i - starts[r][i]) as u32);
                    }
                }
                let positions = Tensor::from_vec(positions, (batch, seq), device)?;
                let first_key: Vec<u32> = starts.iter().flatten().map(|&k| k as u32).collect();
                Ok(PreparedLayout {
                    positions,
                    mask: AttentionMask::Causal {
                        first_key: Some(Tensor::from_vec(first_key, (batch, seq), device)?),
                    },
                })
            }
        }
    }
}

/// Positions of the `seq` new tokens of each padded row: the number of real tokens before
/// each one (padding gets position 0; it is never attended to).
fn fix_positions(mask: &[Vec<u32>], cached: usize, seq: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(mask.len() * seq);
    for row in mask {
        let mut seen = 0u32;
        for (i, &m) in row.iter().enumerate() {
            if i >= cached {
                out.push(if m == 1 { seen } else { 0 });
            }
            seen += m;
        }
    }
    out
}

/// The additive bias (rows, 1, q_len, k_len): 0 where `allowed(row, q, k)`, else a large
/// negative value. Finite rather than -inf so a query with no visible key (a padding token)
/// gets a harmless uniform row instead of NaN.
fn bias_tensor(
    rows: usize,
    q_len: usize,
    k_len: usize,
    allowed: impl Fn(usize, usize, usize) -> bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let blocked = match dtype {
        DType::F16 => -30_000.0f32,
        _ => -1.0e30f32,
    };
    let mut data = Vec::with_capacity(rows * q_len * k_len);
    for r in 0..rows {
        for q in 0..q_len {
            for k in 0..k_len {
                data.push(if allowed(r, q, k) { 0.0 } else { blocked });
            }
        }
    }
    Ok(Tensor::from_vec(data, (rows, 1, q_len, k_len), device)?.to_dtype(dtype)?)
}
