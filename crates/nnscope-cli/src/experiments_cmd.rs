//! `nnscope patchscope`, `nnscope dla`, `nnscope prompts` and `nnscope grad`: the experiments of
//! `nnscope::experiments` that are not `lens` or `patch`.

use crate::{
    candle_err, check_out, err, load_dir, locate, parse_dtype, warn_non_finite_value, write_atomic,
    ModelArgs,
};
use candle_core::{DType, Tensor};
use clap::Args;
use nnscope::experiments::{attribution, gradients, patchscope, prompts, token_text, top_k};
use nnscope::{hub, Input, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn prepare(model: &ModelArgs, dtype: &str, out: Option<&Path>) -> Result<Model, String> {
    let dtype = parse_dtype(dtype)?;
    if let Some(out) = out {
        check_out(out)?;
    }
    let dir = locate(model)?;
    if let Some(out) = out {
        hub::check_output_path(out, &dir).map_err(err)?;
    }
    load_dir(model, &dir, dtype)
}

/// Arguments of `nnscope patchscope`.
#[derive(Args)]
pub struct PatchscopeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A source prompt (repeat for several).
    #[arg(long = "source", required = true)]
    sources: Vec<String>,
    /// The target prompt (default: nnterp's "king king\n1135 1135\nhello hello\n?").
    #[arg(long)]
    target: Option<String>,
    /// The target position the source state is written to (negative counts from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    target_position: i64,
    /// The source position read (negative counts from the end of each source prompt).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    source_position: i64,
    /// Layers (default: every layer).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Generate this many tokens from the patched target instead (one continuation per layer).
    #[arg(long)]
    generate: Option<usize>,
    /// Tokens to print per layer.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Output safetensors file: `patchscope` [sources, layers, vocab] probabilities (float32).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

/// Runs `nnscope patchscope`.
pub fn patchscope_cmd(a: PatchscopeArgs) -> Result<(), String> {
    let m = prepare(&a.model, &a.dtype, a.out.as_deref())?;
    let target = match &a.target {
        Some(t) => patchscope::TargetPrompt {
            prompt: t.clone(),
            index_to_patch: a.target_position,
        },
        None => patchscope::TargetPrompt {
            index_to_patch: a.target_position,
            ..Default::default()
        },
    };
    let sources: Vec<&str> = a.sources.iter().map(|s| s.as_str()).collect();
    let layers: Vec<usize> = if a.layers.is_empty() {
        (0..m.num_layers()).collect()
    } else {
        a.layers.clone()
    };
    if let Some(n) = a.generate {
        for &l in &layers {
            let texts =
                patchscope::patchscope_generate(&m, &sources, &target, l, a.source_position, n)
                    .map_err(err)?;
            for (s, t) in texts.iter().enumerate() {
                println!("source {s} layer {l:>3}: {t:?}");
            }
        }
        return Ok(());
    }
    let probs =
        patchscope::patchscope_lens(&m, &sources, &target, Some(&layers), a.source_position)
            .map_err(err)?;
    for (s, src) in sources.iter().enumerate() {
        println!("source {s}: {src:?}");
        let p = probs.get(s).map_err(candle_err)?;
        for (i, l) in layers.iter().enumerate() {
            let top = top_k(&p.get(i).map_err(candle_err)?, a.top_k).map_err(err)?;
            let cells: Vec<String> = top
                .iter()
                .map(|(id, pr)| format!("{:?} {pr:.3}", token_text(&m, *id)))
                .collect();
            println!("  layer {l:>3}: {}", cells.join("  "));
        }
    }
    if let Some(out) = &a.out {
        write_atomic(&HashMap::from([("patchscope".to_string(), probs)]), out)?;
    }
    Ok(())
}

/// Arguments of `nnscope dla`.
#[derive(Args)]
pub struct DlaArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The answer (its first token, encoded without special tokens).
    #[arg(long)]
    answer: String,
    /// The wrong answer: the logit difference is answer - wrong.
    #[arg(long)]
    wrong: String,
    /// Split each attention into its heads.
    #[arg(long)]
    heads: bool,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

/// Runs `nnscope dla`.
pub fn dla_cmd(a: DlaArgs) -> Result<(), String> {
    let m = prepare(&a.model, &a.dtype, None)?;
    let r = attribution::direct_logit_attribution(
        &m,
        &Input::prompts(&[a.prompt.as_str()]),
        &a.answer,
        &a.wrong,
        a.heads,
    )
    .map_err(err)?;
    for (name, v) in &r.parts {
        println!("{name:<20} {v:+.5}");
    }
    println!("{:<20} {:+.5}", "bias", r.bias);
    println!("{:<20} {:+.5}", "sum", r.sum());
    println!("{:<20} {:+.5}", "logit difference", r.logit_diff);
    Ok(())
}

/// Arguments of `nnscope prompts`.
#[derive(Args)]
pub struct PromptsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt (repeat for several).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// A category of target words, `NAME=word,word,...` (repeat for several). Each word counts by
    /// its first token with and without a leading space.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Probabilities from every layer's logit lens, not only the logits.
    #[arg(long)]
    per_layer: bool,
    /// Output safetensors file: one tensor per category, [prompts] or [prompts, layers].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

/// Runs `nnscope prompts`.
pub fn prompts_cmd(a: PromptsArgs) -> Result<(), String> {
    let mut cats: Vec<(String, Vec<String>)> = Vec::new();
    for t in &a.targets {
        let (name, words) = t
            .split_once('=')
            .ok_or_else(|| format!("--target `{t}`: expected NAME=word,word,..."))?;
        let words: Vec<String> = words
            .split(',')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        if name.is_empty() || words.is_empty() {
            return Err(format!("--target `{t}`: expected NAME=word,word,..."));
        }
        cats.push((name.to_string(), words));
    }
    let m = prepare(&a.model, &a.dtype, a.out.as_deref())?;
    let word_refs: Vec<Vec<&str>> = cats
        .iter()
        .map(|(_, w)| w.iter().map(|s| s.as_str()).collect())
        .collect();
    let cat_refs: Vec<(&str, &[&str])> = cats
        .iter()
        .zip(&word_refs)
        .map(|((n, _), w)| (n.as_str(), w.as_slice()))
        .collect();
    let ps: Vec<prompts::Prompt> = a
        .prompts
        .iter()
        .map(|p| prompts::Prompt::from_words(&m, p, &cat_refs))
        .collect::<nnscope::Result<_>>()
        .map_err(err)?;
    let res = prompts::run_prompts(&m, &ps, a.per_layer).map_err(err)?;
    for (cat, t) in &res {
        let t = t.to_dtype(DType::F32).map_err(candle_err)?;
        if a.per_layer {
            for (i, row) in t.to_vec2::<f32>().map_err(candle_err)?.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
                println!("{cat} prompt {i}: {}", cells.join(" "));
            }
        } else {
            let v = t.to_vec1::<f32>().map_err(candle_err)?;
            let cells: Vec<String> = v.iter().map(|v| format!("{v:.4}")).collect();
            println!("{cat}: {}", cells.join(" "));
        }
    }
    if let Some(out) = &a.out {
        write_atomic(&res.into_iter().collect(), out)?;
    }
    Ok(())
}

/// Arguments of `nnscope grad`.
#[derive(Args)]
pub struct GradArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The scalar is logits[last, first token of ANSWER] (minus that of WRONG when given).
    #[arg(long)]
    answer: String,
    /// The wrong answer.
    #[arg(long)]
    wrong: Option<String>,
    /// A standard name or hookpoint path to differentiate with respect to; `*` in place of a layer
    /// index means every layer.
    #[arg(long = "wrt", required = true)]
    wrt: Vec<String>,
    /// Output safetensors file: the gradient for each `--wrt` under its name (float32).
    #[arg(long)]
    out: PathBuf,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

/// Runs `nnscope grad`.
pub fn grad_cmd(a: GradArgs) -> Result<(), String> {
    let m = prepare(&a.model, &a.dtype, Some(&a.out))?;
    // `layers_output.*` per layer, and hookpoint patterns (`*`, `**`).
    let mut names: Vec<String> = Vec::new();
    for s in &a.wrt {
        names.extend(m.expand_pattern(s).map_err(err)?);
    }
    let wrt: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let g = gradients::answer_gradients(
        &m,
        &Input::prompts(&[a.prompt.as_str()]),
        &wrt,
        &a.answer,
        a.wrong.as_deref(),
    )
    .map_err(err)?;
    println!("scalar {:+.6}", g.value);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, _, grad) in &g.grads {
        let t = grad
            .to_dtype(DType::F32)
            .and_then(|t| t.contiguous())
            .map_err(candle_err)?;
        warn_non_finite_value(name, &t)?;
        println!("{name} {:?} float32", t.dims());
        tensors.insert(name.clone(), t);
    }
    write_atomic(&tensors, &a.out)
}
