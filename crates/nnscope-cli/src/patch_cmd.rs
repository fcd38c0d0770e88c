//! `nnscope patch`: activation patching and attribution patching of the residual stream (and of
//! each attention head with `--heads`).

use crate::{check_out, err, load_dir, locate, parse_dtype, write_atomic, ModelArgs};
use clap::Args;
use nnscope::experiments::patching;
use nnscope::hub;
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `nnscope patch`.
#[derive(Args)]
pub struct PatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The clean prompt (values are taken from its run).
    #[arg(long)]
    clean: String,
    /// The corrupt prompt (the run that is patched); same token length as the clean one.
    #[arg(long)]
    corrupt: String,
    /// The answer: the metric is logits[last, first token of ANSWER] - logits[last, first token
    /// of WRONG] (texts encoded without special tokens).
    #[arg(long)]
    answer: String,
    /// The wrong answer.
    #[arg(long)]
    wrong: String,
    /// Also patch each attention head's output (the input of the output projection), at every
    /// position: `heads` and `heads_attribution` [L, H].
    #[arg(long)]
    heads: bool,
    /// Output safetensors file: `clean_metric` [1], `corrupt_metric` [1], `resid` [L, T],
    /// `resid_attribution` [L, T] (float32), `clean_ids`, `corrupt_ids`, `answer_wrong` (int64);
    /// with `--heads` also `heads` and `heads_attribution` [L, H].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Heatmap PNG of `resid` and `resid_attribution` (layers x tokens); with `--heads` also
    /// `heads` and `heads_attribution` (layers x heads) in FILE_heads.png beside it.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

fn print_table(name: &str, t: &candle_core::Tensor, cols: &[String]) -> Result<(), String> {
    let rows = t.to_vec2::<f32>().map_err(crate::candle_err)?;
    println!("{name}:");
    println!(
        "  {:>6} {}",
        "",
        cols.iter()
            .map(|c| format!("{:>9}", truncate(c)))
            .collect::<String>()
    );
    for (l, r) in rows.iter().enumerate() {
        println!(
            "  {:>6} {}",
            format!("L{l}"),
            r.iter().map(|v| format!("{v:>9.4}")).collect::<String>()
        );
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 8 {
        s.chars().take(8).collect()
    } else {
        s.to_string()
    }
}

/// Runs `nnscope patch`; returns what it measured (the tensors `--png` draws).
pub fn patch_cmd(args: PatchArgs) -> Result<patching::PatchOutput, String> {
    let dtype = parse_dtype(&args.dtype)?;
    if let Some(out) = &args.out {
        check_out(out)?;
    }
    if let Some(png) = &args.png {
        check_out(png)?;
    }
    let dir = locate(&args.model)?;
    for out in [&args.out, &args.png].into_iter().flatten() {
        hub::check_output_path(out, &dir).map_err(err)?;
    }
    let m = load_dir(&args.model, &dir, dtype)?;
    let setup = patching::PatchSetup::new(&args.clean, &args.corrupt, &args.answer, &args.wrong);
    let p = patching::patch(&m, &setup, args.heads).map_err(err)?;
    println!("clean metric   {:+.5}", p.clean_metric);
    println!("corrupt metric {:+.5}", p.corrupt_metric);
    print_table(
        "resid (activation patching of layers_output.L at each position)",
        &p.resid,
        &p.tokens,
    )?;
    print_table("resid_attribution", &p.resid_attribution, &p.tokens)?;
    if let (Some(h), Some(ha)) = (&p.heads, &p.heads_attribution) {
        let cols: Vec<String> = (0..h.dims()[1]).map(|i| format!("H{i}")).collect();
        print_table(
            "heads (activation patching of one head at every position)",
            h,
            &cols,
        )?;
        print_table("heads_attribution", ha, &cols)?;
    }
    if let Some(out) = &args.out {
        let tensors: HashMap<_, _> = p.named_tensors().map_err(err)?.into_iter().collect();
        write_atomic(&tensors, out)?;
    }
    if let Some(png) = &args.png {
        let layers: Vec<String> = (0..p.resid.dims()[0]).map(|l| format!("L{l}")).collect();
        nnscope::viewer::heatmaps_png(
            &[
                ("resid".to_string(), p.resid.clone()),
                ("resid_attribution".to_string(), p.resid_attribution.clone()),
            ],
            &layers,
            &p.tokens,
            "activation patching (metric per layer and position)",
            png,
        )
        .map_err(err)?;
        eprintln!("wrote {}", png.display());
        if let (Some(h), Some(ha)) = (&p.heads, &p.heads_attribution) {
            let cols: Vec<String> = (0..h.dims()[1]).map(|i| format!("H{i}")).collect();
            let stem = png
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let heads_png = png.with_file_name(format!("{stem}_heads.png"));
            nnscope::viewer::heatmaps_png(
                &[
                    ("heads".to_string(), h.clone()),
                    ("heads_attribution".to_string(), ha.clone()),
                ],
                &layers,
                &cols,
                "activation patching of each head (metric per layer and head)",
                &heads_png,
            )
            .map_err(err)?;
            eprintln!("wrote {}", heads_png.display());
        }
    }
    Ok(p)
}
