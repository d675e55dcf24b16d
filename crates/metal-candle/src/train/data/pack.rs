//! Examples → fixed-length rows (packed or padded) → batches of tensors.

use candle_core::{Device, Tensor};

use super::Example;
use crate::train::rng::{derive_seed, TrainRng};
use crate::{Error, Result};

/// One row of a batch: one or more whole examples laid end to end.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Whether each token is a training target.
    pub trainable: Vec<bool>,
    /// Position of each token inside its own example (restarts at 0 for each packed example).
    pub positions: Vec<u32>,
    /// Which example of the row each token belongs to, from 1 (0 marks padding).
    pub segments: Vec<u32>,
}

impl Row {
    fn empty() -> Self {
        Self {
            tokens: Vec::new(),
            trainable: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
        }
    }

    fn push(&mut self, ex: &Example) {
        let seg = self.segments.last().copied().unwrap_or(0) + 1;
        self.tokens.extend_from_slice(&ex.tokens);
        self.trainable.extend_from_slice(&ex.trainable);
        self.positions.extend(0..ex.tokens.len() as u32);
        self.segments
            .extend(std::iter::repeat_n(seg, ex.tokens.len()));
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the row holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Next-token targets: position `i` predicts token `i + 1` when both are in the same
    /// example and token `i + 1` is trainable. Returns (target id, weight) per position.
    pub fn targets(&self) -> (Vec<u32>, Vec<f32>) {
        let n = self.len();
        let mut ids = vec![0u32; n];
        let mut mask = vec![0f32; n];
        for i in 0..n.saturating_sub(1) {
            if self.segments[i] != 0
                && self.segments[i] == self.segments[i + 1]
                && self.trainable[i + 1]
            {
                ids[i] = self.tokens[i + 1];
                mask[i] = 1.0;
            }
        }
        (ids, mask)
    }
}

/// Lays examples into rows of at most `seq_len` tokens. With `pack`, consecutive examples
/// share a row while they fit (each keeps its own positions and segment id, so attention and
/// targets never cross between them); without, each example gets its own row. Examples must
/// already be at most `seq_len` long.
pub fn pack_rows(examples: &[Example], seq_len: usize, pack: bool) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut current = Row::empty();
    for (i, ex) in examples.iter().enumerate() {
        if ex.tokens.len() > seq_len {
            return Err(Error::Msg(format!(
                "example {i} has {} tokens, more than seq_len {seq_len}",
                ex.tokens.len()
            )));
        }
        if ex.tokens.is_empty() {
            continue;
        }
        if !current.is_empty() && (!pack || current.len() + ex.tokens.len() > seq_len) {
            rows.push(std::mem::replace(&mut current, Row::empty()));
        }
        current.push(ex);
    }
    if !current.is_empty() {
        rows.push(current);
    }
    Ok(rows)
}

/// One batch as tensors, rows padded (segment 0) to the longest row.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (batch, seq) u32 token ids.
    pub input_ids: Tensor,
    /// (batch, seq) u32 next-token targets (0 where the weight is 0).
    pub targets: Tensor,
    /// (batch, seq) f32: 1 where the target counts in the loss.
    pub loss_mask: Tensor,
    /// (batch, seq) u32 position of each token in its example.
    pub position_ids: Tensor,
    /// (batch, seq) u32 example index within the row, from 1; 0 is padding.
    pub segment_ids: Tensor,
    /// The segment ids on the host, for building attention masks.
    pub segments_host: Vec<Vec<u32>>,
    /// Tokens that are not padding.
    pub n_tokens: usize,
    /// Targets that count in the loss.
    pub n_targets: usize,
}

impl Batch {
    /// Builds the tensors of `rows` on `device`.
    pub fn from_rows(rows: &[&Row], device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(Error::Msg("cannot build a batch from no tokens".into()));
        }
        let (mut ids, mut tg, mut mask, mut pos, mut seg) = (
            vec![0u32; b * t],
            vec![0u32; b * t],
            vec![0f32; b * t],
            vec![0u32; b * t],
            vec![0u32; b * t],
        );
        let mut segments_host = Vec::with_capacity(b);
        let mut n_tokens = 0;
        for (r, row) in rows.iter().enumerate() {
            let (targets, weights) = row.targets();
            let o = r * t;
            let n = row.len();
            ids[o..o + n].copy_from_slice(&row.tokens);
            tg[o..o + n].copy_from_slice(&targets);
            mask[o..o + n].copy_from_slice(&weights);
            pos[o..o + n].copy_from_slice(&row.positions);
            seg[o..o + n].copy_from_slice(&row.segments);
            let mut s = row.segments.clone();
            s.resize(t, 0);
            segments_host.push(s);
            n_tokens += n;
        }
        let n_targets = mask.iter().filter(|&&m| m > 0.0).count();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            targets: Tensor::from_vec(tg, (b, t), device)?,
            loss_mask: Tensor::from_vec(mask, (b, t), device)?,
            position_ids: Tensor::from_vec(pos, (b, t), device)?,
            segment_ids: Tensor::from_vec(seg, (b, t), device)?,
            segments_host,
            n_tokens,
            n_targets,
        })
    }

    /// (batch, seq).
    pub fn dims(&self) -> (usize, usize) {
        (
            self.segments_host.len(),
            self.segments_host.first().map_or(0, |s| s.len()),
        )
    }

    /// Whether every row holds one example and no padding: plain causal attention is then exact.
    pub fn is_plain_causal(&self) -> bool {
        self.segments_host.iter().all(|s| s.iter().all(|&x| x == 1))
    }

    /// Additive attention bias (batch, 1, seq, seq) in `dtype`: 0 where query `i` may see key
    /// `j` (same example, `j ≤ i`), −∞ elsewhere. Padding queries see themselves only, so no
    /// row of the softmax is empty.
    pub fn attention_bias(&self, dtype: candle_core::DType, device: &Device) -> Result<Tensor> {
        let (b, t) = self.dims();
        let mut bias = vec![f32::NEG_INFINITY; b * t * t];
        for (r, seg) in self.segments_host.iter().enumerate() {
            for i in 0..t {
                let row = &mut bias[(r * t + i) * t..(r * t + i + 1) * t];
                if seg[i] == 0 {
                    row[i] = 0.0;
                    continue;
                }
                for j in 0..=i {
                    if seg[j] == seg[i] {
                        row[j] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?.to_dtype(dtype)?)
    }
}

/// Where a [`DataLoader`] is in its stream: what a checkpoint stores to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Completed passes over the rows.
    pub epoch: usize,
    /// Rows of the current epoch already served.
    pub cursor: usize,
}

/// Serves batches of rows in a seeded order, reshuffled every epoch. The order of epoch `e`
/// depends only on the seed and `e`, so a position `(epoch, cursor)` resumes the stream exactly.
#[derive(Debug, Clone)]
pub struct DataLoader {
    rows: Vec<Row>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    order: Vec<usize>,
    position: DataPosition,
}

impl DataLoader {
    /// A loader over `rows`; `shuffle = false` serves them in order (validation).
    pub fn new(rows: Vec<Row>, batch_size: usize, seed: u64, shuffle: bool) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::Msg(
                "the data set has no rows: is the data file empty?".into(),
            ));
        }
        if batch_size == 0 {
            return Err(Error::InvalidConfig {
                name: "batch_size",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        let mut loader = Self {
            rows,
            batch_size,
            seed,
            shuffle,
            order: Vec::new(),
            position: DataPosition {
                epoch: 0,
                cursor: 0,
            },
        };
        loader.order = loader.order_of(0);
        Ok(loader)
    }

    fn order_of(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        if self.shuffle {
            TrainRng::new(derive_seed(self.seed, &[0xDA7A, epoch as u64])).shuffle(&mut order);
        }
        order
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The rows.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Batches per epoch (the last one completed from the next epoch).
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// The current position.
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Jumps to a position saved earlier.
    pub fn seek(&mut self, position: DataPosition) -> Result<()> {
        if position.cursor > self.rows.len() {
            return Err(Error::Msg(format!(
                "checkpoint data position {position:?} is past the {} rows of this data set: was it made with other data or seq_len?",
                self.rows.len()
            )));
        }
        self.position = position;
        self.order = self.order_of(position.epoch);
        Ok(())
    }

    /// The next `batch_size` rows, continuing into the next epoch when this one runs out.
    pub fn next_rows(&mut self) -> Vec<&Row> {
        let mut picked = Vec::with_capacity(self.batch_size);
        while picked.len() < self.batch_size {
            if self.position.cursor == self.rows.len() {
                self.position = DataPosition {
                    epoch: self.position.epoch + 1,
                    cursor: 0,
                };
                self.order = self.order_of(self.position.epoch);
            }
            picked.push(self.order[self.position.cursor]);
            self.position.cursor += 1;
        }
        picked.into_iter().map(|i| &self.rows[i]).collect()
    }

    /// The next batch as tensors on `device`.
    pub fn next_batch(&mut self, device: &Device) -> Result<Batch> {
        let rows = self.next_rows();
        Batch::from_rows(&rows, device)
    }

    /// Every row once, in order, in batches (for validation loss).
    pub fn all_batches(&self, device: &Device) -> Result<Vec<Batch>> {
        self.rows
            .chunks(self.batch_size)
            .map(|c| Batch::from_rows(&c.iter().collect::<Vec<_>>(), device))
            .collect()
    }
}
