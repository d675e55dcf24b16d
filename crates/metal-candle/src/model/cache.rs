//! The key/value cache that lets generation decode one token at a time.

use candle_core::Tensor;

use crate::{Error, Result};

/// Keys and values of every layer for the tokens seen so far, each (batch, kv_heads, len,
/// head_dim) after RoPE.
///
/// ```
/// use metal_candle::model::KvCache;
/// let cache = KvCache::new(30);
/// assert_eq!(cache.len(), 0); // the seqlen_offset of the next forward
/// ```
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions (the offset of the next token).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Forgets every cached token (for a new prompt).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Keeps only the first `len` positions (to roll back speculative or rejected tokens).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        Ok(())
    }

    /// Appends this step's keys and values for `layer` and returns all of them.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            Error::shape(
                "KvCache::append",
                format!("layer {layer} but the cache has {n} layers"),
            )
        })?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((ck, cv)) => {
                if ck.dims()[0] != k.dims()[0] {
                    return Err(Error::shape(
                        "KvCache::append",
                        format!("the cache holds a batch of {} but this step has {}; reset the cache for a new batch", ck.dims()[0], k.dims()[0]),
                    ));
                }
                (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?)
            }
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
