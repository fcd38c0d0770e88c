//! `GemmaTextScaledWordEmbedding` (Gemma, Gemma 2, Gemma 3): a token embedding whose rows are
//! multiplied by a scale (sqrt(hidden)) rounded to the weights' dtype.

use super::Builder;
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor};

/// `nn.Embedding` whose output is multiplied by `embed_scale` cast to the weights' dtype (so in
/// bfloat16, sqrt(3072) = 55.4256 becomes 55.5, as in transformers).
#[derive(Debug, Clone)]
pub struct ScaledWordEmbedding {
    /// [num_embeddings, dim].
    pub weight: Tensor,
    /// The scale, as the float32 buffer transformers keeps.
    pub embed_scale: f32,
    scope: Scope,
}

impl ScaledWordEmbedding {
    /// Loads `weight` [n, dim].
    pub fn new(n: usize, dim: usize, embed_scale: f64, vb: Builder) -> Result<Self> {
        let weight = vb.get((n, dim), "weight")?;
        Ok(ScaledWordEmbedding {
            weight,
            embed_scale: embed_scale as f32,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl ScaledWordEmbedding {
    /// Looks up the rows of `input_ids` ([B, T] integers) and scales them -> [B, T, dim].
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let rows = self.weight.index_select(&flat, 0)?;
        let rows = rows.reshape((b, t, self.weight.dim(1)?))?;
        let scale = Tensor::new(self.embed_scale, rows.device())?.to_dtype(self.weight.dtype())?;
        rows.broadcast_mul(&scale)
    }
}
