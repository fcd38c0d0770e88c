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

use crate::sae::Sae;
use crate::trace::{Action, EditFn, Plan, Steps};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Tensor};
use std::ops::Range;
use std::sync::Arc;

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
    /// The attached SAEs, whose requests are kept here and compiled into one `Derive` request
    /// each (the trace core knows nothing of SAEs).
    saes: Vec<Attached>,
    /// The attached SAE whose hookpoint the last call added a request on (`steps` apply to that
    /// request; `rows` do not apply there).
    last_sae: Option<usize>,
}

/// How to attach a sparse autoencoder or transcoder ([`Requests::sae`], `.sae(...)` on every
/// builder). `Attach::from(sae)` attaches it at the hook its `cfg.json` names, unspliced.
#[derive(Debug, Clone)]
pub struct Attach {
    /// The SAE.
    pub sae: Arc<Sae>,
    /// The hookpoint it reads (a standard name, a TransformerLens name or any path); `None`: the
    /// `hook_name` of its `cfg.json`.
    pub hook: Option<String>,
    /// A transcoder's output hookpoint; `None`: `hook_name_out` of its `cfg.json`.
    pub hook_out: Option<String>,
    /// Replace the hook's value (a transcoder's: the output hook's) by the reconstruction.
    pub splice: bool,
}

impl From<Sae> for Attach {
    fn from(sae: Sae) -> Self {
        Attach {
            sae: Arc::new(sae),
            hook: None,
            hook_out: None,
            splice: false,
        }
    }
}

impl Attach {
    /// Attaches at `hook` instead of the hook its `cfg.json` names.
    pub fn at(mut self, hook: &str) -> Self {
        self.hook = Some(hook.to_string());
        self
    }

    /// A transcoder's output hookpoint, instead of `hook_name_out`.
    pub fn out(mut self, hook: &str) -> Self {
        self.hook_out = Some(hook.to_string());
        self
    }

    /// Splices the SAE: the hook's value becomes the reconstruction (no error term).
    pub fn splice(mut self, yes: bool) -> Self {
        self.splice = yes;
        self
    }

    /// Loads the SAE of a command-line style spec: `SPEC` (a SAELens folder or `org/repo:folder`,
    /// attached at its cfg.json's hook) or `SPEC=HOOK` (attached at hookpoint `HOOK`). Unspliced.
    pub fn parse(spec: &str) -> Result<Attach> {
        let (dir, at) = match spec.split_once('=') {
            Some((d, p)) if !p.trim().is_empty() && !d.trim().is_empty() => (d, Some(p.trim())),
            Some(_) => {
                return Err(Error::Input(format!(
                    "SAE `{spec}`: expected SPEC or SPEC=HOOK (a SAELens folder or org/repo:folder, then a hookpoint)"
                )))
            }
            None => (spec, None),
        };
        let sae = Sae::load(dir.trim())?;
        let a = Attach::from(sae);
        Ok(match at {
            Some(h) => a.at(h),
            None => a,
        })
    }
}

/// A clamp (`NAME:INDEX=VALUE`): element `index` of the last axis of the value at `name` set to
/// `value` at every position ([`Requests::clamp`], `.clamp(...)` on every builder).
#[derive(Debug, Clone, PartialEq)]
pub struct Clamp {
    /// The hookpoint (an SAE's `H.sae.feature_acts`, an MLP's neurons, a residual stream).
    pub name: String,
    /// Element of its last axis.
    pub index: usize,
    /// The value it is set to (finite).
    pub value: f64,
}

impl std::str::FromStr for Clamp {
    type Err = Error;
    /// Parses `NAME:INDEX=VALUE` (e.g. `layers_output.0.sae.feature_acts:12=5.0`).
    fn from_str(s: &str) -> Result<Clamp> {
        let bad = |why: &str| {
            Error::Input(format!(
                "clamp `{s}`: {why} (expected NAME:INDEX=VALUE, e.g. layers_output.0.sae.feature_acts:12=5.0)"
            ))
        };
        let (name, rest) = s.rsplit_once(':').ok_or_else(|| bad("no `:`"))?;
        let (index, value) = rest.split_once('=').ok_or_else(|| bad("no `=`"))?;
        if name.is_empty() {
            return Err(bad("no NAME"));
        }
        let index = index
            .trim()
            .parse::<usize>()
            .map_err(|_| bad(&format!("`{index}` is not an index")))?;
        let value = value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(&format!("`{value}` is not a finite number")))?;
        Ok(Clamp {
            name: name.to_string(),
            index,
            value,
        })
    }
}

impl std::fmt::Display for Clamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}={}", self.name, self.index, self.value)
    }
}

/// Which value under an attached SAE's hookpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaeValue {
    FeatureActs,
    Reconstruction,
    ErrorTerm,
}

/// A request on an SAE hookpoint, served inside the SAE's derivation, in the order added, at the
/// steps given.
#[derive(Clone)]
struct SaeSub {
    kind: SaeSubKind,
    steps: Steps,
}

#[derive(Clone)]
enum SaeSubKind {
    Save(SaeValue, String),
    Set(Tensor),
    Edit(EditFn),
}

/// An attached SAE.
#[derive(Clone)]
struct Attached {
    hook: String,
    canonical: String,
    request: usize,
    source: Option<usize>,
    sae: Arc<Sae>,
    splice: bool,
    subs: Vec<SaeSub>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Attached({} at {}, splice {}, {} requests)",
            self.sae.dir.display(),
            self.hook,
            self.splice,
            self.subs.len()
        )
    }
}

/// `(hook, value)` of a path `H.sae.feature_acts` / `H.sae.reconstruction` / `H.sae.error`.
fn split_sae(path: &str) -> Option<(&str, &str)> {
    let i = path.rfind(".sae.")?;
    Some((&path[..i], &path[i + 5..]))
}

fn sae_value(path: &str, what: &str) -> Result<SaeValue> {
    match what {
        "feature_acts" => Ok(SaeValue::FeatureActs),
        "reconstruction" => Ok(SaeValue::Reconstruction),
        "error" => Ok(SaeValue::ErrorTerm),
        other => Err(Error::Hookpoint {
            path: path.into(),
            msg: format!("an SAE has no value `{other}`"),
            suggestions: crate::nearest(other, ["feature_acts", "reconstruction", "error"], 1),
        }),
    }
}

/// The SAE's derivation at its (output) hookpoint: encodes (the source's value for a
/// transcoder), serves the requests on its hookpoints in order, and returns the hook's new value:
/// the reconstruction when spliced; else, when the features were written, `x + decode(f') -
/// decode(f)`; else `x` itself, untouched.
fn derive_action(a: &Attached) -> Action {
    let sae = a.sae.clone();
    let subs = a.subs.clone();
    let splice = a.splice;
    let outputs: Vec<String> = subs
        .iter()
        .filter_map(|s| match &s.kind {
            SaeSubKind::Save(_, name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    let f = move |cur: &Tensor,
                  src: Option<&Tensor>,
                  step: usize,
                  outs: &mut [Option<Tensor>]|
          -> candle_core::Result<Tensor> {
        use crate::sae::{flatten, unflatten};
        let input = src.unwrap_or(cur);
        let (flat, lead) = flatten(input, sae.d_in)?;
        let enc = sae.encode(&flat)?;
        let f0 = enc.feature_acts.clone();
        let mut shape = lead.clone();
        shape.push(sae.d_sae);
        let mut feats = f0.clone();
        let mut edited = false;
        let mut slot = 0;
        let mut pending = Vec::new();
        for s in &subs {
            let active = s.steps.contains(step);
            match &s.kind {
                SaeSubKind::Save(SaeValue::FeatureActs, _) => {
                    if active {
                        outs[slot] = Some(unflatten(&feats, &lead)?);
                    }
                    slot += 1;
                }
                SaeSubKind::Save(v, _) => {
                    if active {
                        pending.push((slot, *v));
                    }
                    slot += 1;
                }
                _ if !active => {}
                SaeSubKind::Set(t) => {
                    feats = new_features(t.clone(), &shape, &f0)?;
                    edited = true;
                }
                SaeSubKind::Edit(g) => {
                    feats = new_features(g(&unflatten(&feats, &lead)?)?, &shape, &f0)?;
                    edited = true;
                }
            }
        }
        if pending.is_empty() && !edited && !splice {
            // Only feature activations were asked for: no decoding, the value untouched.
            return Ok(cur.clone());
        }
        let recon0 = sae.decode(&f0, &enc)?;
        let recon = if edited {
            sae.decode(&feats, &enc)?
        } else {
            recon0.clone()
        };
        let (cur_flat, cur_lead) = flatten(cur, sae.d_out)?;
        let cur32 = cur_flat.to_dtype(DType::F32)?;
        for (slot, v) in pending {
            outs[slot] = Some(match v {
                SaeValue::Reconstruction => unflatten(&recon, &cur_lead)?,
                _ => unflatten(&(&cur32 - &recon0)?, &cur_lead)?,
            });
        }
        let new = if splice {
            recon
        } else if edited {
            (cur32 + (recon - recon0)?)?
        } else {
            return Ok(cur.clone());
        };
        new.to_dtype(cur.dtype())?.reshape(cur.dims())
    };
    Action::Derive {
        f: Arc::new(f),
        source: a.source,
        outputs,
    }
}

impl Requests {
    /// No requests yet.
    pub fn new(model: &Model) -> Self {
        Requests {
            plan: Plan::new(model),
            last: 0..0,
            saes: Vec::new(),
            last_sae: None,
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
        self.last_sae = None;
        Ok(i)
    }

    /// Serves a request on `H.sae.<value>` (returns false when `path` is no SAE hookpoint).
    fn sae_request(
        &mut self,
        model: &Model,
        path: &str,
        sub: impl FnOnce(SaeValue) -> Result<SaeSubKind>,
    ) -> Result<bool> {
        let Some((hook, what)) = split_sae(path) else {
            return Ok(false);
        };
        let value = sae_value(path, what)?;
        let found = match self.saes.iter().rposition(|a| a.hook == hook) {
            Some(i) => Some(i),
            None => {
                let canonical = model.resolve(hook).map(|hp| hp.canonical).ok();
                self.saes
                    .iter()
                    .rposition(|a| Some(&a.canonical) == canonical.as_ref())
            }
        };
        let Some(i) = found else {
            return Err(Error::Hookpoint {
                path: path.into(),
                msg: format!(
                    "no SAE is attached at `{hook}`: attach one first (`.sae(...)`, `--sae DIR`)"
                ),
                suggestions: self
                    .saes
                    .iter()
                    .map(|a| format!("{}.sae.{what}", a.hook))
                    .collect(),
            });
        };
        let kind = sub(value)?;
        self.saes[i].subs.push(SaeSub {
            kind,
            steps: Steps::All,
        });
        let action = derive_action(&self.saes[i]);
        self.plan.set_action(self.saes[i].request, action)?;
        self.last = 0..0;
        self.last_sae = Some(i);
        Ok(true)
    }

    /// Attaches a sparse autoencoder or transcoder (see [`Attach`]). Its values become
    /// hookpoints under its (input) hook `H`: `H.sae.feature_acts` [.., d_sae] (writable),
    /// `H.sae.reconstruction`, `H.sae.error`. Unless spliced or written, it changes nothing.
    pub fn sae(&mut self, model: &Model, attach: impl Into<Attach>) -> Result<()> {
        let attach = attach.into();
        let sae = Arc::new(attach.sae.to_device(&model.device)?);
        let named = |h: &Option<String>, cfg: &Option<String>, what: &str| -> Result<String> {
            h.clone().or_else(|| cfg.clone()).ok_or_else(|| {
                Error::Input(format!(
                    "SAE {}: its cfg.json names no `{what}`; give the hookpoint (`--sae DIR=PATH`, `Attach::at`)",
                    sae.dir.display()
                ))
            })
        };
        let hook = named(&attach.hook, &sae.hook_name, "hook_name")?;
        check_size(model, &sae, &hook, sae.d_in, "d_in")?;
        let first = self.plan.requests().len();
        let (source, at) = if sae.transcoder {
            let out = named(&attach.hook_out, &sae.hook_name_out, "hook_name_out")?;
            check_size(model, &sae, &out, sae.d_out, "d_out")?;
            let src = self.plan.add(model, &hook, Action::Save)?;
            self.plan.set_hidden(src)?;
            (Some(src), out)
        } else {
            (None, hook.clone())
        };
        let canonical = model.resolve(&hook)?.canonical;
        let mut a = Attached {
            hook,
            canonical,
            request: 0,
            source,
            sae,
            splice: attach.splice,
            subs: Vec::new(),
        };
        a.request = self.plan.add(model, &at, derive_action(&a))?;
        self.saes.push(a);
        self.last = first..self.plan.requests().len();
        self.last_sae = None;
        Ok(())
    }

    /// Sets element `index` of the last axis of the value at `path` to `value`, at every position
    /// (an SAE feature `H.sae.feature_acts`, an MLP neuron, a residual dimension).
    pub fn clamp(&mut self, model: &Model, path: &str, index: usize, value: f64) -> Result<()> {
        self.edit(model, path, move |t| clamp_last(t, index, value))
    }

    /// Saves the value at `path`.
    pub fn save(&mut self, model: &Model, path: &str) -> Result<()> {
        if self.sae_request(model, path, |v| Ok(SaeSubKind::Save(v, path.to_string())))? {
            return Ok(());
        }
        self.push(model, path, Action::Save).map(|_| ())
    }

    /// Saves every value a pattern stands for ([`Model::expand_pattern`]: `layers_output.*`,
    /// `model.layers.*.self_attn.**`); a plain path is one save. The saves of a hookpoint pattern
    /// are optional: one that does not run in a forward (an expert no token was routed to) returns
    /// nothing, without an error.
    pub fn save_pattern(&mut self, model: &Model, pattern: &str) -> Result<()> {
        if !crate::trace::pattern::is_pattern(pattern) {
            return self.save(model, pattern);
        }
        let standard =
            crate::standard::LAYER_NAMES.contains(&pattern.split('.').next().unwrap_or(""));
        let first = self.plan.requests().len();
        for p in model.expand_pattern(pattern)? {
            let i = self.push(model, &p, Action::Save)?;
            if !standard {
                self.plan.set_optional(i)?;
            }
        }
        self.last = first..self.plan.requests().len();
        Ok(())
    }

    /// Saves every module's output (TransformerLens's `run_with_cache`), each optional as in
    /// [`Requests::save_pattern`].
    pub fn save_all(&mut self, model: &Model) -> Result<()> {
        let first = self.plan.requests().len();
        for p in model.module_outputs()? {
            let i = self.push(model, &p, Action::Save)?;
            self.plan.set_optional(i)?;
        }
        self.last = first..self.plan.requests().len();
        Ok(())
    }

    /// Replaces the value at `path` with `value` (same shape; float dtypes are converted).
    pub fn set(&mut self, model: &Model, path: &str, value: Tensor) -> Result<()> {
        let mut value = Some(value);
        if self.sae_request(model, path, |v| {
            writable(path, v)?;
            Ok(SaeSubKind::Set(value.take().expect("taken once")))
        })? {
            return Ok(());
        }
        let value = value.ok_or_else(|| Error::Input("internal: value taken".into()))?;
        self.push(model, path, Action::Replace(value)).map(|_| ())
    }

    /// Replaces the value at `path` with `f(value)` (same shape).
    pub fn edit(
        &mut self,
        model: &Model,
        path: &str,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Result<()> {
        let f: EditFn = Arc::new(f);
        if self.sae_request(model, path, |v| {
            writable(path, v)?;
            Ok(SaeSubKind::Edit(f.clone()))
        })? {
            return Ok(());
        }
        self.push(model, path, Action::Edit(f)).map(|_| ())
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
        if self.last_sae.is_some() {
            return Err(Error::Input(format!(
                "`{what}` does not apply to SAE hookpoints (`H.sae.*`); limit the SAE itself: \
                 put `{what}` right after attaching it (`.sae(..)?.{what}(..)`)"
            )));
        }
        if self.last.is_empty() {
            return Err(Error::Input(format!(
                "`{what}` applies to the request added just before it, and there is none"
            )));
        }
        Ok(self.last.clone())
    }

    /// Limits the last request(s) to `steps`.
    pub fn at_steps(&mut self, steps: Steps) -> Result<()> {
        if let Some(i) = self.last_sae {
            if let Steps::Range {
                start,
                end: Some(end),
            } = steps
            {
                if end <= start {
                    return Err(Error::Input(format!(
                        "steps {start}..{end} is empty: the end must be past the start"
                    )));
                }
            }
            let a = &mut self.saes[i];
            if let Some(s) = a.subs.last_mut() {
                s.steps = steps;
            }
            let action = derive_action(a);
            return self.plan.set_action(a.request, action);
        }
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

/// A new value of an SAE's feature activations, checked against their shape and laid out as the
/// encoder's output (`like`).
fn new_features(new: Tensor, shape: &[usize], like: &Tensor) -> candle_core::Result<Tensor> {
    if new.dims() != shape {
        candle_core::bail!(
            "feature activations have shape {shape:?}, the new value has {:?}",
            new.dims()
        );
    }
    new.to_dtype(DType::F32)?
        .to_device(like.device())?
        .reshape(like.dims())
}

fn writable(path: &str, v: SaeValue) -> Result<()> {
    if v == SaeValue::FeatureActs {
        Ok(())
    } else {
        Err(Error::Hookpoint {
            path: path.into(),
            msg: "only an SAE's `feature_acts` can be written; its reconstruction and error are read-only"
                .into(),
            suggestions: vec![],
        })
    }
}

/// Refuses an SAE whose size does not match a residual-sized hookpoint (the check of the other
/// hookpoints happens when the value is seen).
fn check_size(model: &Model, sae: &Sae, hook: &str, d: usize, what: &str) -> Result<()> {
    let hidden = model.hidden_size()?;
    if crate::standard::is_residual_sized(model, hook) && d != hidden {
        return Err(Error::Input(format!(
            "SAE {}: {what} is {d}, but `{hook}` has size {hidden} (the model's hidden size); \
             is it an SAE for another model or hookpoint?",
            sae.dir.display()
        )));
    }
    Ok(())
}

/// `t` with element `index` of its last axis set to `value` everywhere.
pub fn clamp_last(t: &Tensor, index: usize, value: f64) -> candle_core::Result<Tensor> {
    let n = t.dim(candle_core::D::Minus1)?;
    if index >= n {
        candle_core::bail!("index {index} is past the end of the last axis (size {n})");
    }
    let mut keep = vec![1f32; n];
    keep[index] = 0.0;
    let mut put = vec![0f32; n];
    put[index] = value as f32;
    let keep = Tensor::from_vec(keep, n, t.device())?.to_dtype(t.dtype())?;
    let put = Tensor::from_vec(put, n, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_mul(&keep)?.broadcast_add(&put)
}

/// The chaining request methods of a builder with fields `model` (anything that dereferences to
/// [`Model`]) and `requests` ([`Requests`]): `save`, `set`, `edit`, `stop_after`, `steer`,
/// `skip_layer`, `skip_layers`, `steps`, `steps_from`, `at_steps`, `rows`, `check_finite`,
/// `memory_limit`. Invoke inside the builder's `impl` block.
macro_rules! request_methods {
    () => {
        /// Saves the value at `path` (a standard name or any hookpoint path), or every value a
        /// pattern stands for (`layers_output.*`, `model.layers.*.self_attn.**`: `*` is one path
        /// segment, `**` any number; see [`Model::expand_pattern`]).
        pub fn save(mut self, path: &str) -> $crate::Result<Self> {
            self.requests.save_pattern(&self.model, path)?;
            Ok(self)
        }

        /// Saves every module's output (TransformerLens's `run_with_cache`); the memory estimate
        /// is checked before the forward runs, as for every save.
        pub fn save_all(mut self) -> $crate::Result<Self> {
            self.requests.save_all(&self.model)?;
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

        /// Attaches a sparse autoencoder or transcoder: an [`Sae`](crate::Sae) (at the hook its
        /// cfg.json names) or an [`Attach`](crate::Attach) (another hook, splicing). Adds the
        /// hookpoints `H.sae.feature_acts` (writable), `H.sae.reconstruction`, `H.sae.error`.
        pub fn sae(mut self, attach: impl Into<$crate::Attach>) -> $crate::Result<Self> {
            self.requests.sae(&self.model, attach)?;
            Ok(self)
        }

        /// Sets element `index` of the last axis of the value at `path` to `value` at every
        /// position (an SAE feature, an MLP neuron, a residual dimension).
        pub fn clamp(mut self, path: &str, index: usize, value: f64) -> $crate::Result<Self> {
            self.requests.clamp(&self.model, path, index, value)?;
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
