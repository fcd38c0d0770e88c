//! Traces: run a model once while saving, replacing or editing values at hookpoints.
//!
//! A hookpoint path reads like nnsight:
//! `model.layers.0.self_attn.source.attention_interface_0.source.nn_functional_dropout_0.output`,
//! or uses a standard name (`attention_probabilities.0`, `layers_output.3`, `logits`); see
//! [`crate::standard`].

mod listing;
pub mod path;
pub(crate) mod requests;
pub mod rt;
pub mod structure;
mod value;

pub use listing::listing;
pub use nnscope_macros::hooked;
pub use path::{HookPath, Terminal};
pub use requests::{EditFn, Kind};
pub use rt::{FnInfo, HookedForward, Scope};
pub use value::Value;

use crate::{Error, Input, Model, Result};
use candle_core::Tensor;
use requests::{Action, Ctx, Interrupt, Req};
use rt::Activation;

/// A trace being set up: requests are validated as they are added, then [`Trace::run`] runs the
/// model once.
pub struct Trace<'m> {
    model: &'m Model,
    input: Input,
    reqs: Vec<(HookPath, Req<'m>)>,
    check_finite: bool,
}

/// What a trace produced.
#[derive(Debug)]
pub struct TraceOutput {
    /// Logits [B, T, vocab]; `None` when the trace stopped early.
    pub logits: Option<Tensor>,
    /// The token ids that ran [B, T].
    pub input_ids: Tensor,
    /// The attention mask [B, T], if any.
    pub attention_mask: Option<Tensor>,
    /// Saved values by name as requested; each hookpoint can fire more than once (in a loop).
    pub saved: Vec<(String, Vec<Tensor>)>,
}

impl TraceOutput {
    /// The first value saved under `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        match self.saved.iter().find(|(n, _)| n == name) {
            Some((_, v)) => v.first().ok_or_else(|| Error::Hookpoint {
                path: name.into(),
                msg: "was requested but never ran during this forward".into(),
                suggestions: vec![],
            }),
            None => Err(Error::Hookpoint {
                path: name.into(),
                msg: "was not saved in this trace".into(),
                suggestions: crate::nearest(name, self.saved.iter().map(|(n, _)| n.as_str()), 3),
            }),
        }
    }

    /// Every value saved under `name`, one per time the hookpoint fired.
    pub fn get_all(&self, name: &str) -> Option<&[Tensor]> {
        self.saved
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Softmax of the last position's logits [B, vocab] (nnterp's `next_token_probs`).
    pub fn next_token_probs(&self) -> Result<Tensor> {
        let logits = self
            .logits
            .as_ref()
            .ok_or_else(|| Error::Input("the trace stopped before the logits".into()))?;
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(candle_nn::ops::softmax_last_dim(
            &last.to_dtype(candle_core::DType::F32)?,
        )?)
    }
}

impl Model {
    /// Starts a trace on `input`.
    pub fn trace(&self, input: Input) -> Trace<'_> {
        Trace {
            model: self,
            input,
            reqs: Vec::new(),
            check_finite: false,
        }
    }

    /// Logits of hidden states `h` [B, T, hidden] through the final norm and the output head
    /// (nnterp's `project_on_vocab`), computed by the model's own `ln_final` and `lm_head` modules.
    pub fn project_on_vocab(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3().map_err(|_| {
            Error::Input(format!(
                "project_on_vocab takes [batch, tokens, hidden], got {:?}",
                h.dims()
            ))
        })?;
        let hidden = self.hidden_size()?;
        if d != hidden {
            return Err(Error::Input(format!(
                "project_on_vocab: hidden size {d}, the model's is {hidden}"
            )));
        }
        // Run a dummy input of the same length and replace the final norm's input with `h`: the
        // logits are then exactly lm_head(ln_final(h)), whatever the architecture.
        let ids = Tensor::zeros((b, t), candle_core::DType::U32, &self.device)?;
        let h = h.to_dtype(self.dtype)?;
        let out = self
            .trace(Input::ids(ids))
            .set("ln_final.input", h)?
            .run()?;
        out.logits.ok_or_else(|| Error::Input("no logits".into()))
    }

    /// Resolves a hookpoint path (standard names included) against this model.
    pub fn resolve(&self, path: &str) -> Result<HookPath> {
        path::resolve(self, path)
    }
}

impl<'m> Trace<'m> {
    fn push(mut self, path: &str, action: Action<'m>, writes: bool) -> Result<Self> {
        let hp = path::resolve(self.model, path)?;
        if writes {
            if let Some(msg) = hp.read_only.as_ref() {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: msg.clone(),
                    suggestions: vec![],
                });
            }
        }
        let select = hp.select;
        self.reqs.push((
            hp,
            Req {
                path: path.to_string(),
                action,
                select,
            },
        ));
        Ok(self)
    }

    /// Saves the value at `path`.
    pub fn save(self, path: &str) -> Result<Self> {
        self.push(path, Action::Save(0), false)
    }

    /// Replaces the value at `path` with `value` (same shape; float dtypes are converted).
    pub fn set(self, path: &str, value: Tensor) -> Result<Self> {
        self.push(path, Action::Replace(value), true)
    }

    /// Replaces the value at `path` with `f(value)` (same shape).
    pub fn edit(
        self,
        path: &str,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + 'm,
    ) -> Result<Self> {
        self.push(path, Action::Edit(Box::new(f)), true)
    }

    /// Stops the forward right after `path` has run (and its requests were served).
    pub fn stop_after(self, path: &str) -> Result<Self> {
        self.push(path, Action::Stop, false)
    }

    /// Adds `factor * vector` to the output of each layer in `layers`, at `token_positions` (every
    /// position when `None`); nnterp's `steer`. `vector` has shape [hidden].
    pub fn steer(
        mut self,
        layers: &[usize],
        vector: &Tensor,
        factor: f64,
        token_positions: Option<&[usize]>,
    ) -> Result<Self> {
        let hidden = self.model.hidden_size()?;
        if vector.dims() != [hidden] {
            return Err(Error::Input(format!(
                "steering vector has shape {:?}, expected [{hidden}]",
                vector.dims()
            )));
        }
        let positions: Option<Vec<usize>> = token_positions.map(|p| p.to_vec());
        for &l in layers {
            let v = (vector.to_dtype(self.model.dtype)? * factor)?;
            let positions = positions.clone();
            self = self.edit(&format!("layers_output.{l}"), move |h| {
                let (b, t, d) = h.dims3()?;
                let add = match &positions {
                    None => v
                        .reshape((1, 1, d))?
                        .broadcast_as((b, t, d))?
                        .contiguous()?,
                    Some(ps) => {
                        let mut m = vec![0f32; t];
                        for &p in ps {
                            if p >= t {
                                candle_core::bail!(
                                    "steering position {p} is past the last token ({} tokens)",
                                    t
                                );
                            }
                            m[p] = 1.0;
                        }
                        let m = Tensor::from_vec(m, (1, t, 1), h.device())?.to_dtype(h.dtype())?;
                        m.broadcast_mul(&v.reshape((1, 1, d))?)?
                            .broadcast_as((b, t, d))?
                            .contiguous()?
                    }
                };
                h + add
            })?;
        }
        Ok(self)
    }

    /// Makes layer `layer` the identity: its output is replaced by its input (nnterp's `skip_layer`).
    pub fn skip_layer(self, layer: usize) -> Result<Self> {
        let slot = std::rc::Rc::new(std::cell::RefCell::new(None::<Tensor>));
        let keep = slot.clone();
        let this = self.edit(&format!("layers_input.{layer}"), move |x| {
            *keep.borrow_mut() = Some(x.clone());
            Ok(x.clone())
        })?;
        this.edit(&format!("layers_output.{layer}"), move |_| {
            slot.borrow().clone().ok_or_else(|| {
                candle_core::Error::Msg("layer input was not seen before its output".into())
            })
        })
    }

    /// Skips every layer in `layers`.
    pub fn skip_layers(mut self, layers: &[usize]) -> Result<Self> {
        for &l in layers {
            self = self.skip_layer(l)?;
        }
        Ok(self)
    }

    /// Reports NaN or infinity produced by an edit or replacement as an error.
    pub fn check_finite(mut self, yes: bool) -> Self {
        self.check_finite = yes;
        self
    }

    /// Runs the model once, serving every request.
    pub fn run(self) -> Result<TraceOutput> {
        let model = self.model;
        let (ids, mask) = model.encode(&self.input)?;
        let mut ctx = Ctx::new(model.modules.len(), false);
        ctx.check_finite = self.check_finite;
        for (hp, req) in self.reqs {
            let mut node = ctx.module_node(hp.module.id);
            for c in &hp.calls {
                node = ctx.call_node(node, *c);
            }
            ctx.add_request(node, hp.site, req);
        }
        let result = {
            // SAFETY: `ctx` lives on this frame for the guard's whole life.
            let _act = unsafe { Activation::new(&ctx) };
            model.net.forward(&ids, mask.as_ref())
        };
        let interrupt = ctx.interrupt.borrow_mut().take();
        let logits = match (result, interrupt) {
            (_, Some(Interrupt::Failed(e))) => return Err(e),
            (_, Some(Interrupt::Stop)) => None,
            (Err(e), None) => return Err(Error::Tensor(e)),
            (Ok(l), None) => Some(l),
        };
        let stopped = logits.is_none();
        let hits = ctx.hits.into_inner();
        let mut saved_vals = ctx.saved.into_inner().into_iter();
        let mut saved = Vec::new();
        for (i, req) in ctx.reqs.iter().enumerate() {
            if hits[i] == 0 && !stopped && !matches!(req.action, Action::Stop) {
                return Err(Error::Hookpoint {
                    path: req.path.clone(),
                    msg:
                        "never ran during this forward (a branch not taken for this model or input)"
                            .into(),
                    suggestions: vec![],
                });
            }
            if let Action::Save(_) = req.action {
                let vals = saved_vals.next().unwrap_or_default();
                saved.push((
                    req.path.clone(),
                    vals.into_iter().map(|v| v.tensor().clone()).collect(),
                ));
            }
        }
        Ok(TraceOutput {
            logits,
            input_ids: ids,
            attention_mask: mask,
            saved,
        })
    }
}
