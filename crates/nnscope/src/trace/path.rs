//! Hookpoint paths: `<module path>(.source.<label>)*.(output|input)[.<index>]`.
//!
//! The module path uses Hugging Face attribute names (`transformer.h.3.attn`); the target's own
//! names (standard names) are expanded first ([`Target::expand_path`]). Paths are checked against
//! the static call-site tables and the recorded structure before anything runs, and a typo gets
//! the nearest valid names.

use super::requests::Kind;
use super::rt::{FnInfo, Scope, INPUT_SITE, OUTPUT_SITE};
use super::target::Target;
use crate::{nearest, Error, Result};

/// Which value of a module or call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// `.output`.
    Output,
    /// `.input` (modules only: their first tensor argument).
    Input,
}

/// A resolved hookpoint.
#[derive(Debug, Clone)]
pub struct HookPath {
    /// The path as given.
    pub given: String,
    /// The path with standard names expanded.
    pub canonical: String,
    /// The module whose forward holds the hookpoint (or whose input/output it is).
    pub module: Scope,
    /// Call sites entered below the module (each `.source.<label>` but the last).
    pub calls: Vec<u32>,
    /// The site in the innermost scope (a call site, or a module's input/output).
    pub site: u32,
    /// Output or input.
    pub terminal: Terminal,
    /// Element of a tuple value.
    pub select: Option<usize>,
    /// Why the value cannot be written, if it cannot.
    pub read_only: Option<String>,
    /// What the site returns, when known from the recorded structure.
    pub kind: Option<Kind>,
}

fn err(path: &str, msg: impl Into<String>, suggestions: Vec<String>) -> Error {
    Error::Hookpoint {
        path: path.to_string(),
        msg: msg.into(),
        suggestions,
    }
}

/// Resolves `given` against `model`.
pub fn resolve(model: &dyn Target, given: &str) -> Result<HookPath> {
    let canonical = model.expand_path(given)?;
    let tokens: Vec<&str> = if canonical.is_empty() {
        vec![]
    } else {
        canonical.split('.').collect()
    };
    // Longest prefix naming a module (the root module has the empty path).
    let mut found = None;
    for i in (0..=tokens.len()).rev() {
        let p = tokens[..i].join(".");
        if let Some((scope, entry)) = model.module_table().find(&p) {
            found = Some((i, scope, entry));
            break;
        }
    }
    let Some((i, module, entry)) = found else {
        return Err(err(given, "no such module", suggestions_for(model, given)));
    };
    let rest = &tokens[i..];
    if rest.is_empty() {
        return Err(err(
            given,
            "is a module, not a value: add `.output` or `.input` (or use a standard name such as `layers_output.0`)",
            vec![format!("{given}.output"), format!("{given}.input")],
        ));
    }
    let mut info: &'static FnInfo = entry.forward;
    let mut calls: Vec<u32> = Vec::new();
    let mut snode: Option<&super::structure::SNode> = None;
    let mut structure_loaded = false;
    let mut k = 0;
    let mut site = None;
    let mut labels: Vec<&str> = Vec::new();
    while k < rest.len() && rest[k] == "source" {
        let Some(label) = rest.get(k + 1) else {
            return Err(err(
                given,
                "`.source` must be followed by a hookpoint name",
                first_labels(info),
            ));
        };
        let Some(s) = info.site(label) else {
            return Err(err(
                given,
                format!(
                    "`{label}` is not a hookpoint of {} (run `nnscope source` to list them)",
                    info.name
                ),
                nearest(label, info.labels.iter().copied(), 3),
            ));
        };
        if !structure_loaded {
            structure_loaded = true;
            snode = model
                .call_structure()?
                .modules
                .get(module.id as usize)
                .and_then(|m| m.as_ref());
        }
        if let Some(prev) = site.take() {
            // The previous label must be a call into an instrumented function.
            calls.push(prev);
            let _ = prev;
        }
        labels.push(label);
        site = Some(s);
        k += 2;
        if rest.get(k) == Some(&"source") {
            let next = snode.and_then(|n| n.call(s));
            match next {
                Some(n) => {
                    info = n.info;
                    snode = Some(n);
                }
                None => {
                    return Err(err(
                        given,
                        format!(
                        "`{label}` does not call an instrumented function, so it has no `.source`"
                    ),
                        vec![format!("{}.output", rest[..k].join("."))],
                    ))
                }
            }
        }
    }
    let term_tok = rest.get(k).copied();
    let terminal = match term_tok {
        Some("output") => Terminal::Output,
        Some("input") => Terminal::Input,
        None if site.is_some() => {
            return Err(err(
                given,
                "a hookpoint needs `.output` to be read or written",
                vec![format!("{given}.output")],
            ))
        }
        Some(other) if site.is_none() => {
            return Err(unknown_module(model, given, &tokens, i, other))
        }
        Some(other) => {
            return Err(err(
                given,
                format!("unexpected `{other}`"),
                nearest(other, ["source", "output"], 1),
            ));
        }
        None => {
            return Err(err(
                given,
                "a module path needs `.output` or `.input`",
                vec![format!("{given}.output")],
            ))
        }
    };
    k += 1;
    let select = match rest.get(k) {
        None => None,
        Some(ix) => match ix.parse::<usize>() {
            Ok(n) if k + 1 == rest.len() => Some(n),
            _ => {
                return Err(err(
                    given,
                    format!(
                        "unexpected `{}` after `.{}`",
                        rest[k..].join("."),
                        term_tok.unwrap_or("")
                    ),
                    vec![],
                ))
            }
        },
    };
    let (site, kind, read_only) = match (site, terminal) {
        (Some(_), Terminal::Input) => {
            return Err(err(
                given,
                "call sites have only `.output`; `.input` belongs to modules",
                vec![given.trim_end_matches(".input").to_string() + ".output"],
            ))
        }
        (Some(s), Terminal::Output) => {
            let kind = snode.and_then(|n| n.kind(s));
            (s, kind, None)
        }
        (None, Terminal::Output) => {
            // Module outputs are usually tensors; some (DBRX's norm_attn_norm) are tuples.
            let kind = model
                .call_structure()?
                .modules
                .get(module.id as usize)
                .and_then(|m| m.as_ref())
                .and_then(|n| n.kind(OUTPUT_SITE))
                .or(Some(Kind::Tensor));
            (OUTPUT_SITE, kind, None)
        }
        (None, Terminal::Input) => {
            if info.input.is_none() {
                return Err(err(
                    given,
                    format!("{} takes no tensor input to hook", info.name),
                    vec![],
                ));
            }
            (INPUT_SITE, Some(Kind::Tensor), None)
        }
    };
    // A standard value name (`attentions_output.0`) on a module returning a tuple means its first
    // element, as nnterp's accessors take `output[0]`.
    let select = match (kind, select) {
        (Some(Kind::Tuple(_)), None) if site == OUTPUT_SITE && canonical != given => Some(0),
        _ => select,
    };
    match (kind, select) {
        (Some(Kind::Other), _) => {
            return Err(err(
                given,
                "this call returns no tensor, so its `.output` cannot be saved or set",
                vec![],
            ))
        }
        (Some(Kind::Tuple(n)), None) => {
            return Err(err(
                given,
                format!("this call returns a tuple of {n} tensors: pick one"),
                (0..n).map(|i| format!("{given}.{i}")).collect(),
            ))
        }
        (Some(Kind::Tuple(n)), Some(i)) if i >= n => {
            return Err(err(
                given,
                format!("index {i} is past the end of a tuple of {n} tensors"),
                vec![],
            ))
        }
        (Some(Kind::Tensor), Some(i)) if i > 0 => {
            return Err(err(
                given,
                "this value is a single tensor, not a tuple",
                vec![],
            ))
        }
        _ => {}
    }
    Ok(HookPath {
        given: given.to_string(),
        canonical,
        module,
        calls,
        site,
        terminal,
        select,
        read_only,
        kind,
    })
}

/// The error for a path that leaves the module tree: names the first token that matches no module
/// (an index past the end of a module list gets the list's length), with the nearest valid names.
fn unknown_module(
    model: &dyn Target,
    given: &str,
    tokens: &[&str],
    found: usize,
    other: &str,
) -> Error {
    let is_prefix = |p: &str| {
        let dotted = format!("{p}.");
        model
            .module_table()
            .entries
            .iter()
            .any(|e| e.path == p || e.path.starts_with(&dotted))
    };
    // Descend past the found module as far as the tokens still lead towards some module.
    let mut j = found;
    while j < tokens.len() && is_prefix(&tokens[..=j].join(".")) {
        j += 1;
    }
    let parent = tokens[..j].join(".");
    let bad = tokens.get(j).copied().unwrap_or(other);
    let dotted = format!("{parent}.");
    let mut children: Vec<&str> = Vec::new();
    for e in &model.module_table().entries {
        let rest = if parent.is_empty() {
            Some(e.path.as_str())
        } else {
            e.path.strip_prefix(&dotted)
        };
        if let Some(child) = rest
            .and_then(|r| r.split('.').next())
            .filter(|c| !c.is_empty())
        {
            if !children.contains(&child) {
                children.push(child);
            }
        }
    }
    let numbered = !children.is_empty() && children.iter().all(|c| c.parse::<usize>().is_ok());
    if numbered && bad.parse::<usize>().is_ok() {
        let n = children.len();
        return err(
            given,
            format!(
                "`{parent}` has {n} entries (0..{}), so there is no `{parent}.{bad}`",
                n.saturating_sub(1)
            ),
            vec![format!("{parent}.{}", n.saturating_sub(1))],
        );
    }
    let mut cands: Vec<&str> = children.clone();
    if j == found {
        cands.extend(["source", "output", "input"]);
    }
    if parent.is_empty() {
        cands.extend(model.extra_names().iter().copied());
    }
    let what = if parent.is_empty() {
        format!("`{bad}` is neither a standard name nor a module of the model")
    } else if j == found {
        format!("unexpected `{bad}` after module `{parent}`")
    } else {
        format!("`{parent}` has no `{bad}`")
    };
    err(given, what, nearest(bad, cands, 3))
}

fn first_labels(info: &FnInfo) -> Vec<String> {
    info.labels.iter().take(3).map(|s| s.to_string()).collect()
}

fn suggestions_for(model: &dyn Target, given: &str) -> Vec<String> {
    let mut cands: Vec<String> = model
        .module_table()
        .entries
        .iter()
        .map(|e| e.path.clone())
        .collect();
    cands.extend(model.extra_names().iter().map(|s| s.to_string()));
    // Compare like with like: a standard name with its first segment, a module path with as many
    // segments as were given.
    let first = given.split('.').next().unwrap_or(given);
    let mut out: Vec<String> = nearest(first, model.extra_names().iter().copied(), 2)
        .into_iter()
        .map(|s| match given.split_once('.') {
            Some((_, tail)) => format!("{s}.{tail}"),
            None => s,
        })
        .collect();
    let n = given.split('.').count();
    let trimmed: Vec<String> = cands
        .iter()
        .map(|c| c.split('.').take(n).collect::<Vec<_>>().join("."))
        .collect();
    for s in nearest(given, trimmed.iter().map(|s| s.as_str()), 3) {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.truncate(3);
    out
}

/// The instrumented function a listing path names: a module (`attentions.0`, `model.layers.0.mlp`)
/// or a call into another instrumented function (`attentions.0.source.attention_interface_0`).
/// A trailing `.source` is accepted.
pub fn resolve_function(model: &dyn Target, given: &str) -> Result<&'static FnInfo> {
    let trimmed = given.trim_end_matches(".source");
    let canonical = model.expand_path(trimmed)?;
    let tokens: Vec<&str> = if canonical.is_empty() {
        vec![]
    } else {
        canonical.split('.').collect()
    };
    let mut found = None;
    for i in (0..=tokens.len()).rev() {
        if let Some((scope, entry)) = model.module_table().find(&tokens[..i].join(".")) {
            found = Some((i, scope, entry));
            break;
        }
    }
    let Some((i, module, entry)) = found else {
        return Err(err(given, "no such module", suggestions_for(model, given)));
    };
    let rest = &tokens[i..];
    let mut info = entry.forward;
    if rest.is_empty() {
        return Ok(info);
    }
    let structure = model.call_structure()?;
    let mut node = structure
        .modules
        .get(module.id as usize)
        .and_then(|m| m.as_ref());
    let mut k = 0;
    while k < rest.len() {
        if rest[k] != "source" || k + 1 >= rest.len() {
            return Err(err(
                given,
                format!(
                    "expected `.source.<hookpoint>` at `{}`",
                    rest[k..].join(".")
                ),
                vec![],
            ));
        }
        let label = rest[k + 1];
        let site = info.site(label).ok_or_else(|| {
            err(
                given,
                format!("`{label}` is not a hookpoint of {}", info.name),
                nearest(label, info.labels.iter().copied(), 3),
            )
        })?;
        let next = node.and_then(|n| n.call(site)).ok_or_else(|| {
            err(
                given,
                format!("`{label}` does not call an instrumented function, so it has no source"),
                vec![],
            )
        })?;
        info = next.info;
        node = Some(next);
        k += 2;
    }
    Ok(info)
}
