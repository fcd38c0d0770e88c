//! Pieces every attention shares.

use crate::trace::hooked;
use candle_core::{Result, Tensor};

/// [B, KV, T, D] -> [B, KV * n_rep, T, D], each key/value head repeated for its query heads
/// (transformers' `repeat_kv`).
#[hooked]
pub fn repeat_kv(hidden_states: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(hidden_states.clone());
    }
    let (batch, num_key_value_heads, slen, head_dim) = hidden_states.dims4()?;
    hidden_states
        .unsqueeze(2)?
        .expand((batch, num_key_value_heads, n_rep, slen, head_dim))?
        .reshape((batch, num_key_value_heads * n_rep, slen, head_dim))
}
