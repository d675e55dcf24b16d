//! The key/value cache that lets generation decode one token at a time.

use candle_core::{Tensor, TensorId};

use crate::{Error, Result};

/// Keys and values of every layer for the tokens seen so far, each (batch, kv_heads, len,
/// head_dim) after RoPE.
///
/// Each layer's keys and values live in buffers with room for more positions than are used;
/// a step writes its new positions into them in place (one copy of the new rows) and attends
/// over a view of the used part. Concatenating instead would copy the whole cache and allocate
/// a new one at every token. The buffers grow by doubling when full.
///
/// ```
/// use metal_candle::model::KvCache;
/// let cache = KvCache::new(30);
/// assert_eq!(cache.len(), 0); // the seqlen_offset of the next forward
/// ```
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// One layer's buffers (batch, kv_heads, capacity, head_dim) and the positions in use.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions reserved at the first step beyond what it needs (a prompt plus a typical reply
/// fit without growing).
const MIN_CAPACITY: usize = 256;

impl LayerCache {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// Buffers shaped like `like` with room for `capacity` positions, holding the first `len`
    /// positions of `from` (if any).
    fn with_capacity(like: &Tensor, capacity: usize, from: Option<&Self>) -> Result<Self> {
        let (b, h, _, d) = like.dims4()?;
        let alloc = || Tensor::zeros((b, h, capacity, d), like.dtype(), like.device());
        let (k, v) = (alloc()?, alloc()?);
        let len = match from {
            Some(old) => {
                k.slice_set(&old.k.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                v.slice_set(&old.v.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                old.len
            }
            None => 0,
        };
        Ok(Self { k, v, len })
    }

    /// The used part, as views of the buffers.
    fn used(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

impl Clone for KvCache {
    /// A deep copy: the buffers are written in place, so two caches must never share them.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| LayerCache {
                    k: l.k.copy().expect("copying a KV cache buffer"),
                    v: l.v.copy().expect("copying a KV cache buffer"),
                    len: l.len,
                })
            })
            .collect();
        Self { layers }
    }
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions (the offset of the next token).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
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

    /// Empties the cache (for a new prompt).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Keeps only the first `len` positions (for example to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
        Ok(())
    }

    /// Room for at least `capacity` positions in every layer, growing the buffers (and so
    /// moving them) where they are smaller. Returns whether any buffer moved: a CUDA graph
    /// that writes into the old ones must then be captured again. Layers that hold nothing
    /// yet (before the first step) are left for that step to allocate.
    pub fn reserve(&mut self, capacity: usize) -> Result<bool> {
        let mut moved = false;
        for slot in self.layers.iter_mut() {
            if let Some(c) = slot.as_ref() {
                if c.capacity() < capacity {
                    let grown = LayerCache::with_capacity(&c.k, capacity, Some(c))?;
                    *slot = Some(grown);
                    moved = true;
                }
            }
        }
        Ok(moved)
    }

    /// The positions every layer has room for (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.as_ref().map_or(0, LayerCache::capacity))
            .min()
            .unwrap_or(0)
    }

    /// `layer`'s whole buffers (batch, kv_heads, capacity, head_dim), used part or not, for a
    /// step that writes its keys and values at positions held on the device
    /// ([`KvCache::write_at`]) and masks the unused part itself.
    pub(crate) fn write_at(
        &mut self,
        layer: usize,
        index: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let c = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::shape(
                    "KvCache::write_at",
                    format!("layer {layer} holds no buffers yet; run a prefill step first"),
                )
            })?;
        // `index` (batch, kv_heads, 1, head_dim) repeats each row's position: scatter along
        // the position axis writes element (b, h, 0, j) to (b, h, position_b, j).
        c.k.scatter_set(index, &k.contiguous()?, 2)?;
        c.v.scatter_set(index, &v.contiguous()?, 2)?;
        Ok((c.k.clone(), c.v.clone()))
    }

    /// Counts `steps` more positions as used in every layer: what [`KvCache::write_at`]
    /// wrote, which the cache cannot see from the host.
    pub fn advance(&mut self, steps: usize) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            if c.len + steps > c.capacity() {
                return Err(Error::shape(
                    "KvCache::advance",
                    format!(
                        "{} positions used + {steps} exceeds the capacity of {}",
                        c.len,
                        c.capacity()
                    ),
                ));
            }
            c.len += steps;
        }
        Ok(())
    }

    /// The identities of every layer's buffers: a CUDA graph that writes into them is stale
    /// once these change (the cache grew, was reset, or was refilled).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn buffer_ids(&self) -> Vec<Option<(TensorId, TensorId)>> {
        self.layers
            .iter()
            .map(|l| l.as_ref().map(|c| (c.k.id(), c.v.id())))
            .collect()
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
        let step = k.dim(2)?;
        if let Some(c) = slot.as_ref() {
            let (cb, ch, _, cd) = c.k.dims4()?;
            let (b, h, _, d) = k.dims4()?;
            if (cb, ch, cd) != (b, h, d) && c.len == 0 {
                // Emptied by `truncate(0)`: the buffers of the old batch shape go.
                *slot = None;
            } else if (cb, ch, cd) != (b, h, d) {
                return Err(Error::shape(
                    "KvCache::append",
                    format!("the cache holds a batch of {cb} × {ch} heads × {cd} but this step has {b} × {h} × {d}; reset the cache for a new batch"),
                ));
            }
        }
        let needed = slot.as_ref().map_or(0, |c| c.len) + step;
        if slot.as_ref().is_none_or(|c| c.capacity() < needed) {
            let capacity = needed
                .max(MIN_CAPACITY)
                .max(2 * slot.as_ref().map_or(0, LayerCache::capacity));
            *slot = Some(LayerCache::with_capacity(&k, capacity, slot.as_ref())?);
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += step;
        c.used()
    }
}
