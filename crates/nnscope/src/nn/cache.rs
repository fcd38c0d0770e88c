//! The key/value cache of a generation, as transformers' `DynamicCache`: each attention layer
//! appends its new keys and values and attends over everything cached so far.
//!
//! Unlike transformers' sliding-window cache layers, the key axis is kept whole on every layer
//! (the mask hides what is outside a window), so key index k is the same position at every step and
//! a decode step's attention probabilities are [B, H, 1, past + 1] on every layer.

use candle_core::{Result, Tensor};
use std::cell::{Cell, RefCell};

/// One layer's keys and values: buffers `[B, KV heads, capacity, D]` of which the first `len`
/// positions are filled.
#[derive(Debug, Clone)]
struct Layer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl Layer {
    fn capacity(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// The filled part, `[B, KV heads, len, D]` views of the buffers.
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

/// Keys and values of every layer seen so far. Interior mutability lets the cache be passed down
/// a forward as `Option<&KvCache>`, as transformers passes `past_key_values`; one cache belongs to
/// one generation on one thread.
///
/// Each layer keeps its keys and values in buffers with room for more positions and writes the
/// new ones in place, so a decode step copies only its own token's keys and values instead of the
/// whole past (`Tensor::cat` copied `O(past)` per layer per step). A layer hands out views of the
/// filled part; positions past a view's end are the only ones written later, so a view taken (or
/// saved) at one step keeps its values.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: RefCell<Vec<Option<Layer>>>,
    /// Positions to make room for when a layer's buffers are first allocated (0: just the first
    /// update's, plus growth room).
    reserve: Cell<usize>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache whose layers make room for `positions` positions when first filled (a
    /// generation knows its prompt length plus new tokens), so they never need to grow.
    pub fn with_capacity(positions: usize) -> Self {
        let cache = Self::default();
        cache.reserve.set(positions);
        cache
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
        let key = key.contiguous()?;
        let value = value.contiguous()?;
        // On a gradient path the in-place writes would cut the graph: concatenate as before.
        if key.track_op() || value.track_op() {
            let (k, v) = match &layers[layer_idx] {
                Some(l) => {
                    let (pk, pv) = l.filled()?;
                    (
                        Tensor::cat(&[&pk, &key], 2)?,
                        Tensor::cat(&[&pv, &value], 2)?,
                    )
                }
                None => (key, value),
            };
            let len = k.dim(2)?;
            layers[layer_idx] = Some(Layer {
                k: k.clone(),
                v: v.clone(),
                len,
            });
            return Ok((k, v));
        }
        let t = key.dim(2)?;
        let fits = |l: &Layer| -> Result<bool> {
            let (kd, vd) = (l.k.dims(), l.v.dims());
            // Same shape but for the position axis (2).
            let same = |buf: &[usize], new: &[usize]| {
                buf.len() == new.len()
                    && buf
                        .iter()
                        .zip(new)
                        .enumerate()
                        .all(|(i, (a, b))| i == 2 || a == b)
            };
            Ok(same(kd, key.dims())
                && same(vd, value.dims())
                && l.k.dtype() == key.dtype()
                && l.v.dtype() == value.dtype()
                && l.len + t <= l.capacity())
        };
        // Built from a borrow, so that an error leaves the layer as it was.
        let layer = match &layers[layer_idx] {
            Some(l) if fits(l)? => {
                l.k.slice_set(&key, 2, l.len)?;
                l.v.slice_set(&value, 2, l.len)?;
                Layer {
                    len: l.len + t,
                    ..l.clone()
                }
            }
            old => {
                // First update, or out of room: new buffers, the past copied once.
                let (past_k, past_v, past) = match old {
                    Some(l) => {
                        let (k, v) = l.filled()?;
                        (Some(k), Some(v), l.len)
                    }
                    None => (None, None, 0),
                };
                let need = past + t;
                let cap = need.max(self.reserve.get()).max(if old.is_some() {
                    // Grown: room for as many positions again, so growth costs O(1) per position.
                    2 * need
                } else {
                    need
                });
                let alloc = |x: &Tensor, past: Option<Tensor>| -> Result<Tensor> {
                    if cap == t && past.is_none() {
                        // Exactly this update: the (contiguous) tensor itself is the buffer; it is
                        // full, so it is never written.
                        return Ok(x.clone());
                    }
                    let mut dims = x.dims().to_vec();
                    if dims.len() < 3 {
                        candle_core::bail!("kv cache: keys and values need a position axis (2)");
                    }
                    dims[2] = cap;
                    let buf = Tensor::zeros(dims, x.dtype(), x.device())?;
                    if let Some(p) = past {
                        buf.slice_set(&p.contiguous()?, 2, 0)?;
                    }
                    buf.slice_set(x, 2, need - t)?;
                    Ok(buf)
                };
                let k = alloc(&key, past_k)?;
                let v = alloc(&value, past_v)?;
                Layer { k, v, len: need }
            }
        };
        let out = layer.filled()?;
        layers[layer_idx] = Some(layer);
        Ok(out)
    }

    /// Tokens cached so far (0 for an empty cache). Read it before a forward's layers update it.
    pub fn seq_len(&self) -> usize {
        self.layers
            .borrow()
            .iter()
            .flatten()
            .next()
            .map(|l| l.len)
            .unwrap_or(0)
    }

    /// The cached keys and values of a layer.
    pub fn layer(&self, layer_idx: usize) -> Option<(Tensor, Tensor)> {
        self.layers
            .borrow()
            .get(layer_idx)
            .cloned()
            .flatten()
            .and_then(|l| l.filled().ok())
    }

    /// Empties the cache (every layer).
    pub fn clear(&self) {
        self.layers.borrow_mut().clear();
    }

    /// Keeps only the rows `rows` of the batch in every layer (for dropping finished sequences).
    pub fn select_rows(&self, rows: &Tensor) -> Result<()> {
        for l in self.layers.borrow_mut().iter_mut().flatten() {
            l.k = l.k.index_select(rows, 0)?;
            l.v = l.v.index_select(rows, 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// In-place buffers give what concatenation gives, whether they were sized up front, grow, or
    /// start exactly full; views handed out earlier keep their values.
    #[test]
    fn buffers_equal_concatenation() -> Result<()> {
        let dev = Device::Cpu;
        for reserve in [None, Some(3), Some(9), Some(40)] {
            let cache = match reserve {
                Some(n) => KvCache::with_capacity(n),
                None => KvCache::new(),
            };
            let (mut all_k, mut all_v): (Vec<Tensor>, Vec<Tensor>) = (vec![], vec![]);
            let mut earlier: Vec<(Tensor, Tensor)> = vec![];
            for (step, t) in [5usize, 1, 1, 3, 1, 1, 1, 1, 1, 1].into_iter().enumerate() {
                let k = Tensor::randn(0f32, 1., (2, 3, t, 4), &dev)?;
                // A strided value (transposed view), as attention layers pass.
                let v = Tensor::randn(0f32, 1., (2, t, 3, 4), &dev)?.transpose(1, 2)?;
                all_k.push(k.clone());
                all_v.push(v.contiguous()?);
                let (ck, cv) = cache.update(&k, &v, 1)?;
                let (ek, ev) = (Tensor::cat(&all_k, 2)?, Tensor::cat(&all_v, 2)?);
                assert_eq!(ck.dims(), ek.dims(), "step {step}, reserve {reserve:?}");
                assert_eq!(max_diff(&ck, &ek)?, 0.0);
                assert_eq!(max_diff(&cv, &ev)?, 0.0);
                assert_eq!(cache.seq_len(), ek.dim(2)?);
                let (lk, _) = cache.layer(1).expect("layer 1 cached");
                assert_eq!(max_diff(&lk, &ek)?, 0.0);
                earlier.push((ek.clone(), ck.copy()?));
                earlier.push((ek, ck));
            }
            for (expected, view) in &earlier {
                assert_eq!(
                    max_diff(view, expected)?,
                    0.0,
                    "a view changed after later steps"
                );
            }
            assert!(cache.layer(0).is_none());
        }
        Ok(())
    }

    /// Dropping rows keeps the rest, and later updates append to them.
    #[test]
    fn select_rows_then_update() -> Result<()> {
        let dev = Device::Cpu;
        let cache = KvCache::with_capacity(8);
        let k0 = Tensor::randn(0f32, 1., (3, 2, 4, 4), &dev)?;
        cache.update(&k0, &k0, 0)?;
        let rows = Tensor::new(&[0u32, 2], &dev)?;
        cache.select_rows(&rows)?;
        let k1 = Tensor::randn(0f32, 1., (2, 2, 1, 4), &dev)?;
        let (k, v) = cache.update(&k1, &k1, 0)?;
        let expected = Tensor::cat(&[&k0.index_select(&rows, 0)?, &k1], 2)?;
        assert_eq!(max_diff(&k, &expected)?, 0.0);
        assert_eq!(max_diff(&v, &expected)?, 0.0);
        // Keys that cannot follow the cached ones are an error, as concatenating them was.
        let k2 = Tensor::randn(0f32, 1., (2, 2, 1, 4), &dev)?.to_dtype(DType::F64)?;
        assert!(cache.update(&k2, &k2, 0).is_err());
        let k3 = Tensor::randn(0f32, 1., (2, 3, 1, 4), &dev)?;
        assert!(cache.update(&k3, &k3, 0).is_err());
        Ok(())
    }
}
