//! A trace's requests, compiled into a tree of scopes so that each probe finds its work in one step.

use super::plan::{Action, Request};
use super::rt::FnInfo;
use super::value::Value;
use candle_core::{DType, Result, Tensor};
use std::cell::{Cell, RefCell};

/// "No node" / "no site".
pub(crate) const NONE: u32 = u32::MAX;

/// What a call site returned, as seen by its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tensor (or `Result` of one): can be saved and replaced.
    Tensor,
    /// A tuple of this many tensors.
    Tuple(usize),
    /// Anything else: listed, read-only.
    Other,
}

/// One scope: a module's forward, or an instrumented function entered from a call site.
#[derive(Default)]
pub(crate) struct Node {
    pub info: Option<&'static FnInfo>,
    pub sites: Vec<(u32, Vec<usize>)>,
    pub calls: Vec<(u32, u32)>,
    pub kinds: Vec<(u32, Kind)>,
}

/// Why a trace stopped before the end of the forward.
#[derive(Debug)]
pub(crate) enum Interrupt {
    Stop,
    Failed(crate::Error),
}

/// The state of one running trace, active on one thread.
pub(crate) struct Ctx<'a> {
    pub nodes: RefCell<Vec<Node>>,
    pub module_nodes: RefCell<Vec<u32>>,
    stack: RefCell<Vec<u32>>,
    /// The plan's requests (indexed as in the plan; only those added with `add_request` run).
    pub reqs: &'a [Request],
    pub recording: bool,
    pub check_finite: bool,
    /// The forward step being served (for `Derive`).
    pub step: usize,
    /// Values saved by each request, indexed as `reqs`.
    pub saved: RefCell<Vec<Vec<Tensor>>>,
    /// Side values reported by `Derive` requests: per request, per output slot.
    pub derived: RefCell<Vec<Vec<Vec<Tensor>>>>,
    pub hits: RefCell<Vec<u32>>,
    pub interrupt: RefCell<Option<Interrupt>>,
    stopped: Cell<bool>,
}

impl<'a> Ctx<'a> {
    pub fn new(n_modules: usize, recording: bool, reqs: &'a [Request]) -> Self {
        Ctx {
            nodes: RefCell::new(Vec::new()),
            module_nodes: RefCell::new(vec![NONE; n_modules]),
            stack: RefCell::new(Vec::with_capacity(16)),
            reqs,
            recording,
            check_finite: false,
            step: 0,
            saved: RefCell::new(vec![Vec::new(); reqs.len()]),
            derived: RefCell::new(vec![Vec::new(); reqs.len()]),
            hits: RefCell::new(vec![0; reqs.len()]),
            interrupt: RefCell::new(None),
            stopped: Cell::new(false),
        }
    }

    fn new_node(&self, info: Option<&'static FnInfo>) -> u32 {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            info,
            ..Default::default()
        });
        (nodes.len() - 1) as u32
    }

    /// The node of a module, created if missing.
    pub fn module_node(&self, module: u32) -> u32 {
        let existing = self.module_nodes.borrow()[module as usize];
        if existing != NONE {
            return existing;
        }
        let n = self.new_node(None);
        self.module_nodes.borrow_mut()[module as usize] = n;
        n
    }

    /// The child scope of `node` entered from call `site`, created if missing.
    pub fn call_node(&self, node: u32, site: u32) -> u32 {
        if let Some(c) = self.find_call(node, site) {
            return c;
        }
        let c = self.new_node(None);
        self.nodes.borrow_mut()[node as usize].calls.push((site, c));
        c
    }

    fn find_call(&self, node: u32, site: u32) -> Option<u32> {
        self.nodes.borrow()[node as usize]
            .calls
            .iter()
            .find(|(s, _)| *s == site)
            .map(|(_, c)| *c)
    }

    /// Makes request `idx` (of `reqs`) run at `site` of `node`.
    pub fn add_request(&mut self, node: u32, site: u32, idx: usize) {
        let mut nodes = self.nodes.borrow_mut();
        let n = &mut nodes[node as usize];
        match n.sites.iter_mut().find(|(s, _)| *s == site) {
            Some((_, v)) => v.push(idx),
            None => n.sites.push((site, vec![idx])),
        }
    }

    pub fn enter_module(&self, module: u32, info: &'static FnInfo) {
        let node = if self.recording {
            let n = self.module_node(module);
            self.nodes.borrow_mut()[n as usize].info = Some(info);
            n
        } else {
            self.module_nodes
                .borrow()
                .get(module as usize)
                .copied()
                .unwrap_or(NONE)
        };
        self.stack.borrow_mut().push(node);
    }

    pub fn enter_call(&self, site: u32, info: &'static FnInfo) {
        let parent = self.top();
        let node = if parent == NONE || site == NONE {
            NONE
        } else if self.recording {
            let c = self.call_node(parent, site);
            self.nodes.borrow_mut()[c as usize].info = Some(info);
            c
        } else {
            self.find_call(parent, site).unwrap_or(NONE)
        };
        self.stack.borrow_mut().push(node);
    }

    /// Whether a call entered from `site` of the current scope has no node (no request in it or
    /// below it); never while recording or after a stop.
    pub fn callee_quiet(&self, site: u32) -> bool {
        if self.recording || self.stopped.get() {
            return false;
        }
        let parent = self.top();
        parent == NONE || site == NONE || self.find_call(parent, site).is_none()
    }

    pub fn leave(&self) {
        self.stack.borrow_mut().pop();
    }

    #[inline]
    fn top(&self) -> u32 {
        self.stack.borrow().last().copied().unwrap_or(NONE)
    }

    /// Whether the current scope has requests at `site`. A structure probe records the site's kind.
    #[inline]
    pub fn wants(&self, site: u32, _info: &'static FnInfo, kind: Kind) -> bool {
        if self.stopped.get() {
            return kind != Kind::Other;
        }
        let top = self.top();
        if top == NONE {
            return false;
        }
        if self.recording {
            let mut nodes = self.nodes.borrow_mut();
            let n = &mut nodes[top as usize];
            if !n.kinds.iter().any(|(s, _)| *s == site) {
                n.kinds.push((site, kind));
            }
        }
        self.nodes.borrow()[top as usize]
            .sites
            .iter()
            .any(|(s, _)| *s == site)
    }

    fn fail(&self, e: crate::Error) -> candle_core::Error {
        let mut slot = self.interrupt.borrow_mut();
        if slot.is_none() {
            *slot = Some(Interrupt::Failed(e));
        }
        candle_core::Error::Msg("nnscope: trace interrupted".into())
    }

    /// Runs the requests at `site` of the current scope, in the order they were made.
    pub fn apply(
        &self,
        site: u32,
        _info: &'static FnInfo,
        mut v: Value,
        _kind: Kind,
    ) -> Result<Value> {
        if self.stopped.get() {
            return Err(candle_core::Error::Msg("nnscope: trace stopped".into()));
        }
        let top = self.top();
        let reqs: Vec<usize> = {
            let nodes = self.nodes.borrow();
            match nodes[top as usize].sites.iter().find(|(s, _)| *s == site) {
                Some((_, r)) => r.clone(),
                None => return Ok(v),
            }
        };
        for ri in reqs {
            let req = &self.reqs[ri];
            self.hits.borrow_mut()[ri] += 1;
            let Some(raw) = v.get(req.path.select).cloned() else {
                return Err(self.fail(crate::Error::Hookpoint {
                    path: req.name.clone(),
                    msg: match &v {
                        Value::Tuple(t) => format!(
                            "the value here is a tuple of {} tensors: add `.0` .. `.{}` after `.output`",
                            t.len(),
                            t.len().saturating_sub(1)
                        ),
                        Value::Tensor(_) => "the value here is a single tensor: drop the element index".into(),
                    },
                    suggestions: vec![],
                }));
            };
            // A request on a view sees (and writes) the value through it.
            let cur = match &req.view {
                Some(view) => (view.read)(&raw).map_err(|e| {
                    self.fail(crate::Error::Hookpoint {
                        path: req.name.clone(),
                        msg: format!(
                            "the value here (shape {:?}) cannot be viewed as this name: {e}",
                            raw.dims()
                        ),
                        suggestions: vec![],
                    })
                })?,
                None => raw,
            };
            let rows = req.rows.as_deref();
            if let Some(rows) = rows {
                let n = cur.dims().first().copied().unwrap_or(0);
                if let Some(bad) = rows.iter().find(|r| **r >= n) {
                    return Err(self.fail(crate::Error::Hookpoint {
                        path: req.name.clone(),
                        msg: format!(
                            "row {bad} was requested, but the value here has {n} rows (shape {:?})",
                            cur.dims()
                        ),
                        suggestions: vec![],
                    }));
                }
            }
            // The part of the value the request applies to: the chosen rows, or all of it.
            let part = |t: &Tensor| -> Result<Tensor> {
                match rows {
                    Some(r) => select_rows(t, r),
                    None => Ok(t.clone()),
                }
            };
            let new_part = match &req.action {
                Action::Save => {
                    let kept = part(&cur)?;
                    self.saved.borrow_mut()[ri].push(kept);
                    continue;
                }
                Action::Replace(t) => t.clone(),
                Action::Edit(f) => f(&part(&cur)?).map_err(|e| {
                    self.fail(crate::Error::Edit {
                        path: req.name.clone(),
                        msg: e.to_string(),
                    })
                })?,
                Action::CopyFrom(src) => {
                    let seen = self
                        .saved
                        .borrow()
                        .get(*src)
                        .and_then(|v| v.last().cloned());
                    let Some(seen) = seen else {
                        return Err(self.fail(crate::Error::Hookpoint {
                            path: req.name.clone(),
                            msg: format!(
                                "copies the value of `{}`, which has not run before it in this forward",
                                self.reqs.get(*src).map(|r| r.name.as_str()).unwrap_or("?")
                            ),
                            suggestions: vec![],
                        }));
                    };
                    part(&seen)?
                }
                Action::Derive { f, source, outputs } => {
                    let src = match source {
                        None => None,
                        Some(s) => {
                            let seen = self.saved.borrow().get(*s).and_then(|v| v.last().cloned());
                            let Some(seen) = seen else {
                                return Err(self.fail(crate::Error::Hookpoint {
                                    path: req.name.clone(),
                                    msg: format!(
                                        "reads the value of `{}`, which has not run before it in this forward",
                                        self.reqs.get(*s).map(|r| r.name.as_str()).unwrap_or("?")
                                    ),
                                    suggestions: vec![],
                                }));
                            };
                            Some(part(&seen)?)
                        }
                    };
                    let mut outs: Vec<Option<Tensor>> = vec![None; outputs.len()];
                    let new = f(&part(&cur)?, src.as_ref(), self.step, &mut outs).map_err(|e| {
                        self.fail(crate::Error::Edit {
                            path: req.name.clone(),
                            msg: e.to_string(),
                        })
                    })?;
                    let mut derived = self.derived.borrow_mut();
                    let slots = &mut derived[ri];
                    if slots.len() < outputs.len() {
                        slots.resize(outputs.len(), Vec::new());
                    }
                    for (k, o) in outs.into_iter().enumerate() {
                        if let Some(t) = o {
                            slots[k].push(t);
                        }
                    }
                    new
                }
                Action::Stop => {
                    self.stopped.set(true);
                    *self.interrupt.borrow_mut() = Some(Interrupt::Stop);
                    return Err(candle_core::Error::Msg("nnscope: trace stopped".into()));
                }
            };
            let new_part = self.check_new(&req.name, &part(&cur)?, new_part)?;
            let new = match rows {
                Some(r) => scatter_rows(&cur, r, &new_part)?,
                None => new_part,
            };
            let new = match &req.view {
                Some(view) => (view.write)(&new)?,
                None => new,
            };
            v.set(req.path.select, new);
        }
        Ok(v)
    }

    /// A new value must keep the old one's shape, dtype and device, so that it takes effect
    /// downstream exactly as if the model had computed it.
    fn check_new(&self, path: &str, old: &Tensor, new: Tensor) -> Result<Tensor> {
        if new.dims() != old.dims() {
            return Err(self.fail(crate::Error::ShapeMismatch {
                path: path.to_string(),
                expected: old.dims().to_vec(),
                got: new.dims().to_vec(),
            }));
        }
        let new = if new.dtype() != old.dtype() {
            if is_float(new.dtype()) && is_float(old.dtype()) {
                new.to_dtype(old.dtype())?
            } else {
                return Err(self.fail(crate::Error::DTypeMismatch {
                    path: path.to_string(),
                    expected: format!("{:?}", old.dtype()),
                    got: format!("{:?}", new.dtype()),
                }));
            }
        } else {
            new
        };
        let new = if !new.device().same_device(old.device()) {
            new.to_device(old.device())?
        } else {
            new
        };
        if self.check_finite && !all_finite(&new)? {
            return Err(self.fail(crate::Error::NonFinite {
                path: path.to_string(),
            }));
        }
        Ok(new)
    }
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// Rows `rows` of `t` along its first dimension.
fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|r| *r as u32).collect();
    let idx = Tensor::from_vec(idx, rows.len(), t.device())?;
    // A transposed value (keys, values) is not contiguous; index_select needs it to be.
    if t.is_contiguous() {
        t.index_select(&idx, 0)
    } else {
        t.contiguous()?.index_select(&idx, 0)
    }
}

/// `old` with its rows `rows` (first dimension) replaced by the rows of `new`, in order.
fn scatter_rows(old: &Tensor, rows: &[usize], new: &Tensor) -> Result<Tensor> {
    let n = old.dim(0)?;
    let mut parts = Vec::with_capacity(n);
    for i in 0..n {
        // The last occurrence wins when a row is listed twice.
        match rows.iter().rposition(|r| *r == i) {
            Some(k) => parts.push(new.narrow(0, k, 1)?),
            None => parts.push(old.narrow(0, i, 1)?),
        }
    }
    Tensor::cat(&parts, 0)
}
