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
    memory_limit: Option<u64>,
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
            memory_limit: None,
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

    /// Caps the memory the saved values may take, in bytes. By default a trace on the CPU refuses
    /// to start when its saves are estimated to need more than the memory available
    /// (`MemAvailable` in /proc/meminfo); this sets the limit explicitly (on any device).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Estimates what the saves will take and refuses to run when it exceeds the memory limit, so
    /// that an oversized request fails in a second with a message instead of after minutes of
    /// swapping, or by the out-of-memory killer.
    fn check_memory(&self, b: usize, t: usize) -> Result<()> {
        let (available, source_of_limit) = match self.memory_limit {
            Some(l) => (l, "allowed by `Trace::memory_limit`".to_string()),
            None if self.model.device.is_cpu() => match mem_available() {
                Some(a) => (a, "available (MemAvailable in /proc/meminfo)".to_string()),
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        let mut items: Vec<(u64, String)> = Vec::new();
        for (hp, req) in &self.reqs {
            if matches!(req.action, Action::Save(_)) {
                let dims = estimate_shape(self.model, hp, b, t);
                let elems = dims.iter().fold(1u64, |a, d| a.saturating_mul(*d as u64));
                let bytes = elems.saturating_mul(self.model.dtype.size_in_bytes() as u64);
                items.push((bytes, format!("`{}` ~{dims:?}", req.path)));
            }
        }
        let needed = items.iter().fold(0u64, |a, (n, _)| a.saturating_add(*n));
        if needed <= available {
            return Ok(());
        }
        items.sort_by_key(|item| std::cmp::Reverse(item.0));
        let mut detail: Vec<String> = items.iter().take(3).map(|(_, s)| s.clone()).collect();
        if items.len() > 3 {
            detail.push(format!("and {} more", items.len() - 3));
        }
        Err(Error::TooLarge {
            needed,
            available,
            source_of_limit,
            detail: detail.join(", "),
        })
    }

    /// Runs the model once, serving every request.
    pub fn run(self) -> Result<TraceOutput> {
        let model = self.model;
        let (ids, mask) = model.encode(&self.input)?;
        {
            let (b, t) = ids.dims2()?;
            self.check_memory(b, t)?;
        }
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

/// Bytes of memory available to new allocations, from /proc/meminfo (Linux); `None` elsewhere.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// The shape a saved value is expected to have for a [B, T] input, by a per-name rule: logits are
/// [B, T, vocab]; attention probabilities (and, as an upper bound, anything inside an attention
/// module) [B, heads, T, T]; everything else at most [B, T, max(hidden, MLP width)]. An estimate
/// for refusing hopeless requests, not a promise.
fn estimate_shape(model: &Model, hp: &HookPath, b: usize, t: usize) -> Vec<usize> {
    let cfg = &model.config;
    let hidden = cfg
        .usize(&["hidden_size", "n_embd", "d_model"])
        .unwrap_or(0);
    let inner = cfg
        .usize(&["intermediate_size", "n_inner", "ffn_dim"])
        .unwrap_or(4 * hidden);
    let heads = cfg
        .usize(&["num_attention_heads", "n_head", "num_heads"])
        .unwrap_or(1);
    let names = &model.names;
    let canonical = hp.canonical.as_str();
    let lm_head_out = format!("{}.output", names.lm_head);
    if canonical == lm_head_out || canonical.starts_with(&format!("{lm_head_out}.")) {
        return vec![b, t, model.vocab_size];
    }
    let width = hidden.max(inner);
    let entry = model.modules.get(hp.module);
    let in_attention = entry.path.split('.').any(|seg| {
        crate::standard::RULES
            .iter()
            .find(|r| r.standard == "self_attn")
            .is_some_and(|r| r.aliases.contains(&seg))
    });
    let probs_cols = match model.arch.prob_shape {
        crate::models::ProbShape::Standard => t,
        crate::models::ProbShape::SinkColumn => t + 1,
    };
    let is_probs = hp.given.starts_with("attention_probabilities");
    if is_probs {
        return vec![b, heads, t, probs_cols];
    }
    if in_attention && hp.site != rt::OUTPUT_SITE && hp.site != rt::INPUT_SITE {
        // A call inside attention: scores and probabilities are the largest values there.
        let probs = b
            .saturating_mul(heads)
            .saturating_mul(t)
            .saturating_mul(probs_cols);
        let states = b.saturating_mul(t).saturating_mul(width);
        return if probs >= states {
            vec![b, heads, t, probs_cols]
        } else {
            vec![b, t, width]
        };
    }
    vec![b, t, width]
}
