//! The key/value cache of a generation, as transformers' `DynamicCache`: each attention layer
//! appends its new keys and values and attends over everything cached so far.
//!
//! Unlike transformers' sliding-window cache layers, the key axis is kept whole on every layer
//! (the mask hides what is outside a window), so key index k is the same position at every step and
//! a decode step's attention probabilities are [B, H, 1, past + 1] on every layer.

use candle_core::{Result, Tensor};
use std::cell::RefCell;

/// Keys and values of every layer seen so far. Interior mutability lets the cache be passed down
/// a forward as `Option<&KvCache>`, as transformers passes `past_key_values`; one cache belongs to
/// one generation on one thread.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: RefCell<Vec<Option<(Tensor, Tensor)>>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key` and `value` ([B, KV heads, T, D]) to layer `layer_idx` and returns the layer's
    /// whole keys and values ([B, KV heads, past + T, D]).
    pub fn update(
        &self,
        key: &Tensor,
        value: &Tensor,
        layer_idx: usize,
    ) -> Result<(Tensor, Tensor)> {
        let mut layers = self.layers.borrow_mut();
        if layers.len() <= layer_idx {
            layers.resize(layer_idx + 1, None);
        }
        let (k, v) = match &layers[layer_idx] {
            Some((pk, pv)) => (
                Tensor::cat(&[pk, &key.contiguous()?], 2)?,
                Tensor::cat(&[pv, &value.contiguous()?], 2)?,
            ),
            None => (key.contiguous()?, value.contiguous()?),
        };
        layers[layer_idx] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Tokens cached so far (0 for an empty cache). Read it before a forward's layers update it.
    pub fn seq_len(&self) -> usize {
        self.layers
            .borrow()
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// The cached keys and values of a layer.
    pub fn layer(&self, layer_idx: usize) -> Option<(Tensor, Tensor)> {
        self.layers.borrow().get(layer_idx).cloned().flatten()
    }

    /// Empties the cache (every layer).
    pub fn clear(&self) {
        self.layers.borrow_mut().clear();
    }

    /// Keeps only the rows `rows` of the batch in every layer (for dropping finished sequences).
    pub fn select_rows(&self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.borrow_mut().iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// Past length of an optional cache.
pub fn past_len(cache: Option<&KvCache>) -> usize {
    cache.map(KvCache::seq_len).unwrap_or(0)
}

/// Position ids as transformers' `generate()` computes them: `cumsum(attention_mask) - 1`, 1 at
/// padding, for the last `t` columns of a [B, past + T] mask. Without a mask: past..past + t.
pub fn positions_from_mask(
    attention_mask: Option<&Tensor>,
    batch: usize,
    past: usize,
    t: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let rows: Vec<i64> = match attention_mask {
        Some(m) => {
            let m = m.to_dtype(candle_core::DType::I64)?.to_vec2::<i64>()?;
            let mut out = Vec::with_capacity(batch * t);
            for row in &m {
                let total = row.len();
                if total < t {
                    candle_core::bail!("attention mask has {total} columns, fewer than {t} tokens");
                }
                let mut c = 0i64;
                let mut pos = Vec::with_capacity(total);
                for &x in row {
                    c += x;
                    pos.push(if x == 0 { 1 } else { c - 1 });
                }
                out.extend_from_slice(&pos[total - t..]);
            }
            out
        }
        None => (0..batch)
            .flat_map(|_| (past as i64)..(past + t) as i64)
            .collect(),
    };
    Tensor::from_vec(rows, (batch, t), device)
}
