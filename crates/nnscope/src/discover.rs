//! Finding the attention probabilities automatically: find the hookpoint that yields them
//! ([`find_attention_probabilities`]) and run the checks on the registered one
//! ([`check`]).
//!
//! Discovery never reads the registry. It traces a short input, walks every hookpoint under
//! `attentions.0` (its source, nested module sources such as DBRX's `.attn`, and the nested `.source`
//! of calls), scores each tensor as a probability candidate, ranks the candidates by this
//! priority order, and confirms the winner by editing it.

use crate::models::ProbShape;
use crate::trace::structure::SNode;
use crate::trace::{listing, FnInfo, Kind};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Device, Tensor};

/// One scored hookpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    /// Path from `attentions.L` (without `.output`).
    pub hookpoint: String,
    /// Shape of its value.
    pub shape: Vec<usize>,
    /// Smallest row sum over the last dimension.
    pub row_sum_min: f64,
    /// Largest row sum.
    pub row_sum_max: f64,
    /// Every entry >= 0.
    pub non_negative: bool,
    /// Zero above the causal diagonal (over the first K columns).
    pub causal: bool,
    /// Rows sum to 1 within 1e-5.
    pub sums_to_one: bool,
    /// The priority (0 first): 0 a dropout inside `attention_interface_0`,
    /// 1 `nn_functional_dropout_N`, 2 a module dropout (`self_attn_dropout_N`, ...), 3 `F_softmax_N`,
    /// 4 anything else.
    pub priority: u8,
}

/// What discovery found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Discovery {
    /// The Hugging Face class (config.json's `architectures[0]`).
    pub architecture: String,
    /// config.json's `model_type`.
    pub model_type: String,
    /// Path from `attentions.L` of the attention probabilities.
    pub hookpoint: String,
    /// Its shape on the probe input.
    pub shape: Vec<usize>,
    /// Smallest row sum.
    pub row_sum_min: f64,
    /// Largest row sum.
    pub row_sum_max: f64,
    /// Editing it changed the logits.
    pub changes_output: bool,
    /// Whether it is [B, H, Q, K + 1] with a sink column.
    #[serde(skip)]
    pub prob_shape: ProbShape,
    /// Every probability-like candidate, best first.
    pub candidates: Vec<Candidate>,
    /// The listing of the function holding the hookpoint, with it marked.
    #[serde(skip)]
    pub listing: String,
}

impl Discovery {
    /// The registry row to add for this architecture (Rust source).
    pub fn registry_row(&self) -> String {
        format!(
            "Architecture {{\n    model_type: \"{}\",\n    class: \"{}\",\n    load: {}::load,\n    attention_probabilities: \"{}\",\n    prob_shape: ProbShape::{:?},\n}},",
            self.model_type, self.architecture, self.model_type, self.hookpoint, self.prob_shape
        )
    }
}

/// The probe input: a few tokens, as `torch.tensor([[1, 2, 3]])` in a Python trace.
fn probe_ids(model: &Model, n: usize) -> Result<Tensor> {
    let v = model.vocab_size().max(2) as u32;
    let ids: Vec<u32> = (0..n as u32).map(|i| 1 + i % (v - 1)).collect();
    Ok(Tensor::from_vec(ids, (1, n), &model.device)?)
}

/// Every tensor-valued hookpoint below a scope, as paths relative to `prefix`.
fn walk(info: &'static FnInfo, node: Option<&SNode>, prefix: &str, out: &mut Vec<String>) {
    for (site, label) in info.labels.iter().enumerate() {
        let site = site as u32;
        let path = format!("{prefix}source.{label}");
        match node.and_then(|n| n.kind(site)) {
            Some(Kind::Tensor) => out.push(path.clone()),
            Some(Kind::Tuple(n)) => out.extend((0..n).map(|i| format!("{path}#{i}"))),
            _ => {}
        }
        if let Some(child) = node.and_then(|n| n.call(site)) {
            walk(child.info, Some(child), &format!("{path}."), out);
        }
    }
}

fn priority(path: &str) -> u8 {
    let last = path.rsplit('.').next().unwrap_or(path);
    let base = last.rsplit_once('_').map(|(b, _)| b).unwrap_or(last);
    let dropout = base.ends_with("dropout");
    if dropout && path.contains("attention_interface_0.source.") {
        0
    } else if base == "nn_functional_dropout" {
        1
    } else if dropout && base.starts_with("self_") {
        2
    } else if base == "F_softmax" {
        3
    } else {
        4
    }
}

/// Probability statistics of a [1, H, T, K] tensor: (non-negative, causal, min row sum, max row
/// sum, rows sum to 1).
type RowStats = (bool, bool, f64, f64, bool);

fn stats(t: &Tensor, heads: usize, tokens: usize) -> Result<Option<RowStats>> {
    let dims = t.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != heads || dims[2] != tokens {
        return Ok(None);
    }
    let k = dims[3];
    if k != tokens && k != tokens + 1 {
        return Ok(None);
    }
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let non_negative = v.iter().all(|x| *x >= -1e-7);
    let mut causal = true;
    let (mut smin, mut smax) = (f64::INFINITY, f64::NEG_INFINITY);
    for h in 0..heads {
        for q in 0..tokens {
            let row = &v[(h * tokens + q) * k..(h * tokens + q + 1) * k];
            let s: f64 = row.iter().map(|x| *x as f64).sum();
            smin = smin.min(s);
            smax = smax.max(s);
            if row[q + 1..tokens].iter().any(|x| x.abs() > 1e-7) {
                causal = false;
            }
        }
    }
    let sums = (smin - 1.0).abs() <= 1e-5 && (smax - 1.0).abs() <= 1e-5;
    Ok(Some((non_negative, causal, smin, smax, sums)))
}

/// Runs discovery on `model` without consulting the registry.
pub fn find_attention_probabilities(model: &Model) -> Result<Discovery> {
    let structure = model.structure()?;
    let names = model.names();
    let attn = names.attention_path(0);
    let heads = model.num_heads()?;
    // The attention module and every module nested in it (DBRX's `norm_attn_norm.attn`).
    let mut paths = Vec::new();
    for (i, e) in model.modules().entries.iter().enumerate() {
        let rel = if e.path == attn {
            String::new()
        } else if let Some(r) = e.path.strip_prefix(&format!("{attn}.")) {
            format!("{r}.")
        } else {
            continue;
        };
        let node = structure.modules.get(i).and_then(|m| m.as_ref());
        walk(e.forward, node, &rel, &mut paths);
    }
    let tokens = 6;
    let ids = probe_ids(model, tokens)?;
    let mut tr = model.trace(Input::ids(ids.clone()));
    let full = |p: &str| match p.split_once('#') {
        Some((a, i)) => format!("attentions.0.{a}.output.{i}"),
        None => format!("attentions.0.{p}.output"),
    };
    for p in &paths {
        tr = tr.save(&full(p))?;
    }
    let out = tr.run()?;
    let mut cands = Vec::new();
    for p in &paths {
        let t = out.get(&full(p))?;
        if let Some((non_negative, causal, row_sum_min, row_sum_max, sums_to_one)) =
            stats(t, heads, tokens)?
        {
            if !non_negative || !causal || row_sum_max > 1.0 + 1e-5 || row_sum_min <= 0.0 {
                continue;
            }
            cands.push(Candidate {
                hookpoint: p.replace('#', ".output."),
                shape: t.dims().to_vec(),
                row_sum_min,
                row_sum_max,
                non_negative,
                causal,
                sums_to_one,
                priority: priority(p.split('#').next().unwrap_or(p)),
            });
        }
    }
    // Rows summing to 1 first (a partial sum, as with sinks, only when nothing sums to 1), then the
    // priority, then the latest hookpoint (the value that multiplies V comes last).
    let order: Vec<usize> = (0..cands.len()).collect();
    let mut order = order;
    order.sort_by_key(|&i| {
        (
            !cands[i].sums_to_one,
            cands[i].priority,
            std::cmp::Reverse(i),
        )
    });
    let cands: Vec<Candidate> = order.into_iter().map(|i| cands[i].clone()).collect();
    let best = cands.first().cloned().ok_or_else(|| Error::Hookpoint {
        path: attn.clone(),
        msg: "no hookpoint under attentions.0 looks like attention probabilities \
              (4-D [B, H, Q, K], non-negative, causal, rows summing to 1)"
            .into(),
        suggestions: vec![],
    })?;
    let prob_shape = if best.shape[3] == tokens + 1 {
        ProbShape::SinkColumn
    } else {
        ProbShape::Standard
    };
    // Confirm: write normalized random probabilities and see the logits change.
    let changes_output = edit_changes_output(model, &value_path(0, &best.hookpoint), &ids)?;
    // The listing of the function holding the hookpoint.
    let holder = best
        .hookpoint
        .rsplit_once(".source.")
        .map(|(a, _)| a)
        .unwrap_or("");
    let func = if holder.is_empty() {
        crate::trace::path::resolve_function(model, "attentions.0")?
    } else {
        crate::trace::path::resolve_function(model, &format!("attentions.0.{holder}"))?
    };
    let label = best.hookpoint.rsplit('.').next().unwrap_or("");
    let label = if label.parse::<usize>().is_ok() {
        best.hookpoint.split('.').rev().nth(2).unwrap_or("")
    } else {
        label
    };
    Ok(Discovery {
        architecture: model.class_name(),
        model_type: model.arch.model_type.to_string(),
        hookpoint: best.hookpoint.clone(),
        shape: best.shape.clone(),
        row_sum_min: best.row_sum_min,
        row_sum_max: best.row_sum_max,
        changes_output,
        prob_shape,
        candidates: cands,
        listing: format!(
            "{}  ({}:{})\n{}",
            func.name,
            func.file,
            func.first_line,
            listing(func, Some(label))
        ),
    })
}

/// `attentions.L.<hookpoint>.output`, or `attentions.L.<hookpoint>` when it already names an
/// element of a tuple output (`....output.1`).
pub fn value_path(layer: usize, hookpoint: &str) -> String {
    if hookpoint.contains(".output.") {
        format!("attentions.{layer}.{hookpoint}")
    } else {
        format!("attentions.{layer}.{hookpoint}.output")
    }
}

/// Normalized random probabilities shaped like `like` (causal over the first K columns when it has
/// a sink column too), rows summing to 1.
pub fn random_probabilities(like: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
    let dims = like.dims4()?;
    let (b, h, q, k) = dims;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) + 0.05
    };
    let mut v = vec![0f32; b * h * q * k];
    for row in 0..b * h * q {
        let qi = row % q;
        let visible = if k > q {
            (qi + 1..k).filter(|c| *c >= q).count() + qi + 1
        } else {
            qi + 1
        };
        let cols: Vec<usize> = (0..k).filter(|c| *c <= qi || (k > q && *c >= q)).collect();
        debug_assert_eq!(cols.len(), visible);
        let vals: Vec<f32> = cols.iter().map(|_| rnd()).collect();
        let s: f32 = vals.iter().sum();
        for (c, x) in cols.iter().zip(vals) {
            v[row * k + c] = x / s;
        }
    }
    Tensor::from_vec(v, (b, h, q, k), like.device())?.to_dtype(like.dtype())
}

fn edit_changes_output(model: &Model, path: &str, ids: &Tensor) -> Result<bool> {
    let plain = model.trace(Input::ids(ids.clone())).run()?;
    let edited = model
        .trace(Input::ids(ids.clone()))
        .edit(path, |p| random_probabilities(p, 7))?
        .run()?;
    let (Some(a), Some(b)) = (plain.logits, edited.logits) else {
        return Ok(false);
    };
    let d = (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(d > 1e-6)
}

/// The outcome of the checks on a model's registered hookpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The Hugging Face class.
    pub architecture: String,
    /// `model_type`.
    pub model_type: String,
    /// The registered path from `attentions.L` (empty when unregistered).
    pub hookpoint: String,
    /// Each check by name.
    pub checks: Checks,
    /// All checks passed.
    pub passed: bool,
    /// Why a check failed, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<(String, String)>,
}

/// The checks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Checks {
    /// The model loads (nnscope always runs eager attention, so there is no probabilities-off mode).
    pub loads: bool,
    /// `attentions.0`'s source is available.
    pub source: bool,
    /// The hookpoint resolves.
    pub resolves: bool,
    /// [B, H, Q, K] (or [B, H, Q, K + 1] where the registry documents a sink column).
    pub shape: bool,
    /// Rows sum to 1 within 1e-5.
    pub sums: bool,
    /// Writing normalized random probabilities changes the logits.
    pub changes_output: bool,
    /// The architecture has a registry row.
    pub registered: bool,
}

/// Runs the checks on `model` (already loaded: `loads` is true).
pub fn check(model: &Model) -> CheckReport {
    let mut c = Checks {
        loads: true,
        ..Default::default()
    };
    let mut failures = Vec::new();
    let mut fail = |name: &str, why: String| failures.push((name.to_string(), why));
    let hookpoint = model
        .attention_probabilities_path()
        .map(|s| s.to_string())
        .unwrap_or_default();
    c.registered = !hookpoint.is_empty();
    if !c.registered {
        fail(
            "registered",
            format!(
                "no attention-probability hookpoint is registered for `{}`",
                model.arch.model_type
            ),
        );
    }
    match crate::trace::path::resolve_function(model, "attentions.0") {
        Ok(info) if !info.lines.is_empty() => c.source = true,
        Ok(_) => fail("source", "the listing of attentions.0 is empty".into()),
        Err(e) => fail("source", e.to_string()),
    }
    let tokens = 5;
    let probe = probe_ids(model, tokens);
    let path = "attention_probabilities.0";
    if c.registered {
        match model.resolve(path) {
            Ok(_) => c.resolves = true,
            Err(e) => fail("resolves", e.to_string()),
        }
    }
    if let (true, Ok(ids)) = (c.resolves, probe) {
        let heads = model.num_heads().unwrap_or(0);
        match model
            .trace(Input::ids(ids.clone()))
            .save(path)
            .and_then(|t| t.run())
        {
            Ok(out) => match out.get(path) {
                Ok(p) => {
                    let k_expected = match model.attention_probabilities_shape() {
                        ProbShape::Standard => tokens,
                        ProbShape::SinkColumn => tokens + 1,
                    };
                    c.shape = p.dims() == [1, heads, tokens, k_expected];
                    if !c.shape {
                        fail(
                            "shape",
                            format!(
                                "got {:?}, expected {:?}",
                                p.dims(),
                                [1, heads, tokens, k_expected]
                            ),
                        );
                    }
                    match stats(p, heads, tokens) {
                        Ok(Some((_, _, lo, hi, sums))) => {
                            c.sums = sums;
                            if !sums {
                                fail("sums", format!("row sums range from {lo} to {hi}"));
                            }
                        }
                        _ => fail("sums", "could not compute row sums".into()),
                    }
                    match edit_changes_output(model, path, &ids) {
                        Ok(true) => c.changes_output = true,
                        Ok(false) => fail(
                            "changes_output",
                            "writing random probabilities left the logits unchanged".into(),
                        ),
                        Err(e) => fail("changes_output", e.to_string()),
                    }
                }
                Err(e) => fail("shape", e.to_string()),
            },
            Err(e) => fail("shape", e.to_string()),
        }
    }
    let passed =
        c.loads && c.source && c.resolves && c.shape && c.sums && c.changes_output && c.registered;
    CheckReport {
        architecture: model.class_name(),
        model_type: model.arch.model_type.to_string(),
        hookpoint,
        checks: c,
        passed,
        failures,
    }
}
