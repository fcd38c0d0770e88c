//! Gemma's RMS norm (`GemmaRMSNorm`, `Gemma2RMSNorm`, `Gemma3RMSNorm`): scaled by `1 + weight`, with
//! the scaling done in float32 before casting back (LLaMA casts first, then scales).

use super::Builder;
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// `GemmaRMSNorm`: x * rsqrt(mean(x^2) + eps) * (1 + weight), in float32, cast back to x's dtype.
#[derive(Debug, Clone)]
pub struct GemmaRmsNorm {
    /// [dim], stored zero-centred (the scale is `1 + weight`).
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f64,
    scope: Scope,
}

impl GemmaRmsNorm {
    /// Loads `weight` [dim].
    pub fn new(dim: usize, eps: f64, vb: Builder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(GemmaRmsNorm {
            weight,
            eps,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GemmaRmsNorm {
    /// x * rsqrt(mean(x^2, -1) + eps).
    fn _norm(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)
    }

    /// Normalizes the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let output = self._norm(&x.to_dtype(DType::F32)?)?;
        let output = output.broadcast_mul(&(self.weight.to_dtype(DType::F32)? + 1.0)?)?;
        output.to_dtype(x.dtype())
    }
}
