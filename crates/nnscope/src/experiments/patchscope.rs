//! Patchscopes (nnterp's `patchscope_lens` and `patchscope_generate`): a source prompt's hidden
//! state at layer L, position P, written into a target prompt at the same layer, at the target's
//! position to patch (its last token by default); then the target's next-token distribution, or a
//! generated continuation.
//!
//! ```no_run
//! use nnscope::{experiments::patchscope::{self, TargetPrompt}, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let target = TargetPrompt::default(); // "king king\n1135 1135\nhello hello\n?", last token
//! let probs = patchscope::patchscope_lens(&model, &["The quick brown fox"], &target, None, -1)?;
//! println!("{:?}", probs.dims()); // [sources, layers, vocab]
//! let texts = patchscope::patchscope_generate(&model, &["The quick brown fox"], &target, 1, -1, 8)?;
//! # Ok::<(), nnscope::Error>(())
//! ```

use super::{check_layer, logits_of};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Tensor};

/// A target prompt and the position its patched hidden state goes to (negative counts from the
/// end; nnterp's `TargetPrompt`).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetPrompt {
    /// The prompt.
    pub prompt: String,
    /// The position to patch (-1: the last token).
    pub index_to_patch: i64,
}

impl TargetPrompt {
    /// nnterp's `repeat_prompt`: `w rel w` for each word, joined by `sep`, then `placeholder`, with
    /// the placeholder (the last token) patched.
    pub fn repeat(words: &[&str], rel: &str, sep: &str, placeholder: &str) -> Self {
        let mut prompt = words
            .iter()
            .map(|w| format!("{w}{rel}{w}"))
            .collect::<Vec<_>>()
            .join(sep);
        prompt.push_str(sep);
        prompt.push_str(placeholder);
        TargetPrompt {
            prompt,
            index_to_patch: -1,
        }
    }
}

impl Default for TargetPrompt {
    /// nnterp's default target: `repeat_prompt(["king", "1135", "hello"], " ", "\n", "?")`.
    fn default() -> Self {
        TargetPrompt::repeat(&["king", "1135", "hello"], " ", "\n", "?")
    }
}

fn position(index: i64, len: usize, what: &str) -> Result<usize> {
    let p = if index < 0 { len as i64 + index } else { index };
    if p < 0 || p >= len as i64 {
        return Err(Error::Input(format!(
            "{what} position {index} is outside its {len} tokens"
        )));
    }
    Ok(p as usize)
}

/// Each source's hidden state at `layers_output.L`, position `source_position` of its own tokens
/// (negative from the end), for every layer in `layers`: [layers][S, hidden].
fn source_states(
    model: &Model,
    sources: &[&str],
    layers: &[usize],
    source_position: i64,
) -> Result<Vec<Tensor>> {
    let mut tr = model.trace(Input::prompts(sources));
    for l in layers {
        tr = tr.save(&format!("layers_output.{l}"))?;
    }
    let out = tr.run()?;
    let t = out.input_ids.dim(1)?;
    // Left padding: a prompt of n tokens occupies the last n positions.
    let lens: Vec<usize> = match &out.attention_mask {
        Some(m) => m
            .to_dtype(DType::F32)?
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|x| x as usize)
            .collect(),
        None => vec![t; sources.len()],
    };
    let mut idx = Vec::with_capacity(sources.len());
    for (i, n) in lens.iter().enumerate() {
        let p = position(source_position, *n, &format!("source {i}"))?;
        idx.push((t - n + p) as u32);
    }
    let mut states = Vec::with_capacity(layers.len());
    for l in layers {
        let h = out.get(&format!("layers_output.{l}"))?; // [S, T, D]
        let rows: Vec<Tensor> = idx
            .iter()
            .enumerate()
            .map(|(s, &p)| h.get(s)?.get(p as usize))
            .collect::<candle_core::Result<_>>()?;
        states.push(Tensor::stack(&rows, 0)?);
    }
    Ok(states)
}

/// `h` [S, T, D] with position `p` replaced by `src` [S, D].
fn write_position(h: &Tensor, src: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let t = h.dim(1)?;
    let mut parts = Vec::with_capacity(3);
    if p > 0 {
        parts.push(h.narrow(1, 0, p)?);
    }
    parts.push(src.unsqueeze(1)?.to_dtype(h.dtype())?);
    if p + 1 < t {
        parts.push(h.narrow(1, p + 1, t - p - 1)?);
    }
    Tensor::cat(&parts, 1)
}

/// nnterp's `patchscope_lens`: for each source prompt and each layer L in `layers` (every layer
/// when `None`), the source's `layers_output.L` at `source_position` written into `target` at
/// layer L; returns the target's next-token probabilities [S, layers, vocab] (float32).
pub fn patchscope_lens(
    model: &Model,
    sources: &[&str],
    target: &TargetPrompt,
    layers: Option<&[usize]>,
    source_position: i64,
) -> Result<Tensor> {
    let all: Vec<usize> = (0..model.num_layers()).collect();
    let layers = layers.unwrap_or(&all);
    for &l in layers {
        check_layer(model, l)?;
    }
    let states = source_states(model, sources, layers, source_position)?;
    let targets = vec![target.prompt.as_str(); sources.len()];
    let (ids, _) = model.tokenize(&targets)?;
    let p = position(target.index_to_patch, ids.dim(1)?, "target")?;
    let mut per_layer = Vec::with_capacity(layers.len());
    for (l, src) in layers.iter().zip(states) {
        let out = model
            .trace(Input::ids(ids.clone()))
            .edit(&format!("layers_output.{l}"), move |h| {
                write_position(h, &src, p)
            })?
            .run()?;
        logits_of(&out)?;
        per_layer.push(out.next_token_probs()?); // [S, V]
    }
    Ok(Tensor::stack(&per_layer, 1)?)
}

/// nnterp's `patchscope_generate`: the target's greedy continuation (`max_new_tokens` tokens) with
/// each source's `layers_output.L` at `source_position` written into it at layer `layer` (on the
/// forward over the prompt). One text per source.
pub fn patchscope_generate(
    model: &Model,
    sources: &[&str],
    target: &TargetPrompt,
    layer: usize,
    source_position: i64,
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    check_layer(model, layer)?;
    let src = source_states(model, sources, &[layer], source_position)?.remove(0);
    let targets = vec![target.prompt.as_str(); sources.len()];
    let (ids, _) = model.tokenize(&targets)?;
    let p = position(target.index_to_patch, ids.dim(1)?, "target")?;
    let out = model
        .generate(Input::ids(ids))
        .max_new_tokens(max_new_tokens)
        .ignore_eos(true)
        .edit(&format!("layers_output.{layer}"), move |h| {
            write_position(h, &src, p)
        })?
        .steps(0, 1)?
        .run()?;
    Ok(out.texts)
}
