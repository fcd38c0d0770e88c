//! The user-facing side of tracing: the [`Trace`] builder, reusable plans built from a model
//! ([`PlanBuilder`]), the requests both share ([`Requests`]), and nnterp's helpers (`steer`,
//! `skip_layer`, `project_on_vocab`). All of it sits above the trace core ([`crate::trace`]), which
//! it drives through [`Plan`].
//!
//! ```no_run
//! use nnscope::{Input, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! // One trace, as before:
//! let out = model.trace(Input::prompts(&["Hello", "Hi there"]))
//!     .save("layers_output.0")?.rows(&[1])?      // only row 1 of the batch is kept
//!     .edit("mlps_output.1", |x| x * 0.5)?
//!     .run()?;
//! // A plan, resolved once and run on many inputs (or at every step of a generation):
//! let plan = model.plan().save("logits")?.steer(&[0], &candle_core::Tensor::zeros(64,
//!     candle_core::DType::F32, &candle_core::Device::Cpu)?, 1.0, None)?.steps(1, 3)?.build();
//! let a = model.run_plan(&plan, &Input::prompts(&["one corpus line"]))?;
//! # Ok::<(), nnscope::Error>(())
//! ```

use crate::trace::{Action, Plan, Steps};
use crate::{Error, Input, Model, Result};
use candle_core::Tensor;
use std::ops::Range;

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
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok(candle_nn::ops::softmax_last_dim(
            &last.to_dtype(candle_core::DType::F32)?,
        )?)
    }
}

/// Requests being gathered into a [`Plan`] for a model, with the standard-name helpers. Shared by
/// every builder ([`Trace`], [`PlanBuilder`], generation): each builder holds one and gets its
/// chaining methods from `request_methods!`.
///
/// `steps` and `rows` apply to the requests added by the last call (one request, or several for
/// `steer` over several layers and `skip_layer`).
#[derive(Debug, Clone)]
pub struct Requests {
    plan: Plan,
    last: Range<usize>,
}

impl Requests {
    /// No requests yet.
    pub fn new(model: &Model) -> Self {
        Requests {
            plan: Plan::new(model),
            last: 0..0,
        }
    }

    /// The plan so far.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The plan.
    pub fn into_plan(self) -> Plan {
        self.plan
    }

    fn push(&mut self, model: &Model, path: &str, action: Action) -> Result<usize> {
        let i = self.plan.add(model, path, action)?;
        self.last = i..i + 1;
        Ok(i)
    }

    /// Saves the value at `path`.
    pub fn save(&mut self, model: &Model, path: &str) -> Result<()> {
        self.push(model, path, Action::Save).map(|_| ())
    }

    /// Replaces the value at `path` with `value` (same shape; float dtypes are converted).
    pub fn set(&mut self, model: &Model, path: &str, value: Tensor) -> Result<()> {
        self.push(model, path, Action::Replace(value)).map(|_| ())
    }

    /// Replaces the value at `path` with `f(value)` (same shape).
    pub fn edit(
        &mut self,
        model: &Model,
        path: &str,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Result<()> {
        self.push(model, path, Action::Edit(std::sync::Arc::new(f)))
            .map(|_| ())
    }

    /// Stops the forward right after `path` has run (and its requests were served).
    pub fn stop_after(&mut self, model: &Model, path: &str) -> Result<()> {
        self.push(model, path, Action::Stop).map(|_| ())
    }

    /// Adds `factor * vector` to the output of each layer in `layers`, at `token_positions` (every
    /// position when `None`); nnterp's `steer`. `vector` has shape [hidden].
    pub fn steer(
        &mut self,
        model: &Model,
        layers: &[usize],
        vector: &Tensor,
        factor: f64,
        token_positions: Option<&[usize]>,
    ) -> Result<()> {
        let hidden = model.hidden_size()?;
        if vector.dims() != [hidden] {
            return Err(Error::Input(format!(
                "steering vector has shape {:?}, expected [{hidden}]",
                vector.dims()
            )));
        }
        let first = self.plan.requests().len();
        let positions: Option<Vec<usize>> = token_positions.map(|p| p.to_vec());
        let v = (vector.to_dtype(model.dtype)? * factor)?;
        for &l in layers {
            let v = v.clone();
            let positions = positions.clone();
            self.edit(model, &format!("layers_output.{l}"), move |h| {
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
        self.last = first..self.plan.requests().len();
        Ok(())
    }

    /// Makes layer `layer` the identity: its output is replaced by its input (nnterp's
    /// `skip_layer`). The input is carried by the plan itself (a hidden save and a copy), so the
    /// plan stays `Send + Sync` and each forward sees only its own input.
    pub fn skip_layer(&mut self, model: &Model, layer: usize) -> Result<()> {
        let src = self.push(model, &format!("layers_input.{layer}"), Action::Save)?;
        self.plan.set_hidden(src)?;
        self.push(
            model,
            &format!("layers_output.{layer}"),
            Action::CopyFrom(src),
        )?;
        self.last = src..src + 2;
        Ok(())
    }

    /// Skips every layer in `layers`.
    pub fn skip_layers(&mut self, model: &Model, layers: &[usize]) -> Result<()> {
        let first = self.plan.requests().len();
        for &l in layers {
            self.skip_layer(model, l)?;
        }
        self.last = first..self.plan.requests().len();
        Ok(())
    }

    fn last_group(&self, what: &str) -> Result<Range<usize>> {
        if self.last.is_empty() {
            return Err(Error::Input(format!(
                "`{what}` applies to the request added just before it, and there is none"
            )));
        }
        Ok(self.last.clone())
    }

    /// Limits the last request(s) to `steps`.
    pub fn at_steps(&mut self, steps: Steps) -> Result<()> {
        for i in self.last_group("steps")? {
            self.plan.set_steps(i, steps)?;
        }
        Ok(())
    }

    /// Limits the last request(s) to rows `rows` of the batch.
    pub fn rows(&mut self, rows: &[usize]) -> Result<()> {
        for i in self.last_group("rows")? {
            if !self.plan.requests()[i].hidden {
                self.plan.set_rows(i, rows)?;
            }
        }
        Ok(())
    }

    /// Reports NaN or infinity produced by an edit or replacement as an error.
    pub fn check_finite(&mut self, yes: bool) {
        self.plan.check_finite = yes;
    }

    /// Caps the memory the saved values may take, in bytes.
    pub fn memory_limit(&mut self, bytes: u64) {
        self.plan.memory_limit = Some(bytes);
    }
}

/// The chaining request methods of a builder with fields `model` (anything that dereferences to
/// [`Model`]) and `requests` ([`Requests`]): `save`, `set`, `edit`, `stop_after`, `steer`,
/// `skip_layer`, `skip_layers`, `steps`, `steps_from`, `at_steps`, `rows`, `check_finite`,
/// `memory_limit`. Invoke inside the builder's `impl` block.
macro_rules! request_methods {
    () => {
        /// Saves the value at `path` (a standard name or any hookpoint path).
        pub fn save(mut self, path: &str) -> $crate::Result<Self> {
            self.requests.save(&self.model, path)?;
            Ok(self)
        }

        /// Replaces the value at `path` with `value` (same shape; float dtypes are converted).
        pub fn set(mut self, path: &str, value: candle_core::Tensor) -> $crate::Result<Self> {
            self.requests.set(&self.model, path, value)?;
            Ok(self)
        }

        /// Replaces the value at `path` with `f(value)` (same shape).
        pub fn edit(
            mut self,
            path: &str,
            f: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>
                + Send
                + Sync
                + 'static,
        ) -> $crate::Result<Self> {
            self.requests.edit(&self.model, path, f)?;
            Ok(self)
        }

        /// Stops the forward right after `path` has run (and its requests were served).
        pub fn stop_after(mut self, path: &str) -> $crate::Result<Self> {
            self.requests.stop_after(&self.model, path)?;
            Ok(self)
        }

        /// Adds `factor * vector` to the output of each layer in `layers`, at `token_positions`
        /// (every position when `None`); nnterp's `steer`. `vector` has shape [hidden].
        pub fn steer(
            mut self,
            layers: &[usize],
            vector: &candle_core::Tensor,
            factor: f64,
            token_positions: Option<&[usize]>,
        ) -> $crate::Result<Self> {
            self.requests
                .steer(&self.model, layers, vector, factor, token_positions)?;
            Ok(self)
        }

        /// Makes layer `layer` the identity: its output is replaced by its input (nnterp's
        /// `skip_layer`).
        pub fn skip_layer(mut self, layer: usize) -> $crate::Result<Self> {
            self.requests.skip_layer(&self.model, layer)?;
            Ok(self)
        }

        /// Skips every layer in `layers`.
        pub fn skip_layers(mut self, layers: &[usize]) -> $crate::Result<Self> {
            self.requests.skip_layers(&self.model, layers)?;
            Ok(self)
        }

        /// Limits the request just added (all of them, for a `steer` or `skip_layer`) to forward
        /// steps `start..end` (end excluded), as nnsight's `tracer.iter[start:end]`. Step 0 is the
        /// first forward (a trace's only one).
        pub fn steps(mut self, start: usize, end: usize) -> $crate::Result<Self> {
            self.requests
                .at_steps($crate::trace::Steps::range(start, end))?;
            Ok(self)
        }

        /// Limits the request just added to steps `start..` (every step from `start` on).
        pub fn steps_from(mut self, start: usize) -> $crate::Result<Self> {
            self.requests.at_steps($crate::trace::Steps::from(start))?;
            Ok(self)
        }

        /// Limits the request just added to `steps`.
        pub fn at_steps(mut self, steps: $crate::trace::Steps) -> $crate::Result<Self> {
            self.requests.at_steps(steps)?;
            Ok(self)
        }

        /// Limits the request just added to rows `rows` of the batch (the first dimension of its
        /// value): a save keeps those rows, in that order; a `set` gives a tensor with
        /// `rows.len()` rows; an edit sees and returns those rows; the other rows are untouched.
        pub fn rows(mut self, rows: &[usize]) -> $crate::Result<Self> {
            self.requests.rows(rows)?;
            Ok(self)
        }

        /// Reports NaN or infinity produced by an edit or replacement as an error.
        pub fn check_finite(mut self, yes: bool) -> Self {
            self.requests.check_finite(yes);
            self
        }

        /// Caps the memory the saved values may take, in bytes. By default a run on the CPU refuses
        /// to start when its saves are estimated to need more than the memory available
        /// (`MemAvailable` in /proc/meminfo); this sets the limit explicitly (on any device).
        pub fn memory_limit(mut self, bytes: u64) -> Self {
            self.requests.memory_limit(bytes);
            self
        }
    };
}
#[allow(unused_imports)] // For other builders (generation) in this crate.
pub(crate) use request_methods;

/// A trace being set up: requests are validated as they are added, then [`Trace::run`] runs the
/// model once.
pub struct Trace<'m> {
    model: &'m Model,
    input: Input,
    requests: Requests,
}

impl<'m> Trace<'m> {
    request_methods!();

    /// The plan of this trace's requests (reusable: see [`Model::run_plan`]).
    pub fn plan(&self) -> &Plan {
        self.requests.plan()
    }

    /// Runs the model once, serving every request.
    pub fn run(self) -> Result<TraceOutput> {
        self.model.run_plan(self.requests.plan(), &self.input)
    }
}

/// A plan being set up without an input: [`PlanBuilder::build`] gives a [`Plan`] to run on any
/// number of inputs ([`Model::run_plan`]), steps or threads.
pub struct PlanBuilder<'m> {
    model: &'m Model,
    requests: Requests,
}

impl<'m> PlanBuilder<'m> {
    request_methods!();

    /// The plan.
    pub fn build(self) -> Plan {
        self.requests.into_plan()
    }
}

impl Model {
    /// Starts a trace on `input`.
    pub fn trace(&self, input: Input) -> Trace<'_> {
        Trace {
            model: self,
            input,
            requests: Requests::new(self),
        }
    }

    /// Starts a reusable plan (the requests of a trace, without its input).
    pub fn plan(&self) -> PlanBuilder<'_> {
        PlanBuilder {
            model: self,
            requests: Requests::new(self),
        }
    }

    /// Runs `plan` (made for this model) once on `input`, as step 0: one forward.
    pub fn run_plan(&self, plan: &Plan, input: &Input) -> Result<TraceOutput> {
        let (ids, mask) = self.encode(input)?;
        let positions = self.input_positions(input, &ids)?;
        let (b, t) = ids.dims2()?;
        plan.check_memory(self, b, t)?;
        let out = plan.run(0, || {
            self.run_net(&ids, mask.as_ref(), positions.as_ref(), None)
        })?;
        Ok(TraceOutput {
            logits: out.output,
            input_ids: ids,
            attention_mask: mask,
            saved: out.saved,
        })
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
        // Without a final norm (post-norm OPT), `h` replaces the last layer's output instead.
        let at = match self.names.ln_final {
            Some(_) => "ln_final.input".to_string(),
            None => format!("layers_output.{}", self.num_layers().saturating_sub(1)),
        };
        let out = self.trace(Input::ids(ids)).set(&at, h)?.run()?;
        out.logits.ok_or_else(|| Error::Input("no logits".into()))
    }

    /// Resolves a hookpoint path (standard names included) against this model.
    pub fn resolve(&self, path: &str) -> Result<crate::trace::HookPath> {
        crate::trace::path::resolve(self, path)
    }
}
