//! The experiments researchers run, as library functions above the trace core and the standard
//! names (each is also an `nnscope` subcommand):
//!
//! - [`lens`]: the logit lens (every layer's output through the model's own head), with nnterp's
//!   inverse logits.
//! - [`patchscope`]: nnterp's `patchscope_lens` and `patchscope_generate`.
//! - [`patching`]: activation patching and attribution patching over the residual stream and over
//!   attention heads (TransformerLens' `patching.py`).
//! - [`gradients`]: gradients of a scalar computed from a trace's outputs with respect to any
//!   hookpoint, through candle's autograd.
//! - [`attribution`]: direct logit attribution (the final residual split into embeddings,
//!   attention heads and MLP outputs, projected on a logit difference with the final norm's scale
//!   frozen).
//! - [`prompts`]: target-token probabilities over prompts, per layer (nnterp's `Prompt` /
//!   `run_prompts`).
//!
//! All of them run the model through the public trace API ([`crate::Model::trace`], plans and
//! generation) and return tensors; pictures are drawn from those tensors by the CLI.

pub mod attribution;
pub mod gradients;
pub mod lens;
pub mod patching;
pub mod patchscope;
pub mod prompts;

use crate::{Error, Model, Result};
use candle_core::{DType, Tensor};

/// The token ids of `text` encoded without special tokens (as `tok(text, add_special_tokens=False)`).
pub fn encode_plain(model: &Model, text: &str) -> Result<Vec<u32>> {
    let tok = model.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
        path: model.source.join("tokenizer.json"),
        msg: "missing: this experiment needs a tokenizer.json".into(),
    })?;
    let enc = tok.encode(text, false).map_err(|e| Error::Tokenizer {
        path: model.source.join("tokenizer.json"),
        msg: format!("cannot encode {text:?}: {e}"),
    })?;
    Ok(enc.get_ids().to_vec())
}

/// The first token of `text` encoded without special tokens.
pub fn first_token(model: &Model, text: &str) -> Result<u32> {
    encode_plain(model, text)?
        .first()
        .copied()
        .ok_or_else(|| Error::Input(format!("{text:?} encodes to no tokens")))
}

/// Decodes one token id (its text, special tokens included), for labels.
pub fn token_text(model: &Model, id: u32) -> String {
    model
        .tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("<{id}>"))
}

/// The `k` largest entries of a 1-D float tensor, largest first: (index, value).
pub fn top_k(row: &Tensor, k: usize) -> Result<Vec<(u32, f32)>> {
    let v = row.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    // Descending, ties by lower index (a total order, NaN last).
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    Ok(idx.into_iter().take(k).map(|i| (i as u32, v[i])).collect())
}

/// Checks a layer index against the model.
pub(crate) fn check_layer(model: &Model, layer: usize) -> Result<()> {
    let n = model.num_layers();
    if layer >= n {
        return Err(Error::Input(format!(
            "layer {layer} is past the last layer: the model has {n} layers (0..{})",
            n.saturating_sub(1)
        )));
    }
    Ok(())
}

/// The logits of a finished trace (an error when it stopped early).
pub(crate) fn logits_of(out: &crate::TraceOutput) -> Result<&Tensor> {
    out.logits
        .as_ref()
        .ok_or_else(|| Error::Input("the forward stopped before the logits".into()))
}
