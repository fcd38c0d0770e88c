//! Attention masks as transformers builds them for eager attention: additive, 0 where a query may
//! attend a key and the dtype's minimum elsewhere.

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

/// Additive causal mask [B, 1, T, T]: key k is visible from query q when k <= q, the key is not
/// padding (`attention_mask[b, k] == 1`), and, with a sliding window w, k > q - w.
pub fn causal_mask(
    attention_mask: Option<&Tensor>,
    batch: usize,
    seq_len: usize,
    sliding_window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let pad: Option<Vec<Vec<i64>>> = match attention_mask {
        Some(m) => Some(m.to_dtype(DType::I64)?.to_vec2::<i64>()?),
        None => None,
    };
    let min = min_value(dtype) as f32;
    let mut data = vec![0f32; batch * seq_len * seq_len];
    for b in 0..batch {
        for q in 0..seq_len {
            for k in 0..seq_len {
                let mut ok = k <= q;
                if let Some(w) = sliding_window {
                    ok &= (k as i64) > q as i64 - w as i64;
                }
                if let Some(p) = &pad {
                    ok &= p[b][k] != 0;
                }
                if !ok {
                    data[(b * seq_len + q) * seq_len + k] = min;
                }
            }
        }
    }
    Tensor::from_vec(data, (batch, 1, seq_len, seq_len), device)?.to_dtype(dtype)
}

/// The masks of one forward by layer type, as transformers' `causal_mask_mapping`: the full causal
/// mask, and the sliding-window one when any layer slides. Built once per forward.
#[derive(Debug, Clone)]
pub struct CausalMasks {
    full: Tensor,
    sliding: Option<Tensor>,
}

impl CausalMasks {
    /// Masks for layers whose windows are `windows` (`None`: full attention).
    pub fn new(
        attention_mask: Option<&Tensor>,
        batch: usize,
        seq_len: usize,
        windows: &[Option<usize>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let full = causal_mask(attention_mask, batch, seq_len, None, dtype, device)?;
        // Every sliding layer of the supported models shares the config's one `sliding_window`.
        let sliding = match windows.iter().flatten().next() {
            Some(w) => Some(causal_mask(
                attention_mask,
                batch,
                seq_len,
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
