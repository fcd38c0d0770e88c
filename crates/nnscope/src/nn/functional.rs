//! `torch.nn.functional`, the parts model code calls directly.
//!
//! These are instrumented functions (`#[hooked]`) so that calling them from model code opens a nested
//! `.source` scope, like nnsight's.

use candle_core::shape::Dim;
use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension, computed in float32 (as transformers' eager attention does with
/// `dtype=torch.float32`) and returned in the input's dtype.
pub fn softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    let dt = x.dtype();
    let last = dim.to_index(x.shape(), "softmax")? + 1 == x.rank();
    let xf = if dt == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let y = if last {
        candle_nn::ops::softmax_last_dim(&xf)?
    } else {
        candle_nn::ops::softmax(&xf, dim)?
    };
    if dt == DType::F32 {
        Ok(y)
    } else {
        y.to_dtype(dt)
    }
}

/// Dropout at inference: the identity. It is still a call, hence a hookpoint: in transformers' eager
/// attention the dropout's output is the attention probabilities that multiply V.
pub fn dropout(x: &Tensor, _p: f64) -> Result<Tensor> {
    Ok(x.clone())
}
