//! Attention masks as transformers builds them for eager attention: additive, 0 where a query may
//! attend a key and the dtype's minimum elsewhere.
//!
//! Queries are the last `q_len` of `past + q_len` positions (a cached step), keys are all of them.

use candle_core::{DType, Device, Result, Tensor};

/// The most negative finite value of a float dtype (`torch.finfo(dtype).min`).
pub fn min_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The padding mask as rows of 0/1, checked against [batch, keys].
fn pad_rows(
    attention_mask: Option<&Tensor>,
    batch: usize,
    keys: usize,
) -> Result<Option<Vec<Vec<i64>>>> {
    let Some(m) = attention_mask else {
        return Ok(None);
    };
    let (b, k) = m.dims2()?;
    if b != batch || k != keys {
        candle_core::bail!(
            "attention mask has shape [{b}, {k}], expected [{batch}, {keys}] (batch, past + new tokens)"
        );
    }
    Ok(Some(m.to_dtype(DType::I64)?.to_vec2::<i64>()?))
}

/// Additive causal mask [B, 1, Q, past + Q]: key k is visible from query q (absolute position
/// past + q) when k <= past + q, the key is not padding (`attention_mask[b, k] == 1`), and, with a
/// sliding window w, k > past + q - w.
pub fn causal_mask(
    attention_mask: Option<&Tensor>,
    batch: usize,
    q_len: usize,
    past: usize,
    sliding_window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keys = past + q_len;
    let pad = pad_rows(attention_mask, batch, keys)?;
    let min = min_value(dtype) as f32;
    let mut data = vec![0f32; batch * q_len * keys];
    for b in 0..batch {
        for q in 0..q_len {
            let qa = (past + q) as i64;
            for k in 0..keys {
                let mut ok = k as i64 <= qa;
                if let Some(w) = sliding_window {
                    ok &= (k as i64) > qa - w as i64;
                }
                if let Some(p) = &pad {
                    ok &= p[b][k] != 0;
                }
                if !ok {
                    data[(b * q_len + q) * keys + k] = min;
                }
            }
        }
    }
    Tensor::from_vec(data, (batch, 1, q_len, keys), device)?.to_dtype(dtype)
}

/// The masks of one forward by layer type, as transformers' `causal_mask_mapping`: the full causal
/// mask, and the sliding-window one when any layer slides. Built once per forward.
#[derive(Debug, Clone)]
pub struct CausalMasks {
    full: Tensor,
    sliding: Option<Tensor>,
}

impl CausalMasks {
    /// Masks for layers whose windows are `windows` (`None`: full attention), for `q_len` new
    /// tokens after `past` cached ones.
    pub fn new(
        attention_mask: Option<&Tensor>,
        batch: usize,
        q_len: usize,
        past: usize,
        windows: &[Option<usize>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let full = causal_mask(attention_mask, batch, q_len, past, None, dtype, device)?;
        // Every sliding layer of the supported models shares the config's one `sliding_window`.
        let sliding = match windows.iter().flatten().next() {
            Some(w) => Some(causal_mask(
                attention_mask,
                batch,
                q_len,
                past,
                Some(*w),
                dtype,
                device,
            )?),
            None => None,
        };
        Ok(CausalMasks { full, sliding })
    }

    /// The mask of a layer with window `window`.
    pub fn for_layer(&self, window: Option<usize>) -> &Tensor {
        match (window, &self.sliding) {
            (Some(_), Some(m)) => m,
            _ => &self.full,
        }
    }
}
