//! Gradients of a scalar computed from a trace's outputs with respect to hookpoints, through
//! candle's autograd (nnsight's `with loss.backward(): x.grad`).
//!
//! Each requested hookpoint's value `h` is replaced by `h + z`, with `z` a zero variable of the
//! same shape: the forward is unchanged (adding zero is exact) and the gradient with respect to
//! `z` is the gradient with respect to `h`, counting every path from it, also through other
//! requested hookpoints. Kernels without a backward (nnscope's fast softmax, activations and
//! system matrix multiplies) step aside for candle's differentiable ops when their input is on a
//! gradient path. An operation candle cannot differentiate is an error, never a silent zero, and
//! so is a hookpoint the scalar does not depend on at all.
//!
//! ```no_run
//! use nnscope::{experiments::gradients, Input, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let g = gradients::gradients(
//!     &model,
//!     &Input::prompts(&["The quick brown fox"]),
//!     &["layers_output.0", "attention_probabilities.1"],
//!     |out| {
//!         let Some(logits) = out.logits.as_ref() else {   // [B, T, vocab]
//!             return Err(nnscope::Error::Input("this model returned no logits".into()));
//!         };
//!         let last = logits.dim(1)? - 1;
//!         Ok(logits.get(0)?.get(last)?.get(42)?)          // one logit, a scalar
//!     },
//! )?;
//! println!("{:?}", g.get("layers_output.0")?.dims());     // as the value: [1, T, hidden]
//! # Ok::<(), nnscope::Error>(())
//! ```

use crate::{Error, Input, Model, Result, TraceOutput};
use candle_core::{Tensor, Var};
use std::sync::{Arc, Mutex};

/// Where an edit leaves each firing's value and its zero variable.
type Slot = Arc<Mutex<Vec<(Tensor, Var)>>>;

/// The result of [`gradients`].
#[derive(Debug)]
pub struct Gradients {
    /// The trace's output (logits and saved values carry the autograd graph).
    pub output: TraceOutput,
    /// The scalar's value.
    pub value: f64,
    /// (hookpoint as given, value at it, gradient of the scalar with respect to it).
    pub grads: Vec<(String, Tensor, Tensor)>,
}

impl Gradients {
    /// The gradient with respect to `name` (as given), same shape as its value.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.grads
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, g)| g)
            .ok_or_else(|| Error::Hookpoint {
                path: name.into(),
                msg: "no gradient was requested for it".into(),
                suggestions: crate::nearest(name, self.grads.iter().map(|(n, _, _)| n.as_str()), 3),
            })
    }

    /// The value at `name` (as given) during the forward, detached from the graph.
    pub fn value_at(&self, name: &str) -> Result<&Tensor> {
        self.grads
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v)
            .ok_or_else(|| Error::Hookpoint {
                path: name.into(),
                msg: "no gradient was requested for it".into(),
                suggestions: vec![],
            })
    }
}

/// One forward of `input` and the gradient of `scalar(output)` with respect to each hookpoint in
/// `wrt` (standard names or paths; a hookpoint that fires more than once gets the gradient of its
/// first firing). `scalar` must return a tensor with one element, computed from the output's
/// logits or saved values with candle ops.
pub fn gradients(
    model: &Model,
    input: &Input,
    wrt: &[&str],
    scalar: impl FnOnce(&TraceOutput) -> Result<Tensor>,
) -> Result<Gradients> {
    gradients_with(model, input, wrt, Ok, scalar)
}

/// [`gradients`] of the answer's logit at the last position of row 0
/// (`logits[0, last, first token of answer]`), minus the wrong answer's when `wrong` is given
/// (`nnscope grad --answer --wrong`).
pub fn answer_gradients(
    model: &Model,
    input: &Input,
    wrt: &[&str],
    answer: &str,
    wrong: Option<&str>,
) -> Result<Gradients> {
    let a = super::first_token(model, answer)?;
    let w = wrong.map(|w| super::first_token(model, w)).transpose()?;
    gradients(model, input, wrt, |out| {
        let logits = out
            .logits
            .as_ref()
            .ok_or_else(|| Error::Input("the trace stopped before the logits".into()))?;
        Ok(match w {
            Some(w) => super::patching::logit_diff(logits, a, w)?.get(0)?,
            None => {
                let t = logits.dim(1)?;
                logits.get(0)?.get(t - 1)?.get(a as usize)?
            }
        })
    })
}

/// [`gradients`], with `extra` adding requests (saves, edits, ...) to the trace before it runs.
pub fn gradients_with<'m>(
    model: &'m Model,
    input: &Input,
    wrt: &[&str],
    extra: impl FnOnce(crate::Trace<'m>) -> Result<crate::Trace<'m>>,
    scalar: impl FnOnce(&TraceOutput) -> Result<Tensor>,
) -> Result<Gradients> {
    if wrt.is_empty() {
        return Err(Error::Input(
            "gradients: name at least one hookpoint to differentiate with respect to".into(),
        ));
    }
    let mut tr = model.trace(input.clone());
    let mut slots: Vec<Slot> = Vec::new();
    for name in wrt {
        let slot: Slot = Arc::new(Mutex::new(Vec::new()));
        let s = slot.clone();
        tr = tr.edit(name, move |h| {
            let z = Var::zeros(h.shape(), h.dtype(), h.device())?;
            let out = (h + z.as_tensor())?;
            if let Ok(mut v) = s.lock() {
                v.push((h.detach(), z));
            }
            Ok(out)
        })?;
        slots.push(slot);
    }
    let tr = extra(tr)?;
    let output = tr.run()?;
    let s = scalar(&output)?;
    if s.elem_count() != 1 {
        return Err(Error::Input(format!(
            "gradients: the scalar has shape {:?}; it must have one element",
            s.dims()
        )));
    }
    let value = s
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    let store = s.backward().map_err(|e| {
        Error::Input(format!(
            "gradients: backward failed (an operation on the path has no backward in candle): {}",
            crate::error::candle_message(&e)
        ))
    })?;
    let mut grads = Vec::with_capacity(wrt.len());
    for (name, slot) in wrt.iter().zip(&slots) {
        let first = slot
            .lock()
            .ok()
            .and_then(|v| v.first().map(|(h, z)| (h.clone(), z.clone())));
        let Some((h, z)) = first else {
            return Err(Error::Hookpoint {
                path: name.to_string(),
                msg: "did not run during the forward, so it has no gradient".into(),
                suggestions: vec![],
            });
        };
        let g = store.get(z.as_tensor()).ok_or_else(|| Error::Hookpoint {
            path: name.to_string(),
            msg: "the scalar does not depend on this value (no differentiable path from it to \
                  the scalar); refusing to report a zero gradient"
                .into(),
            suggestions: vec![],
        })?;
        grads.push((name.to_string(), h, g.detach()));
    }
    Ok(Gradients {
        output,
        value,
        grads,
    })
}
