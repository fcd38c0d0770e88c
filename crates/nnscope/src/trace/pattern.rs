//! Every hookpoint of a target, listed, and path patterns matched against them: `*` stands for one
//! path segment, `**` for any number of segments (none included), as in
//! `model.layers.*.self_attn.**`.

use super::requests::Kind;
use super::rt::{FnInfo, OUTPUT_SITE};
use super::structure::SNode;
use super::target::Target;
use crate::Result;

/// What [`hookpoints`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Module inputs and outputs and every call site (nested `.source` included).
    All,
    /// Module outputs only (TransformerLens's `run_with_cache`).
    ModuleOutputs,
}

fn push_value(out: &mut Vec<String>, base: String, kind: Option<Kind>) {
    match kind {
        Some(Kind::Tuple(n)) => out.extend((0..n).map(|i| format!("{base}.{i}"))),
        Some(Kind::Other) => {}
        _ => out.push(base),
    }
}

fn walk_sites(out: &mut Vec<String>, prefix: &str, info: &'static FnInfo, node: &SNode) {
    // Sites in source order; only those that ran when the structure was recorded (others have no
    // known value).
    for (site, label) in info.labels.iter().enumerate() {
        let site = site as u32;
        let Some(kind) = node.kind(site) else {
            continue;
        };
        let here = format!("{prefix}.source.{label}");
        push_value(out, format!("{here}.output"), Some(kind));
        if let Some(child) = node.call(site) {
            walk_sites(out, &here, child.info, child);
        }
    }
}

/// Every hookpoint path of `target` (module paths as in its table, no standard names): for each
/// module (the root excepted) its `.input` (when it takes one) and `.output` (one path per element
/// of a tuple), and with [`Which::All`] every call site that ran in the recorded structure, nested
/// calls included. In module order, then source order.
pub fn hookpoints(target: &dyn Target, which: Which) -> Result<Vec<String>> {
    let structure = target.call_structure()?;
    let mut out = Vec::new();
    for (i, e) in target.module_table().entries.iter().enumerate() {
        if e.path.is_empty() {
            continue;
        }
        let node = structure.modules.get(i).and_then(|n| n.as_ref());
        if which == Which::All && e.forward.input.is_some() {
            out.push(format!("{}.input", e.path));
        }
        let kind = node.and_then(|n| n.kind(OUTPUT_SITE));
        push_value(&mut out, format!("{}.output", e.path), kind);
        if which == Which::All {
            if let Some(n) = node {
                walk_sites(&mut out, &e.path, e.forward, n);
            }
        }
    }
    Ok(out)
}

/// Whether `path` matches `pattern`, segment by segment (segments split at `.`): `*` matches one
/// segment, `**` any number of segments; other segments match literally.
pub fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = path.split('.').collect();
    fn go(p: &[&str], s: &[&str]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(&"**") => (0..=s.len()).any(|k| go(&p[1..], &s[k..])),
            Some(&"*") => !s.is_empty() && go(&p[1..], &s[1..]),
            Some(seg) => s.first() == Some(seg) && go(&p[1..], &s[1..]),
        }
    }
    go(&p, &s)
}

/// Whether `path` is a pattern (has a `*` or `**` segment).
pub fn is_pattern(path: &str) -> bool {
    path.split('.').any(|s| s == "*" || s == "**")
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.b.x.c"));
        assert!(matches("a.**.c", "a.c"));
        assert!(matches("a.**.c", "a.b.x.c"));
        assert!(matches("a.**", "a.b.c"));
        assert!(matches("**", "x"));
        assert!(!matches("a.*", "a"));
        assert!(matches(
            "model.layers.*.self_attn.**",
            "model.layers.3.self_attn.source.F_softmax_0.output"
        ));
        assert!(!matches(
            "model.layers.*.self_attn.**",
            "model.layers.3.mlp.output"
        ));
    }
}
