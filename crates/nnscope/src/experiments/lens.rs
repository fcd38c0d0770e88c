//! The logit lens: every layer's output read through the model's own head.
//!
//! Layer L's lens is the logits the model gives when the last layer's output is replaced by layer
//! L's output: the final norm, any projection, `lm_head` and anything the model applies after it
//! (final soft-capping) all run as the model runs them, so the last layer's lens equals the
//! logits. With `inverse`, also nnterp's inverse logits: `lm_head(-ln_final(h))`.
//!
//! ```no_run
//! use nnscope::{experiments::lens, Input, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let out = lens::logit_lens(&model, &Input::prompts(&["The quick brown fox"]), false)?;
//! println!("{:?}", out.logits.dims()); // [layers, batch, tokens, vocab]
//! for (layer, top) in out.top_k_last(&model, 3)?.iter().enumerate() {
//!     println!("{layer}: {top:?}");
//! }
//! # Ok::<(), nnscope::Error>(())
//! ```

use super::{logits_of, top_k};
use crate::{Input, Model, Result};
use candle_core::{DType, Tensor};

/// What the logit lens produced.
#[derive(Debug, Clone)]
pub struct LensOutput {
    /// [L, B, T, vocab] float32: the logits read off each layer's output.
    pub logits: Tensor,
    /// [L, B, T, vocab] float32: `lm_head(-ln_final(h))` per layer (nnterp's inverse logits),
    /// when asked for.
    pub inverse: Option<Tensor>,
    /// The token ids that ran [B, T].
    pub input_ids: Tensor,
    /// The attention mask [B, T], if any.
    pub attention_mask: Option<Tensor>,
}

impl LensOutput {
    /// Probabilities at the last position of each row, per layer: [B, L, vocab] (nnterp's
    /// `logit_lens` return value; prompts are left-padded so the last position is every row's last
    /// token). `inverse` reads the inverse logits instead.
    pub fn last_probs(&self, inverse: bool) -> Result<Tensor> {
        let t = if inverse {
            self.inverse.as_ref().ok_or_else(|| {
                crate::Error::Input("the lens was run without inverse logits".into())
            })?
        } else {
            &self.logits
        };
        let n = t.dim(2)?;
        let last = t.narrow(2, n - 1, 1)?.squeeze(2)?.contiguous()?; // [L, B, V]
        Ok(candle_nn::ops::softmax_last_dim(&last)?
            .transpose(0, 1)?
            .contiguous()?)
    }

    /// For each layer, the `k` most likely tokens (id, text, probability) at the last position of
    /// row 0.
    pub fn top_k_last(&self, model: &Model, k: usize) -> Result<Vec<Vec<(u32, String, f32)>>> {
        let probs = self.last_probs(false)?.get(0)?; // [L, V]
        let mut rows = Vec::new();
        for l in 0..probs.dim(0)? {
            rows.push(
                top_k(&probs.get(l)?, k)?
                    .into_iter()
                    .map(|(id, p)| (id, super::token_text(model, id), p))
                    .collect(),
            );
        }
        Ok(rows)
    }
}

/// The logit lens of `input` over every layer (see the module docs). One traced forward to read
/// the layers' outputs, then one forward per layer with the last layer's output replaced.
pub fn logit_lens(model: &Model, input: &Input, inverse: bool) -> Result<LensOutput> {
    let n = model.num_layers();
    let mut tr = model.trace(input.clone());
    for l in 0..n {
        tr = tr.save(&format!("layers_output.{l}"))?;
    }
    let base = tr.run()?;
    let (ids, mask) = (base.input_ids.clone(), base.attention_mask.clone());
    let same_input = Input::Ids {
        input_ids: ids.clone(),
        attention_mask: mask.clone(),
        position_ids: match input {
            Input::Ids { position_ids, .. } => position_ids.clone(),
            _ => None,
        },
    };
    let last = format!("layers_output.{}", n - 1);
    let mut rows = Vec::with_capacity(n);
    let mut inv_rows = Vec::with_capacity(n);
    for l in 0..n {
        let h = base.get(&format!("layers_output.{l}"))?.clone();
        if l + 1 < n {
            let out = model
                .trace(same_input.clone())
                .set(&last, h.clone())?
                .run()?;
            rows.push(logits_of(&out)?.to_dtype(DType::F32)?);
        } else {
            rows.push(logits_of(&base)?.to_dtype(DType::F32)?);
        }
        if inverse {
            let out = model
                .trace(same_input.clone())
                .set(&last, h)?
                .edit("ln_final.output", |y| y.neg())?
                .run()?;
            inv_rows.push(logits_of(&out)?.to_dtype(DType::F32)?);
        }
    }
    Ok(LensOutput {
        logits: Tensor::stack(&rows, 0)?,
        inverse: if inverse {
            Some(Tensor::stack(&inv_rows, 0)?)
        } else {
            None
        },
        input_ids: ids,
        attention_mask: mask,
    })
}
