//! Activation patching and attribution patching (TransformerLens' `patching.py`, Neel Nanda's
//! attribution patching), over the residual stream and over attention heads.
//!
//! The metric is `logits[last, answer] - logits[last, wrong]` (the first token of each text,
//! encoded without special tokens). Activation patching runs the corrupt prompt with one value
//! taken from the clean run; attribution patching estimates the same from one backward pass:
//! `sum((clean - corrupt) * d metric / d value)` at the corrupt run.
//!
//! ```no_run
//! use nnscope::{experiments::patching, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let p = patching::patch(
//!     &model,
//!     &patching::PatchSetup::new("The quick brown fox jumps over the lazy",
//!         "The quick brown box jumps over the lazy", " dog", " cat"),
//!     true, // also per head
//! )?;
//! println!("{} -> {}", p.clean_metric, p.corrupt_metric);
//! println!("{:?} {:?}", p.resid.dims(), p.heads.as_ref().map(|h| h.dims().to_vec())); // [L, T], [L, H]
//! # Ok::<(), nnscope::Error>(())
//! ```

use super::{first_token, gradients, logits_of};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Device, Tensor, D};

/// Attribute names of an attention's output projection, in order of preference (as nnterp's
/// renaming lists): the module whose input is the heads' outputs concatenated, [B, T, H * D].
pub const OUTPUT_PROJECTION_ALIASES: &[&str] = &["o_proj", "c_proj", "dense", "out_proj", "wo"];

/// The hookpoint holding layer `layer`'s per-head outputs before the output projection mixes
/// them: the input of the attention's output projection ([B, T, heads * head_dim]). Found from the
/// standard `attentions.L` module and [`OUTPUT_PROJECTION_ALIASES`] (the nearest such module under
/// it). The one place per-head access is resolved for the experiments.
pub fn head_outputs_path(model: &Model, layer: usize) -> Result<String> {
    super::check_layer(model, layer)?;
    let attn = crate::standard::expand(model, &format!("attentions.{layer}"))?;
    let prefix = format!("{attn}.");
    // The shallowest match under the attention, then the earliest alias.
    let mut best: Option<((usize, usize), &str)> = None;
    for e in &model.modules().entries {
        let Some(rest) = e.path.strip_prefix(&prefix) else {
            continue;
        };
        let last = rest.rsplit('.').next().unwrap_or(rest);
        if let Some(rank) = OUTPUT_PROJECTION_ALIASES.iter().position(|a| *a == last) {
            let key = (rest.matches('.').count(), rank);
            if best.is_none_or(|(k, _)| key < k) {
                best = Some((key, e.path.as_str()));
            }
        }
    }
    best.map(|(_, p)| format!("{p}.input"))
        .ok_or_else(|| Error::Hookpoint {
            path: format!("attentions.{layer}"),
            msg: format!(
                "no output projection ({}) under `{attn}`: per-head values need it",
                OUTPUT_PROJECTION_ALIASES.join(", ")
            ),
            suggestions: vec![],
        })
}

/// The prompts and answers of a patching experiment.
#[derive(Debug, Clone)]
pub struct PatchSetup {
    /// The clean prompt (where values are taken from).
    pub clean: String,
    /// The corrupt prompt (the run that is patched); same number of tokens as `clean`.
    pub corrupt: String,
    /// The answer text (its first token counts).
    pub answer: String,
    /// The wrong answer text (its first token counts).
    pub wrong: String,
}

impl PatchSetup {
    /// A setup from four texts.
    pub fn new(clean: &str, corrupt: &str, answer: &str, wrong: &str) -> Self {
        PatchSetup {
            clean: clean.into(),
            corrupt: corrupt.into(),
            answer: answer.into(),
            wrong: wrong.into(),
        }
    }
}

/// What [`patch`] measured.
#[derive(Debug, Clone)]
pub struct PatchOutput {
    /// Clean token ids [1, T].
    pub clean_ids: Tensor,
    /// Corrupt token ids [1, T].
    pub corrupt_ids: Tensor,
    /// First token of the answer and of the wrong answer.
    pub answer_wrong: [u32; 2],
    /// The metric on the clean run.
    pub clean_metric: f32,
    /// The metric on the corrupt run.
    pub corrupt_metric: f32,
    /// [L, T] float32: the metric of the corrupt run with `layers_output.L` at position p taken
    /// from the clean run.
    pub resid: Tensor,
    /// [L, T] float32: sum over hidden of (clean - corrupt) x d metric / d `layers_output.L` at
    /// the corrupt run.
    pub resid_attribution: Tensor,
    /// [L, H] float32: the metric with one head's output (the input of the output projection, at
    /// every position) taken from the clean run; with `heads` only.
    pub heads: Option<Tensor>,
    /// [L, H] float32: attribution patching of each head's output.
    pub heads_attribution: Option<Tensor>,
    /// The corrupt prompt's tokens as text (axis labels).
    pub tokens: Vec<String>,
}

impl PatchOutput {
    /// The tensors under the names `nnscope patch --out` writes.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = self.resid.device();
        let mut v = vec![
            (
                "clean_ids".to_string(),
                self.clean_ids.to_dtype(DType::I64)?,
            ),
            (
                "corrupt_ids".to_string(),
                self.corrupt_ids.to_dtype(DType::I64)?,
            ),
            (
                "answer_wrong".to_string(),
                Tensor::new(
                    &[self.answer_wrong[0] as i64, self.answer_wrong[1] as i64],
                    dev,
                )?,
            ),
            (
                "clean_metric".to_string(),
                Tensor::new(&[self.clean_metric], dev)?,
            ),
            (
                "corrupt_metric".to_string(),
                Tensor::new(&[self.corrupt_metric], dev)?,
            ),
            ("resid".to_string(), self.resid.clone()),
            (
                "resid_attribution".to_string(),
                self.resid_attribution.clone(),
            ),
        ];
        if let Some(h) = &self.heads {
            v.push(("heads".to_string(), h.clone()));
        }
        if let Some(h) = &self.heads_attribution {
            v.push(("heads_attribution".to_string(), h.clone()));
        }
        Ok(v)
    }
}

/// `logits[:, last, a] - logits[:, last, b]` as float32 [B].
pub fn logit_diff(logits: &Tensor, a: u32, b: u32) -> candle_core::Result<Tensor> {
    let t = logits.dim(1)?;
    let last = logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?; // [B, V]
    let la = last.narrow(1, a as usize, 1)?;
    let lb = last.narrow(1, b as usize, 1)?;
    (la - lb)?.squeeze(1)
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
}

/// A [rows, T, 1] (or [rows, 1, W]) u8 selector: 1 where `on(row, i)`.
fn selector(
    rows: usize,
    len: usize,
    on: impl Fn(usize, usize) -> bool,
    dev: &Device,
) -> Result<Tensor> {
    let mut m = vec![0u8; rows * len];
    for r in 0..rows {
        for i in 0..len {
            if on(r, i) {
                m[r * len + i] = 1;
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows, len), dev)?)
}

/// Activation and attribution patching of the residual stream (and, with `heads`, of each
/// attention head). Prompts of different token lengths are refused.
pub fn patch(model: &Model, setup: &PatchSetup, heads: bool) -> Result<PatchOutput> {
    let (clean_ids, _) = model.tokenize(&[setup.clean.as_str()])?;
    let (corrupt_ids, _) = model.tokenize(&[setup.corrupt.as_str()])?;
    let (tc, tx) = (clean_ids.dim(1)?, corrupt_ids.dim(1)?);
    if tc != tx {
        return Err(Error::Input(format!(
            "the clean prompt has {tc} tokens and the corrupt prompt {tx}: patching needs prompts of \
             the same token length"
        )));
    }
    let t = tc;
    let a = first_token(model, &setup.answer)?;
    let b = first_token(model, &setup.wrong)?;
    let n = model.num_layers();
    let dev = model.device.clone();
    let z_paths: Vec<String> = if heads {
        (0..n)
            .map(|l| head_outputs_path(model, l))
            .collect::<Result<_>>()?
    } else {
        vec![]
    };
    let resid_names: Vec<String> = (0..n).map(|l| format!("layers_output.{l}")).collect();

    // Clean run: the metric and every value patched from it.
    let mut tr = model.trace(Input::ids(clean_ids.clone()));
    for p in resid_names.iter().chain(&z_paths) {
        tr = tr.save(p)?;
    }
    let clean = tr.run()?;
    let clean_metric = scalar(&logit_diff(logits_of(&clean)?, a, b)?)?;
    let corrupt_out = model.forward(&Input::ids(corrupt_ids.clone()))?;
    let corrupt_metric = scalar(&logit_diff(&corrupt_out, a, b)?)?;

    // Residual stream: for layer L, one batch of T copies of the corrupt prompt, row p patched at
    // position p.
    let batch_ids = corrupt_ids.broadcast_as((t, t))?.contiguous()?;
    let diag = selector(t, t, |r, i| r == i, &dev)?.reshape((t, t, 1))?;
    let mut resid_rows = Vec::with_capacity(n);
    for name in &resid_names {
        let c = clean.get(name)?.clone(); // [1, T, D]
        let m = diag.clone();
        let out = model
            .trace(Input::ids(batch_ids.clone()))
            .edit(name, move |h| {
                let c = c.broadcast_as(h.shape())?;
                m.broadcast_as(h.shape())?.where_cond(&c, h)
            })?
            .run()?;
        resid_rows.push(logit_diff(logits_of(&out)?, a, b)?);
    }
    let resid = Tensor::stack(&resid_rows, 0)?;

    // Heads: for layer L, one batch of H copies, row h with head h's slice of the output
    // projection's input taken from the clean run at every position.
    let (heads_t, head_dim) = if heads {
        let nh = model.num_heads()?;
        let mut rows = Vec::with_capacity(n);
        let mut hd = 0;
        for zp in &z_paths {
            let c = clean.get(zp)?.clone(); // [1, T, H * D]
            let w = c.dim(D::Minus1)?;
            if w % nh != 0 {
                return Err(Error::Input(format!(
                    "`{zp}` has width {w}, not a multiple of the {nh} heads"
                )));
            }
            hd = w / nh;
            let m = selector(nh, w, |r, i| i / hd == r, &dev)?.reshape((nh, 1, w))?;
            let out = model
                .trace(Input::ids(corrupt_ids.broadcast_as((nh, t))?.contiguous()?))
                .edit(zp, move |z| {
                    let c = c.broadcast_as(z.shape())?;
                    m.broadcast_as(z.shape())?.where_cond(&c, z)
                })?
                .run()?;
            rows.push(logit_diff(logits_of(&out)?, a, b)?);
        }
        (Some(Tensor::stack(&rows, 0)?), hd)
    } else {
        (None, 0)
    };

    // Attribution patching: one backward at the corrupt run.
    let wrt: Vec<&str> = resid_names
        .iter()
        .chain(&z_paths)
        .map(|s| s.as_str())
        .collect();
    let g = gradients::gradients(model, &Input::ids(corrupt_ids.clone()), &wrt, |out| {
        Ok(logit_diff(logits_of(out)?, a, b)?.squeeze(0)?)
    })?;
    let mut attr_rows = Vec::with_capacity(n);
    for name in &resid_names {
        let diff =
            (clean.get(name)?.to_dtype(DType::F32)? - g.value_at(name)?.to_dtype(DType::F32)?)?;
        let prod = (diff * g.get(name)?.to_dtype(DType::F32)?)?;
        attr_rows.push(prod.sum(D::Minus1)?.squeeze(0)?); // [T]
    }
    let resid_attribution = Tensor::stack(&attr_rows, 0)?;
    let heads_attribution = if heads {
        let nh = model.num_heads()?;
        let mut rows = Vec::with_capacity(n);
        for zp in &z_paths {
            let diff =
                (clean.get(zp)?.to_dtype(DType::F32)? - g.value_at(zp)?.to_dtype(DType::F32)?)?;
            let prod = (diff * g.get(zp)?.to_dtype(DType::F32)?)?; // [1, T, H * D]
            let per = prod.reshape((t, nh, head_dim))?.sum(2)?.sum(0)?; // [H]
            rows.push(per);
        }
        Some(Tensor::stack(&rows, 0)?)
    } else {
        None
    };
    let ids: Vec<u32> = corrupt_ids.flatten_all()?.to_vec1::<u32>()?;
    Ok(PatchOutput {
        clean_ids: clean_ids.to_dtype(DType::I64)?,
        corrupt_ids: corrupt_ids.to_dtype(DType::I64)?,
        answer_wrong: [a, b],
        clean_metric,
        corrupt_metric,
        resid: resid.to_dtype(DType::F32)?,
        resid_attribution,
        heads: heads_t.map(|h| h.to_dtype(DType::F32)).transpose()?,
        heads_attribution,
        tokens: ids.iter().map(|&i| super::token_text(model, i)).collect(),
    })
}

/// The metric of the corrupt run with every head of layer `layer` patched from the clean run at
/// once, with the output projection's output patched instead, and with `attentions_output.L`
/// patched instead: (heads, projection output, attention output). The first two are equal when the
/// per-head hookpoint is right (the output projection sees exactly what the heads produced); the
/// third too wherever the attention's output is its output projection's (not on Bloom, whose
/// attention module adds the residual itself).
pub fn all_heads_vs_attention_output(
    model: &Model,
    setup: &PatchSetup,
    layer: usize,
) -> Result<(f32, f32, f32)> {
    let (clean_ids, _) = model.tokenize(&[setup.clean.as_str()])?;
    let (corrupt_ids, _) = model.tokenize(&[setup.corrupt.as_str()])?;
    let a = first_token(model, &setup.answer)?;
    let b = first_token(model, &setup.wrong)?;
    let zp = head_outputs_path(model, layer)?;
    let po = zp.trim_end_matches(".input").to_string() + ".output";
    let ao = format!("attentions_output.{layer}");
    let clean = model
        .trace(Input::ids(clean_ids))
        .save(&zp)?
        .save(&po)?
        .save(&ao)?
        .run()?;
    let mut metrics = [0f32; 3];
    for (i, p) in [&zp, &po, &ao].into_iter().enumerate() {
        let out = model
            .trace(Input::ids(corrupt_ids.clone()))
            .set(p, clean.get(p)?.clone())?
            .run()?;
        metrics[i] = scalar(&logit_diff(logits_of(&out)?, a, b)?)?;
    }
    Ok((metrics[0], metrics[1], metrics[2]))
}
