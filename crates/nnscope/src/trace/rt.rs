//! The run-time half of `#[hooked]`: what the generated code calls.
//!
//! With no trace active on this thread every entry point is one thread-local read and a branch: no
//! clone, no allocation, no formatting. With a trace active, each scope (a module's forward, or a
//! call into another instrumented function) looks up the requests compiled for it once, on entry,
//! so a probe in a scope nobody asked about costs one more branch.

use super::requests::{Ctx, Kind, NONE};
use super::value::Value;
use candle_core::{Result, Tensor};
use std::cell::Cell;

/// Static description of an instrumented function: its real source and its call sites.
#[derive(Debug)]
pub struct FnInfo {
    /// `Type::method` or the function's name.
    pub name: &'static str,
    /// Source file, as the compiler saw it.
    pub file: &'static str,
    /// Line (1-based) of the `fn` keyword in `file`.
    pub first_line: u32,
    /// The function's source lines, from `first_line` to its closing brace.
    pub lines: &'static [&'static str],
    /// Hookpoint label of each call site (`self_q_proj_0`), indexed by site.
    pub labels: &'static [&'static str],
    /// Line (1-based, in `file`) of each call site.
    pub site_lines: &'static [u32],
    /// For a module's `forward`: the name of its tensor input (its `.input`), if it has one.
    pub input: Option<&'static str>,
}

impl FnInfo {
    /// Site index of a label, if the function has it.
    pub fn site(&self, label: &str) -> Option<u32> {
        self.labels
            .iter()
            .position(|l| *l == label)
            .map(|i| i as u32)
    }
}

/// A module instrumented by `#[hooked]` on its `impl` block: gives the static info of its `forward`.
pub trait HookedForward {
    /// Source and call sites of this module's `forward`.
    fn forward_info() -> &'static FnInfo;
}

/// A module's identity inside its model: where its requests are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope {
    pub(crate) id: u32,
}

/// Site index of a module's `.input`.
pub const INPUT_SITE: u32 = u32::MAX - 1;
/// Site index of a module's `.output`.
pub const OUTPUT_SITE: u32 = u32::MAX - 2;

thread_local! {
    static ACTIVE: Cell<*const Ctx<'static>> = const { Cell::new(std::ptr::null()) };
    static PENDING: Cell<u32> = const { Cell::new(NONE) };
}

/// Makes `ctx` the active trace of this thread until the guard drops.
pub(crate) struct Activation {
    prev: *const Ctx<'static>,
}

impl Activation {
    /// # Safety
    /// `ctx` must outlive the returned guard; the guard must be dropped on this thread. Both hold in
    /// `Plan::run` and `Structure::record`, which keep the context on its stack frame for the guard's whole life.
    pub(crate) unsafe fn new(ctx: &Ctx<'_>) -> Self {
        // The lifetime is erased here and restored by the guard's scope (see `with_ctx`).
        let p = (ctx as *const Ctx<'_>).cast::<Ctx<'static>>();
        let prev = ACTIVE.with(|a| a.replace(p));
        PENDING.with(|p| p.set(NONE));
        Activation { prev }
    }
}

impl Drop for Activation {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.prev));
    }
}

#[inline(always)]
fn with_ctx<R>(f: impl FnOnce(&Ctx<'_>) -> R) -> Option<R> {
    let p = ACTIVE.with(|a| a.get());
    if p.is_null() {
        None
    } else {
        // SAFETY: a non-null pointer was installed by `Activation::new`, whose guard keeps the
        // context alive and removes the pointer before the context is dropped.
        Some(f(unsafe { &*p }))
    }
}

/// Remembers the call site a callee is about to be entered from. Returns its argument unchanged.
#[inline(always)]
pub fn pend<T>(site: u32, v: T) -> T {
    PENDING.with(|p| p.set(site));
    v
}

/// Same as [`pend`], for calls whose arguments have no calls in them.
#[inline(always)]
pub fn pend0(site: u32) {
    PENDING.with(|p| p.set(site));
}

/// Whether the instrumented function about to be entered (from the call site [`pend`] recorded
/// last) can have no request run inside it or in the functions it calls: no trace is active, or the
/// active one (not a structure probe, not stopped) has nothing under that call site. When it
/// returns `true` the recorded call site is consumed (as entering the function would), so the
/// caller must then compute the function's result without entering it: a fused fast path that
/// skips instrumented inner calls checks this first, so that a trace still sees every inner call it
/// asked for. Modules entered from inside are not covered (their scopes are absolute).
#[inline(always)]
pub fn enter_quiet() -> bool {
    let quiet = with_ctx(|c| c.callee_quiet(PENDING.with(|p| p.get()))).unwrap_or(true);
    if quiet {
        PENDING.with(|p| p.set(NONE));
    }
    quiet
}

/// Leaves a scope when dropped.
pub struct ScopeGuard {
    active: bool,
}

impl Drop for ScopeGuard {
    #[inline(always)]
    fn drop(&mut self) {
        if self.active {
            with_ctx(|c| c.leave());
        }
    }
}

/// Entry of a module's `forward`: its scope is absolute (the module's path).
#[inline(always)]
pub fn enter_module(scope: &Scope, info: &'static FnInfo) -> ScopeGuard {
    let active = with_ctx(|c| {
        PENDING.with(|p| p.set(NONE));
        c.enter_module(scope.id, info)
    })
    .is_some();
    ScopeGuard { active }
}

/// Entry of any other instrumented function: its scope is the call site it was called from.
#[inline(always)]
pub fn enter_fn(info: &'static FnInfo) -> ScopeGuard {
    let active = with_ctx(|c| {
        let site = PENDING.with(|p| p.replace(NONE));
        c.enter_call(site, info)
    })
    .is_some();
    ScopeGuard { active }
}

/// A module's `.input` given by reference: `Some` when a request replaced it.
#[inline(always)]
pub fn module_input_ref(x: &Tensor, info: &'static FnInfo) -> Option<Tensor> {
    if !wants(INPUT_SITE, info, Kind::Tensor) {
        return None;
    }
    match apply(INPUT_SITE, info, Value::Tensor(x.clone()), Kind::Tensor) {
        Ok(Value::Tensor(t)) if t.id() != x.id() => Some(t),
        _ => None,
    }
}

/// A module's `.input` given by value.
#[inline(always)]
pub fn module_input_owned(x: Tensor, info: &'static FnInfo) -> Tensor {
    match module_input_ref(&x, info) {
        Some(t) => t,
        None => x,
    }
}

/// The value of one call site, on its way through the active trace's requests.
///
/// Dispatch on the value's type is done at compile time by method resolution ("autoref
/// specialization"): the `Probe*` traits below are implemented for `Probe<Tensor>`,
/// `Probe<Result<Tensor>>` and pairs, and [`ProbeAny`] for `&Probe<T>`, which the compiler only picks
/// when none of the tensor impls fits. So non-tensor calls compile to the identity.
pub struct Probe<T> {
    value: Cell<Option<T>>,
    site: u32,
    info: &'static FnInfo,
}

impl<T> Probe<T> {
    /// Wraps a call's value.
    #[inline(always)]
    pub fn new(v: T, site: u32, info: &'static FnInfo) -> Self {
        Probe {
            value: Cell::new(Some(v)),
            site,
            info,
        }
    }
    #[inline(always)]
    fn take(&self) -> T {
        match self.value.take() {
            Some(v) => v,
            // `probe` is the only caller and consumes the wrapper, so the value is always there.
            None => unreachable!("probe value taken twice"),
        }
    }
}

/// Fallback for calls that return no tensor: the identity (recorded as read-only when tracing).
pub trait ProbeAny<T> {
    /// Returns the call's value unchanged.
    fn probe(&self) -> T;
}
impl<T> ProbeAny<T> for &Probe<T> {
    #[inline(always)]
    fn probe(&self) -> T {
        let v = self.take();
        with_ctx(|c| c.wants(self.site, self.info, Kind::Other));
        v
    }
}

/// Whether the active trace has a request at `site` in the current scope (recording its kind when
/// the trace is a structure probe). `false` when no trace is active.
#[inline(always)]
fn wants(site: u32, info: &'static FnInfo, kind: Kind) -> bool {
    with_ctx(|c| c.wants(site, info, kind)).unwrap_or(false)
}

#[inline(always)]
fn apply(site: u32, info: &'static FnInfo, v: Value, kind: Kind) -> Result<Value> {
    match with_ctx(|c| c.apply(site, info, v, kind)) {
        Some(r) => r,
        None => Err(candle_core::Error::Msg("nnscope: no active trace".into())),
    }
}

/// Calls returning a tensor.
pub trait ProbeTensor {
    /// Passes the tensor through the trace's requests for this site.
    fn probe(&self) -> Tensor;
}
impl ProbeTensor for Probe<Tensor> {
    #[inline(always)]
    fn probe(&self) -> Tensor {
        let t = self.take();
        if !wants(self.site, self.info, Kind::Tensor) {
            return t;
        }
        let keep = t.clone();
        match apply(self.site, self.info, Value::Tensor(t), Kind::Tensor) {
            Ok(Value::Tensor(n)) => n,
            // A plain tensor cannot carry an error: the trace recorded it and the runner reports it.
            _ => keep,
        }
    }
}

/// Calls returning `Result<Tensor>`.
pub trait ProbeResult {
    /// Passes the tensor through the trace's requests for this site.
    fn probe(&self) -> Result<Tensor>;
}
impl ProbeResult for Probe<Result<Tensor>> {
    #[inline(always)]
    fn probe(&self) -> Result<Tensor> {
        let r = self.take();
        if !wants(self.site, self.info, Kind::Tensor) {
            return r;
        }
        match apply(self.site, self.info, Value::Tensor(r?), Kind::Tensor)? {
            Value::Tensor(n) => Ok(n),
            Value::Tuple(_) => Err(candle_core::Error::Msg(
                "nnscope: tuple for a tensor".into(),
            )),
        }
    }
}

/// Probes for tuples of tensors (attention interfaces return pairs, MoE routers triples), plain
/// and in a `Result`. One macro so every arity behaves the same.
macro_rules! tuple_probes {
    ($plain:ident, $result:ident, $n:literal, $tuple:ty, $($v:ident),+) => {
        /// Calls returning a tuple of tensors.
        pub trait $plain {
            /// Passes the tuple through the trace's requests for this site.
            fn probe(&self) -> $tuple;
        }
        impl $plain for Probe<$tuple> {
            #[inline(always)]
            fn probe(&self) -> $tuple {
                let v = self.take();
                if !wants(self.site, self.info, Kind::Tuple($n)) {
                    return v;
                }
                let keep = v.clone();
                let ($($v,)+) = v;
                apply(self.site, self.info, Value::Tuple(vec![$($v),+]), Kind::Tuple($n))
                    .and_then(|v| {
                        let mut it = into_tuple(v, $n)?.into_iter();
                        Ok(($({
                            let $v = it.next();
                            $v.ok_or_else(|| tuple_error($n))?
                        },)+))
                    })
                    .unwrap_or(keep)
            }
        }
        /// Calls returning `Result` of a tuple of tensors.
        pub trait $result {
            /// Passes the tuple through the trace's requests for this site.
            fn probe(&self) -> Result<$tuple>;
        }
        impl $result for Probe<Result<$tuple>> {
            #[inline(always)]
            fn probe(&self) -> Result<$tuple> {
                let r = self.take();
                if !wants(self.site, self.info, Kind::Tuple($n)) {
                    return r;
                }
                let ($($v,)+) = r?;
                let v = apply(self.site, self.info, Value::Tuple(vec![$($v),+]), Kind::Tuple($n))?;
                let mut it = into_tuple(v, $n)?.into_iter();
                Ok(($({
                    let $v = it.next();
                    $v.ok_or_else(|| tuple_error($n))?
                },)+))
            }
        }
    };
}

fn tuple_error(n: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!("nnscope: a tuple of {n} tensors was expected"))
}

fn into_tuple(v: Value, n: usize) -> Result<Vec<Tensor>> {
    match v {
        Value::Tuple(v) if v.len() == n => Ok(v),
        _ => Err(tuple_error(n)),
    }
}

tuple_probes!(ProbePair, ProbePairResult, 2, (Tensor, Tensor), a, b);
tuple_probes!(
    ProbeTriple,
    ProbeTripleResult,
    3,
    (Tensor, Tensor, Tensor),
    a,
    b,
    c
);
tuple_probes!(
    ProbeQuad,
    ProbeQuadResult,
    4,
    (Tensor, Tensor, Tensor, Tensor),
    a,
    b,
    c,
    d
);
