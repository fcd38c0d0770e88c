//! The standardized view (nnterp's `StandardizedTransformer`): the same names on every architecture.
//!
//! Module names are found by renaming rules held as data ([`RULES`]): alias lists in the way
//! nnterp's `rename_utils` does it, overridable per model with a [`RenameConfig`]. Standard names:
//!
//! | name | means |
//! | --- | --- |
//! | `embed_tokens`, `layers.L`, `attentions.L`, `mlps.L`, `ln_final`, `lm_head` | modules |
//! | `layers_input.L`, `layers_output.L` | input / output of decoder layer L |
//! | `layers_mid.L` | the residual between attention and MLP ([`MID_RESIDUAL`]) |
//! | `attentions_input.L`, `attentions_output.L`, `mlps_input.L`, `mlps_output.L` | likewise |
//! | `token_embeddings` | output of `embed_tokens` |
//! | `attention_probabilities.L` | the architecture's registered attention-probability hookpoint |
//! | `logits` | the model's output logits (`lm_head`'s output, then any final soft-capping) |
//! | `heads.L` | input of the attention's output projection viewed [B, T, H, D] |
//! | `queries.L`, `keys.L`, `values.L` | [B, heads, T, D] as the attention uses them (after rotary; keys and values per key/value head) |
//!
//! The per-head names come from [`crate::models::PER_HEAD`]; `heads.L` is a view ([`View`]): it is
//! read by reshaping the projection's input and written by reshaping back, so a write changes
//! exactly what the projection sees.

use crate::models::ProbShape;
use crate::trace::pattern::{self, Which};
use crate::trace::{rt, HookPath, ModuleTable, View};
use crate::{nearest, Error, Model, Result};

/// Every standard name (module accessors and values).
pub const STANDARD_NAMES: &[&str] = &[
    "embed_tokens",
    "layers",
    "attentions",
    "mlps",
    "ln_final",
    "lm_head",
    "layers_input",
    "layers_output",
    "layers_mid",
    "attentions_input",
    "attentions_output",
    "mlps_input",
    "mlps_output",
    "token_embeddings",
    "attention_probabilities",
    "logits",
    "heads",
    "queries",
    "keys",
    "values",
];

/// Standard names that take a layer index.
pub const LAYER_NAMES: &[&str] = &[
    "layers",
    "attentions",
    "mlps",
    "layers_input",
    "layers_output",
    "layers_mid",
    "attentions_input",
    "attentions_output",
    "mlps_input",
    "mlps_output",
    "attention_probabilities",
    "heads",
    "queries",
    "keys",
    "values",
];

/// TransformerLens hook names (`blocks.L.<hook>`, and `hook_embed`) and the standard names they
/// stand for. `heads`, `queries`, `keys`, `values` are the per-head standard names.
pub const TRANSFORMER_LENS: &[(&str, &str)] = &[
    ("hook_resid_pre", "layers_input"),
    ("hook_resid_mid", "layers_mid"),
    ("hook_resid_post", "layers_output"),
    ("hook_attn_out", "attentions_output"),
    ("hook_mlp_in", "mlps_input"),
    ("ln2.hook_normalized", "mlps_input"),
    ("hook_mlp_out", "mlps_output"),
    ("attn.hook_z", "heads"),
    ("attn.hook_q", "queries"),
    ("attn.hook_k", "keys"),
    ("attn.hook_v", "values"),
    ("attn.hook_pattern", "attention_probabilities"),
];

/// The standard name a TransformerLens hook name stands for (`blocks.3.hook_resid_post` ->
/// `layers_output.3`, `hook_embed` -> `token_embeddings`); `None` for other paths.
pub fn transformer_lens(path: &str) -> Option<String> {
    if path == "hook_embed" {
        return Some("token_embeddings".into());
    }
    let rest = path.strip_prefix("blocks.")?;
    let (layer, hook) = rest.split_once('.')?;
    let (_, standard) = TRANSFORMER_LENS.iter().find(|(tl, _)| *tl == hook)?;
    Some(format!("{standard}.{layer}"))
}

/// Where the residual between attention and MLP (`layers_mid.L`, TransformerLens'
/// `hook_resid_mid`) is read: one row of [`MID_RESIDUAL`].
#[derive(Debug)]
pub struct MidResidual {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// The row applies when this boolean config key has this value (key, value, default when the
    /// key is absent); `None`: always.
    pub when: Option<(&'static str, bool, bool)>,
    /// Path relative to the layer; `None`: attention and MLP read the same input (a parallel
    /// residual), so there is no residual between them.
    pub at: Option<&'static str>,
}

const fn mid(model_type: &'static str, at: &'static str) -> MidResidual {
    MidResidual {
        model_type,
        when: None,
        at: Some(at),
    }
}

/// Per architecture, the first row whose `model_type` and condition match. Where it is the input
/// of the norm before the MLP, a write reaches the MLP but not the residual the MLP's output is
/// added to; where it is a value the layer carries on (Bloom's attention output, DBRX's
/// `norm_attn_norm.output.0`, post-norm OPT's `self_attn_layer_norm.output`), a write reaches
/// both.
pub const MID_RESIDUAL: &[MidResidual] = &[
    mid("gpt2", "ln_2.input"),
    mid("gpt_neo", "ln_2.input"),
    mid("gpt_bigcode", "ln_2.input"),
    mid("llama", "post_attention_layernorm.input"),
    mid("mistral", "post_attention_layernorm.input"),
    mid("qwen2", "post_attention_layernorm.input"),
    mid("qwen3", "post_attention_layernorm.input"),
    mid("qwen2_moe", "post_attention_layernorm.input"),
    mid("gpt_oss", "post_attention_layernorm.input"),
    mid("starcoder2", "post_attention_layernorm.input"),
    mid("gemma", "post_attention_layernorm.input"),
    mid("olmo", "post_attention_layernorm.input"),
    mid("gemma2", "pre_feedforward_layernorm.input"),
    mid("gemma3_text", "pre_feedforward_layernorm.input"),
    mid("olmo2", "mlp.input"),
    mid("phi3", "post_attention_layernorm.input"),
    mid("mixtral", "post_attention_layernorm.input"),
    mid("qwen3_moe", "post_attention_layernorm.input"),
    MidResidual {
        model_type: "phi",
        when: None,
        at: None,
    },
    MidResidual {
        model_type: "falcon",
        when: Some(("new_decoder_architecture", true, false)),
        at: None,
    },
    MidResidual {
        model_type: "falcon",
        when: Some(("parallel_attn", true, true)),
        at: None,
    },
    mid("falcon", "post_attention_layernorm.input"),
    MidResidual {
        model_type: "stablelm",
        when: Some(("use_parallel_residual", true, false)),
        at: None,
    },
    mid("stablelm", "post_attention_layernorm.input"),
    MidResidual {
        model_type: "gpt_neox",
        when: Some(("use_parallel_residual", true, true)),
        at: None,
    },
    mid("gpt_neox", "post_attention_layernorm.input"),
    MidResidual {
        model_type: "opt",
        when: Some(("do_layer_norm_before", false, true)),
        at: Some("self_attn_layer_norm.output"),
    },
    mid("opt", "final_layer_norm.input"),
    mid("bloom", "self_attention.output"),
    mid("dbrx", "norm_attn_norm.output.0"),
    MidResidual {
        model_type: "gptj",
        when: None,
        at: None,
    },
];

/// Whether `path` names a value of the residual stream's size (hidden): `layers_input`,
/// `layers_output`, `layers_mid`, `attentions_output`, `mlps_input`, `mlps_output`,
/// `token_embeddings`, or their TransformerLens names.
pub fn is_residual_sized(_model: &Model, path: &str) -> bool {
    let p = transformer_lens(path).unwrap_or_else(|| path.to_string());
    let head = p.split('.').next().unwrap_or("");
    matches!(
        head,
        "layers_input"
            | "layers_output"
            | "layers_mid"
            | "attentions_output"
            | "mlps_input"
            | "mlps_output"
            | "token_embeddings"
    )
}

/// The per-head standard names (see [`crate::models::PerHead`]).
pub const PER_HEAD_NAMES: &[&str] = &["heads", "queries", "keys", "values"];

/// One renaming rule: the standard name and the Hugging Face attribute names that map to it.
#[derive(Debug)]
pub struct Rule {
    /// Standard name.
    pub standard: &'static str,
    /// Attribute names, in order of preference.
    pub aliases: &'static [&'static str],
}

/// The renaming rules (as nnterp's `rename_utils`).
pub const RULES: &[Rule] = &[
    Rule {
        standard: "layers",
        aliases: &["layers", "h", "blocks", "layer"],
    },
    Rule {
        standard: "self_attn",
        aliases: &[
            "self_attn",
            "attn",
            "self_attention",
            "attention",
            "norm_attn_norm",
        ],
    },
    Rule {
        standard: "mlp",
        aliases: &["mlp", "ffn", "feed_forward", "block_sparse_moe", "moe"],
    },
    Rule {
        standard: "embed_tokens",
        aliases: &["embed_tokens", "wte", "word_embeddings", "embed_in"],
    },
    Rule {
        standard: "ln_final",
        aliases: &[
            "norm",
            "ln_f",
            "norm_f",
            "final_layer_norm",
            "final_layernorm",
        ],
    },
    Rule {
        standard: "lm_head",
        aliases: &["lm_head", "embed_out"],
    },
];

/// Feed-forward layers that sit in the decoder layer itself, with no MLP module around them
/// (OPT's `fc1` ... `fc2`): then `mlps_input.L` is the first's input and `mlps_output.L` the
/// second's output, and there is no `mlps.L` module.
pub const SPLIT_MLPS: &[(&str, &str)] = &[("fc1", "fc2")];

/// Per-model overrides of the renaming, as full Hugging Face paths (`layers`, `embed_tokens`,
/// `ln_final`, `lm_head`) or attribute names inside a layer (`attention`, `mlp`).
#[derive(Debug, Clone, Default)]
pub struct RenameConfig {
    /// Path of the layer list (`transformer.h`).
    pub layers: Option<String>,
    /// Attribute of the attention inside a layer (`attn`).
    pub attention: Option<String>,
    /// Attribute of the MLP inside a layer (`mlp`).
    pub mlp: Option<String>,
    /// Path of the token embedding.
    pub embed_tokens: Option<String>,
    /// Path of the final norm.
    pub ln_final: Option<String>,
    /// Path of the output head.
    pub lm_head: Option<String>,
}

/// A model's modules under their standard names.
#[derive(Debug, Clone)]
pub struct StandardNames {
    /// Path of the layer list (`model.layers`).
    pub layers: String,
    /// Number of layers.
    pub num_layers: usize,
    /// Attention's attribute inside a layer (`self_attn`).
    pub attention: String,
    /// MLP's attribute inside a layer (`mlp`); `None` when the feed-forward layers sit in the layer
    /// itself (see [`SPLIT_MLPS`] and `mlp_split`).
    pub mlp: Option<String>,
    /// The first and last feed-forward layers inside a layer when there is no MLP module (OPT:
    /// `fc1`, `fc2`).
    pub mlp_split: Option<(String, String)>,
    /// Path of the token embedding (`model.embed_tokens`).
    pub embed_tokens: String,
    /// Path of the final norm (`model.norm`); `None` for models without one (OPT with
    /// `do_layer_norm_before: false`).
    pub ln_final: Option<String>,
    /// Path of the output head (`lm_head`).
    pub lm_head: String,
}

fn rule(standard: &str) -> &'static [&'static str] {
    RULES
        .iter()
        .find(|r| r.standard == standard)
        .map(|r| r.aliases)
        .unwrap_or(&[])
}

fn missing(what: &str, option: &str, table: &ModuleTable) -> Error {
    let some: Vec<&str> = table
        .entries
        .iter()
        .map(|e| e.path.as_str())
        .filter(|p| !p.is_empty())
        .take(12)
        .collect();
    Error::Config {
        path: "<module tree>".into(),
        msg: format!(
            "renaming check failed: no module matches the standard name `{what}`; pass it explicitly \
             (RenameConfig::{option}). Modules include: {}",
            some.join(", ")
        ),
    }
}

impl StandardNames {
    /// Finds the standard modules in a module tree (nnterp's renaming plus `check_model_renaming`'s
    /// existence checks).
    pub fn derive(table: &ModuleTable, rename: &RenameConfig) -> Result<Self> {
        let paths: Vec<&str> = table.entries.iter().map(|e| e.path.as_str()).collect();
        let exists = |p: &str| paths.contains(&p);
        // Layers: a list `<prefix>.<alias>.<i>` of modules.
        let layers = match &rename.layers {
            Some(l) => l.clone(),
            None => {
                let mut found = None;
                'outer: for alias in rule("layers") {
                    for p in &paths {
                        let segs: Vec<&str> = p.split('.').collect();
                        if segs.len() >= 2
                            && segs[segs.len() - 2] == *alias
                            && segs[segs.len() - 1] == "0"
                        {
                            found = Some(segs[..segs.len() - 1].join("."));
                            break 'outer;
                        }
                    }
                }
                found.ok_or_else(|| missing("layers", "layers", table))?
            }
        };
        let mut num_layers = 0;
        while exists(&format!("{layers}.{num_layers}")) {
            num_layers += 1;
        }
        if num_layers == 0 {
            return Err(missing("layers", "layers", table));
        }
        let first = format!("{layers}.0");
        let child = |standard: &str, over: &Option<String>, opt: &str| -> Result<String> {
            if let Some(o) = over {
                return if exists(&format!("{first}.{o}")) {
                    Ok(o.clone())
                } else {
                    Err(missing(standard, opt, table))
                };
            }
            rule(standard)
                .iter()
                .find(|a| exists(&format!("{first}.{a}")))
                .map(|a| a.to_string())
                .ok_or_else(|| missing(standard, opt, table))
        };
        let attention = child("self_attn", &rename.attention, "attention")?;
        // No MLP module: feed-forward layers directly in the layer (as data: SPLIT_MLPS).
        let mlp_split = match &rename.mlp {
            Some(_) => None,
            None if rule("mlp").iter().any(|a| exists(&format!("{first}.{a}"))) => None,
            None => SPLIT_MLPS
                .iter()
                .find(|(a, b)| exists(&format!("{first}.{a}")) && exists(&format!("{first}.{b}")))
                .map(|(a, b)| (a.to_string(), b.to_string())),
        };
        let mlp = match mlp_split {
            Some(_) => None,
            None => Some(child("mlp", &rename.mlp, "mlp")?),
        };
        let top = |standard: &str, over: &Option<String>, opt: &str| -> Result<String> {
            if let Some(o) = over {
                return if exists(o) {
                    Ok(o.clone())
                } else {
                    Err(missing(standard, opt, table))
                };
            }
            for a in rule(standard) {
                if let Some(p) = paths.iter().find(|p| {
                    !p.starts_with(&format!("{layers}.")) && (p.rsplit('.').next() == Some(*a))
                }) {
                    return Ok(p.to_string());
                }
            }
            Err(missing(standard, opt, table))
        };
        Ok(StandardNames {
            embed_tokens: top("embed_tokens", &rename.embed_tokens, "embed_tokens")?,
            // A model may have no final norm (post-norm OPT): `ln_final` then names nothing.
            ln_final: match &rename.ln_final {
                Some(_) => Some(top("ln_final", &rename.ln_final, "ln_final")?),
                None => top("ln_final", &None, "ln_final").ok(),
            },
            lm_head: top("lm_head", &rename.lm_head, "lm_head")?,
            layers,
            num_layers,
            attention,
            mlp,
            mlp_split,
        })
    }

    /// Path of layer `i`'s attention module.
    pub fn attention_path(&self, i: usize) -> String {
        format!("{}.{i}.{}", self.layers, self.attention)
    }
}

/// Expands a standard name into a Hugging Face path; other paths are returned unchanged.
pub fn expand(model: &Model, path: &str) -> Result<String> {
    if let Some(standard) = transformer_lens(path) {
        let head = standard.split('.').next().unwrap_or("");
        if !STANDARD_NAMES.contains(&head) {
            return Err(Error::Hookpoint {
                path: path.into(),
                msg: format!(
                    "the TransformerLens name of `{standard}`, a standard name this build does not have"
                ),
                suggestions: vec![],
            });
        }
        return expand(model, &standard).map_err(|e| match e {
            Error::Hookpoint {
                msg, suggestions, ..
            } => Error::Hookpoint {
                path: path.into(),
                msg: format!("(TransformerLens name of `{standard}`) {msg}"),
                suggestions,
            },
            other => other,
        });
    }
    let n = &model.names;
    let mut parts = path.splitn(2, '.');
    let head = parts.next().unwrap_or("");
    let rest = parts.next();
    let join = |base: String, tail: Option<&str>| match tail {
        Some(t) if !t.is_empty() => format!("{base}.{t}"),
        _ => base,
    };
    match head {
        "embed_tokens" => return Ok(join(n.embed_tokens.clone(), rest)),
        "ln_final" => {
            let ln_final = n.ln_final.clone().ok_or_else(|| Error::Hookpoint {
                path: path.into(),
                msg: format!(
                    "this model ({}) has no final norm: the last layer's output goes straight to the \
                     output head (use `layers_output.{}`)",
                    model.arch.model_type,
                    n.num_layers.saturating_sub(1)
                ),
                suggestions: vec![format!("layers_output.{}", n.num_layers.saturating_sub(1))],
            })?;
            return Ok(join(ln_final, rest));
        }
        "lm_head" => return Ok(join(n.lm_head.clone(), rest)),
        "token_embeddings" => return Ok(join(format!("{}.output", n.embed_tokens), rest)),
        // The model's output, as nnterp's `logits` (`model.output.logits`): after the final
        // soft-capping of Gemma 2 / 3, which `lm_head.output` is not.
        "logits" => return Ok(join("output".to_string(), rest)),
        _ => {}
    }
    if !LAYER_NAMES.contains(&head) {
        return Ok(path.to_string());
    }
    let Some(rest) = rest else {
        return Err(Error::Hookpoint {
            path: path.into(),
            msg: format!(
                "`{head}` needs a layer index: `{head}.0` .. `{head}.{}`",
                n.num_layers.saturating_sub(1)
            ),
            suggestions: vec![format!("{head}.0")],
        });
    };
    let mut rp = rest.splitn(2, '.');
    let idx_s = rp.next().unwrap_or("");
    let tail = rp.next();
    let signed: i64 = idx_s.parse().map_err(|_| Error::Hookpoint {
        path: path.into(),
        msg: format!("`{idx_s}` is not a layer index"),
        suggestions: vec![],
    })?;
    // Negative indices count from the end, as in Python: `-1` is the last layer.
    let idx = if signed < 0 {
        let from_end = signed.unsigned_abs() as usize;
        if from_end > n.num_layers {
            return Err(Error::Hookpoint {
                path: path.into(),
                msg: format!(
                    "layer {signed} is before the first layer: the model has {} layers (0..{}, or -{}..-1)",
                    n.num_layers,
                    n.num_layers.saturating_sub(1),
                    n.num_layers
                ),
                suggestions: vec![format!("{head}.-{}", n.num_layers)],
            });
        }
        n.num_layers - from_end
    } else {
        usize::try_from(signed).unwrap_or(usize::MAX)
    };
    if idx >= n.num_layers {
        return Err(Error::Hookpoint {
            path: path.into(),
            msg: format!(
                "layer {idx} is past the last layer: the model has {} layers (0..{})",
                n.num_layers,
                n.num_layers.saturating_sub(1)
            ),
            suggestions: vec![format!("{head}.{}", n.num_layers.saturating_sub(1))],
        });
    }
    let layer = format!("{}.{idx}", n.layers);
    let attn = format!("{layer}.{}", n.attention);
    let mlp = n.mlp.as_ref().map(|m| format!("{layer}.{m}"));
    // Without an MLP module, its input and output are those of the first and last feed-forward
    // layers.
    let (mlp_in, mlp_out) = match (&mlp, &n.mlp_split) {
        (Some(m), _) => (m.clone(), m.clone()),
        (None, Some((a, b))) => (format!("{layer}.{a}"), format!("{layer}.{b}")),
        (None, None) => (layer.clone(), layer.clone()),
    };
    let value = |base: String, what: &str| -> Result<String> {
        match tail {
            None => Ok(format!("{base}.{what}")),
            Some(t) if t.parse::<usize>().is_ok() => Ok(format!("{base}.{what}.{t}")),
            Some(t) => Err(Error::Hookpoint {
                path: path.into(),
                msg: format!("`{head}.{idx}` is a value; `.{t}` cannot follow it"),
                suggestions: nearest(t, ["output", "input"], 1),
            }),
        }
    };
    match head {
        "layers" => Ok(join(layer, tail)),
        "attentions" => Ok(join(attn, tail)),
        "mlps" => match mlp {
            Some(mlp) => Ok(join(mlp, tail)),
            None => Err(Error::Hookpoint {
                path: path.into(),
                msg: format!(
                    "this model ({}) has no MLP module: its feed-forward layers sit in the layer \
                     (`{mlp_in}`, `{mlp_out}`); `mlps_input.{idx}` and `mlps_output.{idx}` are their \
                     input and output",
                    model.arch.model_type
                ),
                suggestions: vec![format!("mlps_input.{idx}"), format!("mlps_output.{idx}")],
            }),
        },
        "layers_input" => value(layer, "input"),
        "layers_output" => value(layer, "output"),
        "attentions_input" => value(attn, "input"),
        "attentions_output" => value(attn, "output"),
        "mlps_input" => value(mlp_in, "input"),
        "mlps_output" => value(mlp_out, "output"),
        "layers_mid" => {
            let mt = model.arch.model_type;
            let mut row = None;
            for r in MID_RESIDUAL.iter().filter(|r| r.model_type == mt) {
                let applies = match r.when {
                    None => true,
                    Some((key, value, default)) => model.config.bool_or(key, default)? == value,
                };
                if applies {
                    row = Some(r);
                    break;
                }
            }
            let Some(row) = row else {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: format!(
                        "no mid-layer residual is registered for `{mt}` (standard::MID_RESIDUAL)"
                    ),
                    suggestions: vec![],
                });
            };
            let Some(rel) = row.at else {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: format!(
                        "`{mt}` has a parallel residual here: attention and MLP read the same input, \
                         so there is no residual between them"
                    ),
                    suggestions: vec![format!("layers_input.{idx}"), format!("layers_output.{idx}")],
                });
            };
            if tail.is_some() {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: format!("`layers_mid.{idx}` is a value; nothing can follow it"),
                    suggestions: vec![format!("layers_mid.{idx}")],
                });
            }
            Ok(format!("{layer}.{rel}"))
        }
        "heads" | "queries" | "keys" | "values" => {
            if tail.is_some() {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: format!("`{head}.L` is a value; nothing can follow it"),
                    suggestions: vec![format!("{head}.{idx}")],
                });
            }
            per_head_path(model, path, head, &attn)
        }
        "attention_probabilities" => {
            if tail.is_some() {
                return Err(Error::Hookpoint {
                    path: path.into(),
                    msg: "`attention_probabilities.L` is a value; nothing can follow it".into(),
                    suggestions: vec![format!("attention_probabilities.{idx}")],
                });
            }
            let hp = model
                .attention_probabilities_path()
                .ok_or_else(|| Error::Hookpoint {
                    path: path.into(),
                    msg: format!(
                        "no attention-probability hookpoint is registered for `{}`; \
                     run `nnscope find-attn-probs` to discover it",
                        model.arch.model_type
                    ),
                    suggestions: vec![],
                })?;
            if hp.contains(".output.") {
                Ok(format!("{attn}.{hp}"))
            } else {
                Ok(format!("{attn}.{hp}.output"))
            }
        }
        _ => Ok(path.to_string()),
    }
}

/// The hookpoint a per-head name of layer attention `attn` stands for: the first of the registered
/// alternatives whose call ran in the recorded structure.
fn per_head_path(model: &Model, given: &str, head: &str, attn: &str) -> Result<String> {
    let row = crate::models::per_head(model.arch.model_type).ok_or_else(|| Error::Hookpoint {
        path: given.into(),
        msg: format!(
            "per-head names are not registered for model_type `{}` (they are for: {}); add a row \
             to nnscope::models::PER_HEAD, or use hookpoint paths",
            model.arch.model_type,
            per_head_model_types().join(", ")
        ),
        suggestions: vec![],
    })?;
    let alternatives = match head {
        "heads" => row.heads,
        "queries" => row.queries,
        "keys" => row.keys,
        _ => row.values,
    };
    let mut first_err = None;
    for alt in alternatives {
        let p = format!("{attn}.{alt}");
        match crate::trace::path::resolve(model, &p) {
            Ok(hp) if hp.kind.is_some() => return Ok(p),
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(Error::Hookpoint {
        path: given.into(),
        msg: format!(
            "none of the registered hookpoints for `{head}` ran in this model ({}){}",
            alternatives.join(", "),
            first_err.map(|e| format!(": {e}")).unwrap_or_default()
        ),
        suggestions: vec![],
    })
}

/// The model types with per-head names ([`crate::models::PER_HEAD`]).
pub fn per_head_model_types() -> Vec<&'static str> {
    crate::models::PER_HEAD
        .iter()
        .flat_map(|r| r.model_types.iter().copied())
        .collect()
}

/// The view a standard name is read and written through: `heads.L` is the output projection's
/// input [B, T, H * D] viewed [B, T, H, D]. Other names have none.
pub fn value_view(model: &Model, path: &str) -> Result<Option<View>> {
    if path.split('.').next() != Some("heads") {
        return Ok(None);
    }
    let h = model.dims().heads;
    if h == 0 {
        return Err(Error::Input("the model has no attention heads".into()));
    }
    let read: crate::trace::EditFn = std::sync::Arc::new(move |x: &candle_core::Tensor| {
        let (b, t, hd) = x.dims3()?;
        if hd % h != 0 {
            candle_core::bail!("its last dimension {hd} is not a multiple of {h} heads");
        }
        x.reshape((b, t, h, hd / h))
    });
    let write: crate::trace::EditFn = std::sync::Arc::new(|x: &candle_core::Tensor| {
        let (b, t, h, d) = x.dims4()?;
        x.reshape((b, t, h * d))
    });
    Ok(Some(View { read, write }))
}

impl Model {
    /// Every hookpoint path of this model (module paths, no standard names): each module's
    /// `.input` and `.output` and every call site that ran in the recorded structure, nested
    /// `.source` calls included.
    pub fn hookpoints(&self) -> Result<Vec<String>> {
        pattern::hookpoints(self, Which::All)
    }

    /// Every module's `.output` (one path per element of a tuple): what
    /// [`crate::Trace::save_all`] saves.
    pub fn module_outputs(&self) -> Result<Vec<String>> {
        pattern::hookpoints(self, Which::ModuleOutputs)
    }

    /// The paths a save pattern stands for. A standard name with `*` as its layer index
    /// (`layers_output.*`) means every layer; any other pattern is matched against
    /// [`Model::hookpoints`] (`*` one path segment, `**` any number: `model.layers.*.self_attn.**`).
    /// A path without `*` is returned as is. A pattern matching nothing is an error.
    pub fn expand_pattern(&self, path: &str) -> Result<Vec<String>> {
        if !pattern::is_pattern(path) {
            return Ok(vec![path.to_string()]);
        }
        let segs: Vec<&str> = path.split('.').collect();
        if LAYER_NAMES.contains(&segs[0]) && segs.get(1) == Some(&"*") && !segs[2..].contains(&"*")
        {
            return Ok((0..self.names.num_layers)
                .map(|i| {
                    let mut s = segs.clone();
                    let i = i.to_string();
                    s[1] = &i;
                    s.join(".")
                })
                .collect());
        }
        let all = self.hookpoints()?;
        let found: Vec<String> = all
            .iter()
            .filter(|p| pattern::matches(path, p))
            .cloned()
            .collect();
        if found.is_empty() {
            let literal: String = path
                .split('.')
                .take_while(|s| *s != "*" && *s != "**")
                .collect::<Vec<_>>()
                .join(".");
            return Err(Error::Hookpoint {
                path: path.into(),
                msg: "the pattern matches no hookpoint (patterns match hookpoint paths such as \
                      `model.layers.0.self_attn.o_proj.output`; `*` is one segment, `**` any number)"
                    .into(),
                suggestions: crate::nearest(&literal, all.iter().map(|s| s.as_str()), 3),
            });
        }
        Ok(found)
    }

    /// This model's attention-probability hookpoint, relative to `attentions.L` (from the registry,
    /// or set with [`Model::set_attention_probabilities`]).
    pub fn attention_probabilities_path(&self) -> Option<&str> {
        self.attn_probs.as_ref().map(|(p, _)| p.as_str())
    }

    /// Shape convention of the attention-probability hookpoint.
    pub fn attention_probabilities_shape(&self) -> ProbShape {
        self.attn_probs
            .as_ref()
            .map(|(_, s)| *s)
            .unwrap_or(ProbShape::Standard)
    }

    /// Registers the attention-probability hookpoint for this model (e.g. from discovery).
    pub fn set_attention_probabilities(&mut self, path: &str, shape: ProbShape) -> Result<()> {
        let old = self.attn_probs.replace((path.to_string(), shape));
        // Validate against the model before keeping it.
        if let Err(e) = self.resolve("attention_probabilities.0") {
            self.attn_probs = old;
            return Err(e);
        }
        Ok(())
    }

    /// Forgets the registered hookpoint (as for an architecture with no registry row).
    pub fn clear_attention_probabilities(&mut self) {
        self.attn_probs = None;
    }

    /// The Hugging Face class: config.json's `architectures[0]`, else the registry's.
    pub fn class_name(&self) -> String {
        self.config
            .raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .unwrap_or(self.arch.class)
            .to_string()
    }

    /// Number of attention heads.
    pub fn num_heads(&self) -> Result<usize> {
        Ok(self.dims().heads)
    }

    /// Hidden size.
    pub fn hidden_size(&self) -> Result<usize> {
        Ok(self.dims().hidden)
    }
}

/// The shape a saved value is expected to have for a [B, T] input, by a per-name rule: logits are
/// [B, T, vocab]; attention probabilities (and, as an upper bound, anything inside an attention
/// module) [B, heads, T, T]; everything else at most [B, T, max(hidden, MLP width)]. An estimate
/// for refusing hopeless requests, not a promise.
pub(crate) fn estimate_shape(model: &Model, hp: &HookPath, b: usize, t: usize) -> Vec<usize> {
    let dims = model.dims();
    let hidden = dims.hidden;
    // The MLP width is not one of the sizes every model reports; an upper bound is enough here.
    let inner = model
        .config
        .usize(&["intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"])
        .unwrap_or(4 * hidden);
    let heads = dims.heads;
    let names = &model.names;
    let canonical = hp.canonical.as_str();
    let lm_head_out = format!("{}.output", names.lm_head);
    // The model's own output (standard `logits`) is [B, T, vocab] too.
    if canonical == lm_head_out
        || canonical.starts_with(&format!("{lm_head_out}."))
        || canonical == "output"
        || canonical.starts_with("output.")
    {
        return vec![b, t, model.vocab_size];
    }
    let width = hidden.max(inner);
    let entry = model.modules.get(hp.module);
    let in_attention = entry
        .path
        .split('.')
        .any(|seg| rule("self_attn").contains(&seg));
    let probs_cols = match model.attention_probabilities_shape() {
        ProbShape::Standard => t,
        ProbShape::SinkColumn => t + 1,
    };
    if hp.given.starts_with("attention_probabilities") {
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
