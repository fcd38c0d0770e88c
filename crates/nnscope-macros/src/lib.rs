//! `#[hooked]`: turns every call inside a forward function into a named hookpoint.
//!
//! Model code stays plain candle code that mirrors the Python it ports; this attribute rewrites it at
//! compile time so that
//! - every call expression passes its value through a probe for its call site (a branch when no trace
//!   is active, so a hookpoint nobody asked for costs next to nothing),
//! - each call site gets nnsight's name (`self_q_proj_0`, `nn_functional_dropout_0`, `reshape_0`, ...),
//!   numbered statically over the whole function in evaluation order,
//! - the function's real source lines and its table of sites are emitted as a static `FnInfo`, which is
//!   what `nnscope source` prints.
//!
//! Put it on a free function or on an `impl` block. In an `impl` block every method is instrumented;
//! the method called `forward` is the module's forward: it enters the module's own scope (read from the
//! struct's `scope` field), and its first tensor argument and its return value are the module's
//! `.input` and `.output`.
//!
//! Naming rule (nnsight's `.source` rule, adapted to Rust):
//! - `a::b::f(..)` -> `a_b_f`; a method on a variable or field chain -> chain + method
//!   (`key_states.transpose(..)` -> `key_states_transpose`); a method on a call result -> the method
//!   alone (`reshape`); `x.forward(..)` is Python's `x(..)` and is named by the receiver alone
//!   (`self.q_proj.forward(x)` -> `self_q_proj`).
//! - Operators, `?`, indexing, field reads, macros, closures' bodies and constructors (`Ok(..)`,
//!   `Some(..)`, any path whose last segment starts with a capital letter) are not hookpoints.
//! - Methods whose result type is only known from later use (`collect`, `into`, `parse`, ...) are left
//!   alone, since wrapping them would break type inference.
//!
//! One call is also redirected: `x.matmul(y)` (a hookpoint named as above) runs
//! `nnscope::nn::ops::matmul(&x, y)`, candle's product with a faster kernel for bfloat16 on CPUs
//! with AMX, so receivers of `.matmul` in instrumented code must be tensors.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use std::collections::HashMap;
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{parse_macro_input, Expr, FnArg, ImplItem, Item, ItemFn, ItemImpl, Pat, Type};

/// Methods whose return type is inferred from their use; wrapping them in a probe breaks inference.
const INFERENCE_SENSITIVE: &[&str] = &[
    "collect",
    "into",
    "try_into",
    "parse",
    "sum",
    "product",
    "default",
    "from_iter",
    "unwrap_or_default",
    "to_owned",
    "as_ref",
    "borrow",
];

/// Site index reserved for a module's `.input`.
const INPUT_SITE: u32 = u32::MAX - 1;
/// Site index reserved for a module's `.output`.
const OUTPUT_SITE: u32 = u32::MAX - 2;

/// Instrument a function or every method of an `impl` block. See the crate documentation.
#[proc_macro_attribute]
pub fn hooked(attr: TokenStream, item: TokenStream) -> TokenStream {
    // `#[hooked(passthrough)]` on one item, or the whole build without the `hooks` feature (nnscope's
    // default `hooks` feature forwards to ours): emit the plain function, keeping only the static
    // source listing. Used to measure what the instrumentation costs when nothing is requested.
    let passthrough =
        (!attr.is_empty() && attr.to_string().contains("passthrough")) || !cfg!(feature = "hooks");
    let item = parse_macro_input!(item as Item);
    let out = match item {
        Item::Fn(f) => instrument_free_fn(f, passthrough),
        Item::Impl(i) => instrument_impl(i, passthrough),
        other => syn::Error::new(
            other.span(),
            "#[hooked] goes on a function or an impl block",
        )
        .to_compile_error(),
    };
    out.into()
}

/// One call site found in a function body.
struct SiteRec {
    label: String,
    line: usize,
}

struct Rewriter {
    sites: Vec<SiteRec>,
    counts: HashMap<String, usize>,
    info: syn::Ident,
    rewrite: bool,
}

impl Rewriter {
    fn new(info: syn::Ident, rewrite: bool) -> Self {
        Rewriter {
            sites: Vec::new(),
            counts: HashMap::new(),
            info,
            rewrite,
        }
    }

    fn new_site(&mut self, base: String, span: Span) -> (u32, String) {
        let n = self.counts.entry(base.clone()).or_insert(0);
        let label = format!("{base}_{n}");
        *n += 1;
        self.sites.push(SiteRec {
            label: label.clone(),
            line: span.start().line,
        });
        ((self.sites.len() - 1) as u32, label)
    }
}

/// `self.q_proj` -> Some(["self", "q_proj"]); `x` -> Some(["x"]); `self.layers[i]` -> ["self", "layers"].
fn place_chain(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Path(p) if p.qself.is_none() => Some(
            p.path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect(),
        ),
        Expr::Field(f) => {
            let mut base = place_chain(&f.base)?;
            match &f.member {
                syn::Member::Named(id) => base.push(id.to_string()),
                syn::Member::Unnamed(ix) => base.push(ix.index.to_string()),
            }
            Some(base)
        }
        Expr::Index(ix) => place_chain(&ix.expr),
        Expr::Paren(p) => place_chain(&p.expr),
        Expr::Reference(r) => place_chain(&r.expr),
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => place_chain(&u.expr),
        _ => None,
    }
}

/// Whether an expression contains a call that will be instrumented (closures and macros are opaque).
fn contains_call(e: &Expr) -> bool {
    struct Finder(bool);
    impl<'a> syn::visit::Visit<'a> for Finder {
        fn visit_expr_call(&mut self, _: &'a syn::ExprCall) {
            self.0 = true;
        }
        fn visit_expr_method_call(&mut self, _: &'a syn::ExprMethodCall) {
            self.0 = true;
        }
        fn visit_expr_closure(&mut self, _: &'a syn::ExprClosure) {}
        fn visit_item(&mut self, _: &'a Item) {}
    }
    let mut f = Finder(false);
    syn::visit::Visit::visit_expr(&mut f, e);
    f.0
}

/// `ops::add(a, b)` and the like: Python's arithmetic operators written as functions
/// (`nnscope::nn::ops`). Operators are not calls in Python, so nnsight has no hookpoint for them,
/// and neither do we.
fn is_operator(path: &syn::Path) -> bool {
    let n = path.segments.len();
    n >= 2 && path.segments[n - 2].ident == "ops"
}

fn is_constructor(path: &syn::Path) -> bool {
    path.segments
        .last()
        .map(|s| {
            s.ident
                .to_string()
                .chars()
                .next()
                .is_some_and(|c| c.is_uppercase())
        })
        .unwrap_or(false)
}

impl VisitMut for Rewriter {
    fn visit_expr_closure_mut(&mut self, _: &mut syn::ExprClosure) {
        // Closure bodies run later, inside whatever calls them: they are not call sites of this function.
    }
    fn visit_item_mut(&mut self, _: &mut Item) {}

    fn visit_expr_mut(&mut self, e: &mut Expr) {
        match e {
            Expr::Call(call) => {
                let base = match &*call.func {
                    Expr::Path(p)
                        if p.qself.is_none()
                            && !is_constructor(&p.path)
                            && !is_operator(&p.path) =>
                    {
                        Some(
                            p.path
                                .segments
                                .iter()
                                .map(|s| s.ident.to_string())
                                .collect::<Vec<_>>()
                                .join("_"),
                        )
                    }
                    Expr::Path(_) => None,
                    other => place_chain(other).map(|c| c.join("_")),
                };
                // Arguments are evaluated (and numbered) before the call itself.
                for a in call.args.iter_mut() {
                    self.visit_expr_mut(a);
                }
                let Some(base) = base else { return };
                let span = call.func.span();
                let (site, _) = self.new_site(base, span);
                if !self.rewrite {
                    return;
                }
                mark_pending(call.args.iter_mut().collect(), None, site);
                let inner = Expr::Call(call.clone());
                *e = probe_expr(inner, site, &self.info, span);
            }
            Expr::MethodCall(mc) => {
                let method = mc.method.to_string();
                let chain = place_chain(&mc.receiver);
                self.visit_expr_mut(&mut mc.receiver);
                for a in mc.args.iter_mut() {
                    self.visit_expr_mut(a);
                }
                if INFERENCE_SENSITIVE.contains(&method.as_str()) || mc.turbofish.is_some() {
                    return;
                }
                let base = match (&chain, method.as_str()) {
                    (Some(c), "forward") => c.join("_"),
                    (Some(c), _) => format!("{}_{}", c.join("_"), method),
                    (None, _) => method.clone(),
                };
                let span = mc.method.span();
                let (site, _) = self.new_site(base, span);
                if !self.rewrite {
                    return;
                }
                let recv_has_call = contains_call(&mc.receiver);
                let recv = if recv_has_call {
                    Some(&mut *mc.receiver)
                } else {
                    None
                };
                mark_pending(mc.args.iter_mut().collect(), recv, site);
                let inner = if method == "matmul" && mc.args.len() == 1 {
                    // Same product, through nnscope's kernel where it has a faster one (see
                    // `nnscope::nn::ops::matmul`). Receiver first, then the argument, as before.
                    let (r, a) = (&mc.receiver, &mc.args[0]);
                    syn::parse_quote_spanned!(span=> ::nnscope::__rt::matmul(&(#r), #a))
                } else {
                    Expr::MethodCall(mc.clone())
                };
                *e = probe_expr(inner, site, &self.info, span);
            }
            _ => visit_mut::visit_expr_mut(self, e),
        }
    }
}

/// Tell a callee which call site it is entered from, right after the last argument that has any
/// calls in it is evaluated (arguments after it have no side effects), so that calls inside the
/// arguments are never attributed to the callee's scope.
fn mark_pending(args: Vec<&mut Expr>, receiver: Option<&mut Expr>, site: u32) {
    if let Some(last) = args.into_iter().filter(|a| contains_call(a)).last() {
        let old = last.clone();
        *last = syn::parse_quote_spanned!(old.span()=> ::nnscope::__rt::pend(#site, #old));
        return;
    }
    // No argument has calls: when the receiver has some, mark after it; otherwise setting the site
    // just before the call expression is enough, which the probe wrapper does (`pend0`).
    if let Some(r) = receiver {
        let old = r.clone();
        *r = syn::parse_quote_spanned!(old.span()=> ::nnscope::__rt::pend(#site, #old));
    }
}

fn probe_expr(inner: Expr, site: u32, info: &syn::Ident, span: Span) -> Expr {
    syn::parse2(quote_spanned! {span=>
        {
            #[allow(unused_imports)]
            use ::nnscope::__rt::{ProbeAny as _, ProbeTensor as _, ProbeResult as _, ProbePair as _, ProbePairResult as _, ProbeTriple as _, ProbeTripleResult as _, ProbeQuad as _, ProbeQuadResult as _};
            ::nnscope::__rt::pend0(#site);
            (&::nnscope::__rt::Probe::new(#inner, #site, &#info)).probe()
        }
    })
    .expect("probe expression parses")
}

/// Source lines of a function, read from its file at compile time.
fn source_lines(start: Span, end_line: usize) -> (String, usize, Vec<String>) {
    let file = start.file();
    let first = start.start().line;
    let mut lines = Vec::new();
    let path = start.local_file().unwrap_or_else(|| file.clone().into());
    let candidates = [
        path.clone(),
        std::env::var("CARGO_MANIFEST_DIR")
            .map(|d| std::path::Path::new(&d).join(&path))
            .unwrap_or_else(|_| path.clone()),
    ];
    for c in candidates.iter() {
        if let Ok(text) = std::fs::read_to_string(c) {
            lines = text
                .lines()
                .skip(first.saturating_sub(1))
                .take(end_line + 1 - first)
                .map(|l| l.to_string())
                .collect();
            break;
        }
    }
    (file, first, lines)
}

struct FnParts {
    info_ident: syn::Ident,
    info_static: TokenStream2,
}

fn build_info(
    display_name: &str,
    info_ident: &syn::Ident,
    sig_span: Span,
    end_line: usize,
    sites: &[SiteRec],
    input: Option<String>,
) -> TokenStream2 {
    let (file, first, lines) = source_lines(sig_span, end_line);
    let labels = sites.iter().map(|s| s.label.as_str());
    let site_lines = sites.iter().map(|s| s.line as u32);
    let first = first as u32;
    let input = match input {
        Some(i) => quote!(::core::option::Option::Some(#i)),
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        pub static #info_ident: ::nnscope::__rt::FnInfo = ::nnscope::__rt::FnInfo {
            name: #display_name,
            file: #file,
            first_line: #first,
            lines: &[#(#lines),*],
            labels: &[#(#labels),*],
            site_lines: &[#(#site_lines),*],
            input: #input,
        };
    }
}

/// Instrument one function body. `module_forward` is true for a module's `forward` method.
fn instrument_fn(
    sig: &syn::Signature,
    block: &mut syn::Block,
    display_name: String,
    info_ident: syn::Ident,
    module_forward: bool,
    passthrough: bool,
) -> FnParts {
    let sig_span = sig.fn_token.span;
    let end_line = block.brace_token.span.close().end().line;
    let mut rw = Rewriter::new(info_ident.clone(), !passthrough);
    rw.visit_block_mut(block);
    let input_name = if module_forward {
        forward_input(sig).map(|(n, _)| n.to_string())
    } else {
        None
    };
    let info_static = build_info(
        &display_name,
        &info_ident,
        sig_span,
        end_line,
        &rw.sites,
        input_name,
    );
    if passthrough {
        if module_forward {
            // The plain forward no longer reads `self.scope`; keep the field used (no dead-code lint).
            block
                .stmts
                .insert(0, syn::parse_quote!(let _ = &self.scope;));
        }
        return FnParts {
            info_ident,
            info_static,
        };
    }
    let body = block.clone();
    let ret_ty = match &sig.output {
        syn::ReturnType::Default => quote!(()),
        syn::ReturnType::Type(_, t) => quote!(#t),
    };
    let new_block: syn::Block = if module_forward {
        // The module's `.input` is its first tensor argument.
        let input_hook = forward_input(sig).map(|(name, by_ref)| {
            if by_ref {
                quote! {
                    let __nns_input_slot = ::nnscope::__rt::module_input_ref(#name, &#info_ident);
                    let #name: &::nnscope::__rt::Tensor = match &__nns_input_slot {
                        ::core::option::Option::Some(t) => t,
                        ::core::option::Option::None => #name,
                    };
                }
            } else {
                quote! {
                    let #name = ::nnscope::__rt::module_input_owned(#name, &#info_ident);
                }
            }
        });
        let out_site = OUTPUT_SITE;
        let _ = INPUT_SITE;
        syn::parse2(quote! {{
            let __nns_scope = ::nnscope::__rt::enter_module(&self.scope, &#info_ident);
            #input_hook
            #[allow(clippy::redundant_closure_call)]
            let __nns_out = (|| -> #ret_ty #body)();
            #[allow(unused_imports)]
            use ::nnscope::__rt::{ProbeAny as _, ProbeTensor as _, ProbeResult as _, ProbePair as _, ProbePairResult as _, ProbeTriple as _, ProbeTripleResult as _, ProbeQuad as _, ProbeQuadResult as _};
            let __nns_out = (&::nnscope::__rt::Probe::new(__nns_out, #out_site, &#info_ident)).probe();
            drop(__nns_scope);
            __nns_out
        }})
        .expect("module forward parses")
    } else {
        syn::parse2(quote! {{
            let __nns_scope = ::nnscope::__rt::enter_fn(&#info_ident);
            #[allow(clippy::redundant_closure_call)]
            let __nns_out = (|| -> #ret_ty #body)();
            drop(__nns_scope);
            __nns_out
        }})
        .expect("function body parses")
    };
    *block = new_block;
    FnParts {
        info_ident,
        info_static,
    }
}

/// The first argument of a module forward, if it is a tensor (`&Tensor` or `Tensor`): its name and
/// whether it is taken by reference.
fn forward_input(sig: &syn::Signature) -> Option<(syn::Ident, bool)> {
    let FnArg::Typed(pt) = sig.inputs.iter().nth(1)? else {
        return None;
    };
    let Pat::Ident(id) = &*pt.pat else {
        return None;
    };
    match &*pt.ty {
        Type::Reference(r) if type_is_tensor(&r.elem) => Some((id.ident.clone(), true)),
        t if type_is_tensor(t) => Some((id.ident.clone(), false)),
        _ => None,
    }
}

fn type_is_tensor(t: &Type) -> bool {
    match t {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "Tensor" && s.arguments.is_empty()),
        _ => false,
    }
}

fn instrument_free_fn(mut f: ItemFn, passthrough: bool) -> TokenStream2 {
    let name = f.sig.ident.to_string();
    let info = format_ident!("__NNSCOPE_FN_{}", name);
    let parts = instrument_fn(&f.sig, &mut f.block, name, info, false, passthrough);
    let info_static = parts.info_static;
    let ident = &f.sig.ident;
    let vis = &f.vis;
    let info_ident = parts.info_ident;
    let info_fn = format_ident!("{}_source", ident);
    quote! {
        #f
        #info_static
        /// The static source listing and call sites of this instrumented function.
        #[allow(dead_code)]
        #vis fn #info_fn() -> &'static ::nnscope::__rt::FnInfo { &#info_ident }
    }
}

fn instrument_impl(mut imp: ItemImpl, passthrough: bool) -> TokenStream2 {
    let ty_name = match &*imp.self_ty {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_else(|| "Self".into()),
        _ => "Self".into(),
    };
    let mut statics = Vec::new();
    let mut forward_info = None;
    for item in imp.items.iter_mut() {
        let ImplItem::Fn(m) = item else { continue };
        let name = m.sig.ident.to_string();
        let has_self = matches!(m.sig.inputs.first(), Some(FnArg::Receiver(_)));
        let module_forward = name == "forward" && has_self && imp.trait_.is_none();
        let info = format_ident!("__NNSCOPE_FN_{}_{}", ty_name, name);
        let parts = instrument_fn(
            &m.sig,
            &mut m.block,
            format!("{ty_name}::{name}"),
            info,
            module_forward,
            passthrough,
        );
        statics.push(parts.info_static);
        if module_forward {
            forward_info = Some(parts.info_ident);
        }
    }
    let self_ty = &imp.self_ty;
    let (impl_generics, _, where_clause) = imp.generics.split_for_impl();
    let fwd = forward_info.map(|i| {
        quote! {
            impl #impl_generics ::nnscope::__rt::HookedForward for #self_ty #where_clause {
                fn forward_info() -> &'static ::nnscope::__rt::FnInfo { &#i }
            }
        }
    });
    quote! {
        #imp
        #(#statics)*
        #fwd
    }
}
