//! `nnscope view`: pictures of a prompt's attention patterns: a self-contained HTML page
//! (`--out`) and a PNG of one layer's heads (`--png`).

use crate::{check_out, err, load_dir, locate, parse_dtype, ModelArgs};
use clap::Args;
use nnscope::hub;
use nnscope::models::ProbShape;
use nnscope::viewer::{self, LayerPattern};
use nnscope::{Input, Model};
use std::path::PathBuf;

/// Arguments of `nnscope view`.
#[derive(Args)]
pub struct ViewArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt whose attention is shown.
    #[arg(long)]
    prompt: String,
    /// Layers to show (comma-separated; negative counts from the end); default: every layer.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    layers: Option<Vec<i64>>,
    /// The HTML page to write (self-contained: open it in any browser, no network needed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A PNG heatmap of one layer's heads (the first of --layers, or --png-layer).
    #[arg(long)]
    png: Option<PathBuf>,
    /// The layer drawn by --png (negative counts from the end).
    #[arg(long, allow_hyphen_values = true)]
    png_layer: Option<i64>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

fn layer_index(l: i64, n: usize) -> Result<usize, String> {
    let i = if l < 0 { n as i64 + l } else { l };
    if i < 0 || i >= n as i64 {
        return Err(format!(
            "layer {l} does not exist: the model has {n} layers (0..{}, or -{n}..-1)",
            n.saturating_sub(1)
        ));
    }
    Ok(i as usize)
}

/// Token labels for the prompt's ids, as the tokenizer decodes each one.
fn token_labels(m: &Model, ids: &candle_core::Tensor) -> Result<Vec<String>, String> {
    let ids: Vec<u32> = ids
        .get(0)
        .and_then(|r| r.to_dtype(candle_core::DType::U32))
        .and_then(|r| r.to_vec1())
        .map_err(crate::candle_err)?;
    let tok = m
        .tokenizer
        .as_ref()
        .ok_or("this model has no tokenizer.json, so a --prompt cannot be encoded")?;
    Ok(ids
        .iter()
        .map(|&i| tok.decode(&[i], false).unwrap_or_else(|_| format!("<{i}>")))
        .collect())
}

/// Runs `nnscope view`.
pub fn view(args: ViewArgs) -> Result<(), String> {
    if args.out.is_none() && args.png.is_none() {
        return Err("give --out PAGE.html and/or --png PICTURE.png".into());
    }
    for p in [&args.out, &args.png].into_iter().flatten() {
        check_out(p)?;
    }
    let dtype = parse_dtype(&args.dtype)?;
    let dir = locate(&args.model)?;
    for p in [&args.out, &args.png].into_iter().flatten() {
        hub::check_output_path(p, &dir).map_err(err)?;
    }
    let m = load_dir(&args.model, &dir, dtype)?;
    let n = m.num_layers();
    let mut layers: Vec<usize> = match &args.layers {
        Some(ls) => ls
            .iter()
            .map(|l| layer_index(*l, n))
            .collect::<Result<_, _>>()?,
        None => (0..n).collect(),
    };
    let requested = layers.clone();
    let png_layer = match args.png_layer {
        Some(l) => Some(layer_index(l, n)?),
        None => layers.first().copied(),
    };
    if let Some(l) = png_layer {
        if !layers.contains(&l) {
            layers.push(l);
        }
    }
    let (ids, _mask) = m.tokenize(&[args.prompt.as_str()]).map_err(err)?;
    let tokens = token_labels(&m, &ids)?;
    let mut trace = m.trace(Input::ids(ids));
    for l in &layers {
        trace = trace
            .save(&format!("attention_probabilities.{l}"))
            .map_err(err)?;
    }
    let res = trace.run().map_err(err)?;
    let sink = m.attention_probabilities_shape() == ProbShape::SinkColumn;
    let mut patterns = Vec::new();
    for &l in &layers {
        let p = res
            .get(&format!("attention_probabilities.{l}"))
            .map_err(err)?
            .get(0)
            .map_err(crate::candle_err)?;
        patterns.push(LayerPattern { layer: l, probs: p });
    }
    let name = m.class_name();
    if let Some(out) = &args.out {
        let shown: Vec<LayerPattern> = patterns
            .iter()
            .filter(|p| requested.contains(&p.layer))
            .cloned()
            .collect();
        let title = format!("{name}: {}", args.prompt);
        let page = viewer::attention_html(&title, &tokens, &shown, sink).map_err(err)?;
        std::fs::write(out, page).map_err(|e| format!("{}: {e}", out.display()))?;
        println!(
            "{}: attention of {} layers, {} tokens",
            out.display(),
            shown.len(),
            tokens.len()
        );
    }
    if let (Some(png), Some(l)) = (&args.png, png_layer) {
        let p = patterns
            .iter()
            .find(|p| p.layer == l)
            .ok_or("internal: the --png layer was not traced")?;
        let heads = p.probs.dim(0).map_err(crate::candle_err)?;
        let panels: Vec<(String, candle_core::Tensor)> = (0..heads)
            .map(|h| p.probs.get(h).map(|t| (format!("head {h}"), t)))
            .collect::<Result<_, _>>()
            .map_err(crate::candle_err)?;
        let mut cols = tokens.clone();
        if sink {
            cols.push("<sink>".into());
        }
        viewer::heatmaps_png(
            &panels,
            &tokens,
            &cols,
            &format!("{name}: attention, layer {l} (rows: queries, columns: keys)"),
            png,
        )
        .map_err(err)?;
        println!("{}: layer {l}, {heads} heads", png.display());
    }
    Ok(())
}
