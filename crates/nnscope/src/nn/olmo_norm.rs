//! OLMo's norms: `OlmoLayerNorm` (a layer norm without weight or bias) and `Olmo2RMSNorm` (an RMS
//! norm scaled in float32 before casting back, where LLaMA's casts first).

use super::Builder;
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// `OlmoLayerNorm`: `F.layer_norm` over the last dimension in float32, eps 1e-5, no parameters.
#[derive(Debug, Clone)]
pub struct OlmoLayerNorm {
    /// The normalized size.
    pub hidden_size: usize,
    scope: Scope,
}

impl OlmoLayerNorm {
    /// A parameter-free layer norm at the builder's path.
    pub fn new(hidden_size: usize, vb: Builder) -> Self {
        OlmoLayerNorm {
            hidden_size,
            scope: vb.scope::<Self>(),
        }
    }
}

#[hooked]
impl OlmoLayerNorm {
    /// (x - mean) / sqrt(var + 1e-5) in float32, cast back to x's dtype.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let orig_dtype = hidden_states.dtype();
        let x = hidden_states.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .to_dtype(orig_dtype)
    }
}

/// `Olmo2RMSNorm`: weight * (x * rsqrt(mean(x^2) + eps)) in float32, cast back to x's dtype.
#[derive(Debug, Clone)]
pub struct Olmo2RmsNorm {
    /// [dim].
    pub weight: Tensor,
    /// Epsilon.
    pub variance_epsilon: f64,
    scope: Scope,
}

impl Olmo2RmsNorm {
    /// Loads `weight` [dim].
    pub fn new(dim: usize, eps: f64, vb: Builder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(Olmo2RmsNorm {
            weight,
            variance_epsilon: eps,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Olmo2RmsNorm {
    /// Normalizes the last dimension.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let input_dtype = hidden_states.dtype();
        let hidden_states = hidden_states.to_dtype(DType::F32)?;
        let variance = hidden_states.sqr()?.mean_keepdim(D::Minus1)?;
        let hidden_states =
            hidden_states.broadcast_mul(&(variance + self.variance_epsilon)?.sqrt()?.recip()?)?;
        self.weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&hidden_states)?
            .to_dtype(input_dtype)
    }
}
