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
    // bfloat16 scores on the CPU: one pass that widens, computes in float32 and rounds back (the
    // same values as the conversions below, without two extra passes over the scores).
    if dt == DType::BF16 && last && !x.track_op() {
        if let Some(y) = super::cpu::softmax_last_dim_f32(x)? {
            return Ok(y);
        }
    }
    let xf = if dt == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    // A value on a gradient path (candle autograd, see `experiments::gradients`) takes candle's
    // differentiable softmax: the fast kernels below have no backward and would cut the graph.
    let y = if last && !xf.track_op() {
        // Performance: a float32 CPU kernel without libm's slow underflow path (see nn/cpu.rs).
        match super::cpu::softmax_last_dim_f32(&xf)? {
            Some(y) => y,
            None => candle_nn::ops::softmax_last_dim(&xf)?,
        }
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

/// `F.linear`: x W^T (+ b), with W stored [out, in] as torch does.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = super::layers::matmul_t(x, weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `torch.sigmoid` / `F.sigmoid`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// `torch.topk(x, k, dim=-1)`: the `k` largest values of each row, largest first, and their indices
/// (u32). Routers call it, so it is one hookpoint whose value is the (values, indices) pair.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)?;
    if k > n {
        candle_core::bail!("topk: k ({k}) is larger than the dimension ({n})");
    }
    let indices = x
        .contiguous()?
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, k)?
        .contiguous()?;
    let values = x.contiguous()?.gather(&indices, D::Minus1)?;
    Ok((values, indices))
}
