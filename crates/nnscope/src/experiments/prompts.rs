//! Target-token probabilities over prompts (nnterp's `Prompt` and `run_prompts`): categories of
//! target words, each word counted by its first token with and without a leading space; the
//! probability of a category is the sum over its distinct tokens, at the last position, from the
//! logits or from every layer's logit lens.
//!
//! ```no_run
//! use nnscope::{experiments::prompts::{self, Prompt}, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let p = Prompt::from_words(&model, "The quick brown fox jumps over the lazy",
//!     &[("animal", &["dog", "cat"]), ("thing", &["box"])])?;
//! let probs = prompts::run_prompts(&model, &[p], true)?; // per layer
//! for (category, t) in &probs { println!("{category}: {:?}", t.dims()); } // [prompts, layers]
//! # Ok::<(), nnscope::Error>(())
//! ```

use super::{encode_plain, lens};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Tensor};

/// A prompt and its target tokens by category (nnterp's `Prompt`).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt.
    pub prompt: String,
    /// (category, distinct token ids).
    pub targets: Vec<(String, Vec<u32>)>,
}

impl Prompt {
    /// Target tokens from words: for each word, the first token of `word` and of `" " + word`
    /// (without special tokens), distinct, in that order.
    pub fn from_words(model: &Model, prompt: &str, categories: &[(&str, &[&str])]) -> Result<Self> {
        let mut targets = Vec::new();
        for (cat, words) in categories {
            let mut ids: Vec<u32> = Vec::new();
            for w in *words {
                for text in [w.to_string(), format!(" {w}")] {
                    if let Some(&id) = encode_plain(model, &text)?.first() {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
            }
            if ids.is_empty() {
                return Err(Error::Input(format!(
                    "category `{cat}` has no target tokens"
                )));
            }
            targets.push((cat.to_string(), ids));
        }
        Ok(Prompt {
            prompt: prompt.into(),
            targets,
        })
    }
}

/// For each category (in the order of the first prompt's), the probability of its target tokens
/// per prompt: [P] from the logits, or [P, L] from every layer's logit lens when `per_layer`.
/// Every prompt must name the same categories.
pub fn run_prompts(
    model: &Model,
    prompts: &[Prompt],
    per_layer: bool,
) -> Result<Vec<(String, Tensor)>> {
    let first = prompts
        .first()
        .ok_or_else(|| Error::Input("run_prompts: no prompts".into()))?;
    let cats: Vec<String> = first.targets.iter().map(|(c, _)| c.clone()).collect();
    for p in prompts {
        let these: Vec<&String> = p.targets.iter().map(|(c, _)| c).collect();
        if these != cats.iter().collect::<Vec<_>>() {
            return Err(Error::Input(format!(
                "run_prompts: prompt {:?} has categories {these:?}, the first prompt {cats:?}",
                p.prompt
            )));
        }
    }
    // Probabilities at the last position: [P, L, V] or [P, 1, V].
    let mut probs = Vec::with_capacity(prompts.len());
    for p in prompts {
        let input = Input::prompts(&[p.prompt.as_str()]);
        let pr = if per_layer {
            lens::logit_lens(model, &input, false)?
                .last_probs(false)?
                .get(0)?
        } else {
            let out = model.trace(input).run()?;
            out.next_token_probs()?.get(0)?
        };
        probs.push(pr.to_dtype(DType::F32)?);
    }
    let mut result = Vec::with_capacity(cats.len());
    for (ci, cat) in cats.iter().enumerate() {
        let mut rows = Vec::with_capacity(prompts.len());
        for (p, pr) in prompts.iter().zip(&probs) {
            let ids = Tensor::new(p.targets[ci].1.as_slice(), pr.device())?;
            rows.push(pr.index_select(&ids, pr.rank() - 1)?.sum(pr.rank() - 1)?);
        }
        result.push((cat.clone(), Tensor::stack(&rows, 0)?));
    }
    Ok(result)
}
