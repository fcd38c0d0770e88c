//! A plan: resolved requests, owned and reusable. Paths are checked once, when a request is added;
//! [`Plan::run`] then serves them during any number of forwards: every step of a generation, every
//! batch of a corpus, on any thread.

use super::path::{self, HookPath};
use super::requests::{Ctx, Interrupt};
use super::rt::Activation;
use super::target::Target;
use crate::{Error, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// An edit: a function from the value at a hookpoint to its new value (same shape).
pub type EditFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// A derivation: from the value at a hookpoint (and, when the request names a source, the value last
/// saved by that request in this forward) and the forward step, to its new value, reporting side
/// values into the slots of `outputs` (one per declared output name; a slot left `None` reports
/// nothing this time).
pub type DeriveFn = Arc<
    dyn Fn(&Tensor, Option<&Tensor>, usize, &mut [Option<Tensor>]) -> candle_core::Result<Tensor>
        + Send
        + Sync,
>;

/// A view of a hookpoint's value under another shape (a standard name such as `heads.L`, the
/// [B, T, H, D] view of the output projection's [B, T, H * D] input): requests see and write the
/// value through it. `read` maps the hookpoint's value to the view; `write` maps a (new) view back
/// to the hookpoint's shape. Both must keep the first (batch) dimension, so that `rows` still apply.
#[derive(Clone)]
pub struct View {
    /// Hookpoint value -> view.
    pub read: EditFn,
    /// View -> hookpoint value.
    pub write: EditFn,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View(..)")
    }
}

/// What a request does at its hookpoint.
#[derive(Clone)]
pub enum Action {
    /// Keep the value (one per time the hookpoint fires).
    Save,
    /// Replace the value with this tensor (same shape; float dtypes are converted).
    Replace(Tensor),
    /// Replace the value with `f(value)`.
    Edit(EditFn),
    /// Replace the value with the last value saved, in this forward, by the request at this index
    /// of the plan (which must run first): how `skip_layer` carries a layer's input to its output.
    CopyFrom(usize),
    /// Stop the forward right after this hookpoint (its earlier requests served).
    Stop,
    /// Replace the value with `f(value, source)` and keep the side values `f` reports, returned as
    /// saves under the names in `outputs`. `source` is the index of an earlier save of the plan
    /// whose last value (in this forward) `f` receives. How computations above the core (a sparse
    /// autoencoder spliced at a hookpoint) expose values of their own.
    Derive {
        /// The derivation.
        f: DeriveFn,
        /// An earlier save whose value `f` reads.
        source: Option<usize>,
        /// Names under which the side values are returned.
        outputs: Vec<String>,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Save => write!(f, "Save"),
            Action::Replace(t) => write!(f, "Replace({:?})", t.dims()),
            Action::Edit(_) => write!(f, "Edit(..)"),
            Action::CopyFrom(i) => write!(f, "CopyFrom({i})"),
            Action::Stop => write!(f, "Stop"),
            Action::Derive {
                source, outputs, ..
            } => write!(f, "Derive(source {source:?}, outputs {outputs:?})"),
        }
    }
}

impl Action {
    /// Whether the action writes the value.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Action::Replace(_) | Action::Edit(_) | Action::CopyFrom(_) | Action::Derive { .. }
        )
    }
}

/// Which forward steps a request applies to. Step 0 is the first forward (a trace's only one,
/// generation's forward over the prompt); step `s` is the `s`-th forward after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steps {
    /// Every step (nnsight's `tracer.all()`); the default.
    #[default]
    All,
    /// Steps `start..end` (`end` excluded; `None`: no end), as nnsight's `tracer.iter[start:end]`.
    Range {
        /// First step.
        start: usize,
        /// One past the last step, or `None` for every step from `start`.
        end: Option<usize>,
    },
}

impl Steps {
    /// Steps `start..end` (`end` excluded).
    pub fn range(start: usize, end: usize) -> Self {
        Steps::Range {
            start,
            end: Some(end),
        }
    }

    /// Step `s` alone.
    pub fn only(s: usize) -> Self {
        Steps::range(s, s + 1)
    }

    /// Every step from `start` on.
    pub fn from(start: usize) -> Self {
        Steps::Range { start, end: None }
    }

    /// Whether step `s` is one of them.
    pub fn contains(&self, s: usize) -> bool {
        match *self {
            Steps::All => true,
            Steps::Range { start, end } => s >= start && end.is_none_or(|e| s < e),
        }
    }
}

/// One resolved request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The path as the user wrote it: the name of saved values and of the hookpoint in errors.
    pub name: String,
    /// The resolved hookpoint.
    pub path: HookPath,
    /// What to do there.
    pub action: Action,
    /// The steps it applies to.
    pub steps: Steps,
    /// The rows of the batch (first dimension of the value) it applies to; `None`: all. A save keeps
    /// these rows; a replacement or edit changes only these rows (a replacement tensor then has
    /// `rows.len()` rows, and an edit sees and returns those rows).
    pub rows: Option<Vec<usize>>,
    /// A save made for another request's use (`CopyFrom`), not returned.
    pub hidden: bool,
    /// The view the request sees the value through (from [`Target::value_view`]); `None`: the
    /// value itself.
    pub view: Option<View>,
    /// A request that may not run in a forward (one of many from a pattern or `save_all`, such as
    /// an expert no token was routed to): not running is no error, and a save that never ran
    /// returns nothing under its name.
    pub optional: bool,
}

/// Resolved requests and options, ready to run any number of times. `Send + Sync + Clone`.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    n_modules: usize,
    requests: Vec<Request>,
    /// Report NaN or infinity produced by a replacement or edit as an error.
    pub check_finite: bool,
    /// Cap on the bytes the saves may take ([`Plan::check_memory`]).
    pub memory_limit: Option<u64>,
}

/// What one step of a plan produced.
#[derive(Debug)]
pub struct StepOutput<R> {
    /// What the forward returned; `None` when a `Stop` request ended it early.
    pub output: Option<R>,
    /// The values saved at this step, by request name, in the order the saves were added (only the
    /// saves that apply to this step), one value per time the hookpoint fired.
    pub saved: Vec<(String, Vec<Tensor>)>,
}

impl<R> StepOutput<R> {
    /// Whether a `Stop` request ended the forward.
    pub fn stopped(&self) -> bool {
        self.output.is_none()
    }
}

fn err(path: &str, msg: impl Into<String>) -> Error {
    Error::Hookpoint {
        path: path.to_string(),
        msg: msg.into(),
        suggestions: vec![],
    }
}

impl Plan {
    /// An empty plan for `target`.
    pub fn new(target: &dyn Target) -> Self {
        Plan {
            n_modules: target.module_table().len(),
            ..Default::default()
        }
    }

    /// The requests, in the order they were added.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// Resolves `path` against `target` and adds a request doing `action` there at every step and on
    /// every row. Returns its index. Fails, before anything runs, on a path that names nothing, a
    /// write to a read-only value, or a `CopyFrom` of a request that is not an earlier save.
    pub fn add(&mut self, target: &dyn Target, path: &str, action: Action) -> Result<usize> {
        let hp = path::resolve(target, path)?;
        let view = target.value_view(path)?;
        if action.writes() {
            if let Some(msg) = hp.read_only.as_ref() {
                return Err(err(path, msg.clone()));
            }
        }
        let src = match &action {
            Action::CopyFrom(src) => Some(*src),
            Action::Derive {
                source: Some(src), ..
            } => Some(*src),
            _ => None,
        };
        if let Some(src) = src {
            if !matches!(
                self.requests.get(src).map(|r| &r.action),
                Some(Action::Save)
            ) {
                return Err(err(
                    path,
                    format!("copies request {src}, which is not a save"),
                ));
            }
        }
        self.requests.push(Request {
            name: path.to_string(),
            path: hp,
            action,
            steps: Steps::All,
            rows: None,
            hidden: false,
            view,
            optional: false,
        });
        Ok(self.requests.len() - 1)
    }

    /// Limits request `i` to `steps`.
    pub fn set_steps(&mut self, i: usize, steps: Steps) -> Result<()> {
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
        let r = self.request_mut(i)?;
        r.steps = steps;
        Ok(())
    }

    /// Limits request `i` to rows `rows` of the batch.
    pub fn set_rows(&mut self, i: usize, rows: &[usize]) -> Result<()> {
        let r = self.request_mut(i)?;
        if rows.is_empty() {
            return Err(err(&r.name, "`rows` needs at least one row"));
        }
        if matches!(r.action, Action::Stop) {
            return Err(err(
                &r.name,
                "a stop applies to the whole batch; it takes no rows",
            ));
        }
        r.rows = Some(rows.to_vec());
        Ok(())
    }

    /// Replaces the action of request `i` (same checks as [`Plan::add`]).
    pub fn set_action(&mut self, i: usize, action: Action) -> Result<()> {
        let r = self.request_mut(i)?;
        if action.writes() {
            if let Some(msg) = r.path.read_only.as_ref() {
                return Err(err(&r.name, msg.clone()));
            }
        }
        r.action = action;
        Ok(())
    }

    /// Marks request `i` as optional ([`Request::optional`]): it may not run in a forward.
    pub fn set_optional(&mut self, i: usize) -> Result<()> {
        self.request_mut(i)?.optional = true;
        Ok(())
    }

    /// Marks request `i` (a save) as internal: its values are not returned.
    pub fn set_hidden(&mut self, i: usize) -> Result<()> {
        self.request_mut(i)?.hidden = true;
        Ok(())
    }

    fn request_mut(&mut self, i: usize) -> Result<&mut Request> {
        let n = self.requests.len();
        self.requests
            .get_mut(i)
            .ok_or_else(|| Error::Input(format!("no request {i}: the plan has {n}")))
    }

    /// Whether any request applies to step `step` (when none does, [`Plan::run`] runs the forward
    /// untraced).
    pub fn is_active(&self, step: usize) -> bool {
        self.requests.iter().any(|r| r.steps.contains(step))
    }

    /// Estimates what the saves will take for a `[batch, tokens]` input and refuses when it exceeds
    /// the memory limit ([`Plan::memory_limit`], else on the CPU the memory available), so that an
    /// oversized request fails in a second with a message instead of after minutes of swapping.
    pub fn check_memory(&self, target: &dyn Target, batch: usize, tokens: usize) -> Result<()> {
        let elem = target.activation_dtype().size_in_bytes() as u64;
        // The estimate first (no strings: this runs before every trace), the limit only if needed.
        let sizes: Vec<(usize, u64)> = self
            .requests
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.action, Action::Save) && !r.hidden)
            .filter_map(|(i, r)| {
                let mut dims = target.estimate_shape(&r.path, batch, tokens);
                if dims.is_empty() {
                    return None;
                }
                if let (Some(rows), Some(d0)) = (&r.rows, dims.first_mut()) {
                    *d0 = rows.len().min(*d0);
                }
                let elems = dims.iter().fold(1u64, |a, d| a.saturating_mul(*d as u64));
                Some((i, elems.saturating_mul(elem)))
            })
            .collect();
        let needed = sizes.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n));
        if needed == 0 {
            return Ok(());
        }
        let (available, source_of_limit) = match self.memory_limit {
            Some(l) => (
                l,
                "allowed by `Trace::memory_limit` (`Plan::memory_limit`)".to_string(),
            ),
            None if target.activation_device().is_cpu() => match mem_available(needed) {
                Some(a) => (a, "available (MemAvailable in /proc/meminfo)".to_string()),
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        if needed <= available {
            return Ok(());
        }
        let mut items: Vec<(u64, String)> = sizes
            .iter()
            .map(|&(i, n)| {
                let r = &self.requests[i];
                let mut dims = target.estimate_shape(&r.path, batch, tokens);
                if let (Some(rows), Some(d0)) = (&r.rows, dims.first_mut()) {
                    *d0 = rows.len().min(*d0);
                }
                (n, format!("`{}` ~{dims:?}", r.name))
            })
            .collect();
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

    /// Runs `forward` (one forward of the target this plan was resolved against) as step `step`,
    /// serving the requests that apply to that step. A step no request applies to runs `forward`
    /// with no trace active: exactly a plain forward.
    ///
    /// Fails with the request's own error (a bad edit, a shape mismatch, ...), with the forward's
    /// error, or when a request of this step never ran (a branch not taken), unless a stop ended
    /// the forward first.
    pub fn run<R, E: Into<Error>>(
        &self,
        step: usize,
        forward: impl FnOnce() -> std::result::Result<R, E>,
    ) -> Result<StepOutput<R>> {
        let active: Vec<usize> = (0..self.requests.len())
            .filter(|i| self.requests[*i].steps.contains(step))
            .collect();
        if active.is_empty() {
            return Ok(StepOutput {
                output: Some(forward().map_err(Into::into)?),
                saved: Vec::new(),
            });
        }
        let mut ctx = Ctx::new(self.n_modules, false, &self.requests);
        ctx.check_finite = self.check_finite;
        ctx.step = step;
        for &i in &active {
            let hp = &self.requests[i].path;
            let mut node = ctx.module_node(hp.module.id);
            for c in &hp.calls {
                node = ctx.call_node(node, *c);
            }
            ctx.add_request(node, hp.site, i);
        }
        let result = {
            // SAFETY: `ctx` lives on this frame for the guard's whole life.
            let _act = unsafe { Activation::new(&ctx) };
            forward()
        };
        let interrupt = ctx.interrupt.borrow_mut().take();
        let output = match (result, interrupt) {
            (_, Some(Interrupt::Failed(e))) => return Err(e),
            (_, Some(Interrupt::Stop)) => None,
            (Err(e), None) => return Err(e.into()),
            (Ok(o), None) => Some(o),
        };
        let stopped = output.is_none();
        let hits = ctx.hits.into_inner();
        let mut values = ctx.saved.into_inner();
        let mut derived = ctx.derived.into_inner();
        let mut saved = Vec::new();
        for &i in &active {
            let r = &self.requests[i];
            if hits[i] == 0 && r.optional {
                continue;
            }
            if hits[i] == 0 && !stopped && !matches!(r.action, Action::Stop) {
                return Err(err(
                    &r.name,
                    "never ran during this forward (a branch not taken for this model or input)",
                ));
            }
            if matches!(r.action, Action::Save) && !r.hidden {
                saved.push((r.name.clone(), std::mem::take(&mut values[i])));
            }
            if let Action::Derive { outputs, .. } = &r.action {
                let mut slots = std::mem::take(&mut derived[i]);
                slots.resize(outputs.len(), Vec::new());
                // A side value not reported at this step (limited to other steps) is not listed.
                for (name, vals) in outputs.iter().zip(slots) {
                    if !vals.is_empty() {
                        saved.push((name.clone(), vals));
                    }
                }
            }
        }
        Ok(StepOutput { output, saved })
    }
}

/// Bytes of memory available to new allocations, from /proc/meminfo (Linux); `None` elsewhere.
/// MemAvailable of /proc/meminfo, in bytes, for a check of `needed` bytes. Reading the file took a
/// few percent of a small trace, so a reading less than a second old is reused while `needed` is
/// under a quarter of it (memory cannot plausibly fall that far that fast); close to the limit it is
/// always read afresh.
fn mem_available(needed: u64) -> Option<u64> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    if let Ok(last) = LAST.lock() {
        if let Some((at, avail)) = *last {
            if at.elapsed() < Duration::from_secs(1) && needed < avail / 4 {
                return Some(avail);
            }
        }
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let avail = kb.saturating_mul(1024);
    if let Ok(mut last) = LAST.lock() {
        *last = Some((Instant::now(), avail));
    }
    Some(avail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn plan_is_send_sync_clone() {
        assert_send_sync_clone::<Plan>();
        assert_send_sync_clone::<Request>();
    }

    #[test]
    fn steps() {
        assert!(Steps::All.contains(7));
        assert!(Steps::range(1, 3).contains(1) && Steps::range(1, 3).contains(2));
        assert!(!Steps::range(1, 3).contains(3) && !Steps::range(1, 3).contains(0));
        assert!(Steps::from(2).contains(100) && !Steps::from(2).contains(1));
        assert!(Steps::only(0).contains(0) && !Steps::only(0).contains(1));
    }
}
