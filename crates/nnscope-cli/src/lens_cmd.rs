//! `nnscope lens`: the logit lens (every layer's output through the model's own head).

use crate::{
    candle_err, check_out, err, load_dir, locate, parse_dtype, read_inputs, write_atomic, ModelArgs,
};
use candle_core::{DType, Tensor};
use clap::Args;
use nnscope::experiments::{lens, token_text, top_k};
use nnscope::hub;
use nnscope::Input;
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `nnscope lens`.
#[derive(Args)]
pub struct LensArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt (repeat for a left-padded batch).
    #[arg(long = "prompt", conflicts_with = "inputs")]
    prompts: Vec<String>,
    /// A safetensors file with `input_ids` (I64 [B, T]) and optionally `attention_mask`.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// How many tokens to print per layer (at the last position).
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Also compute nnterp's inverse logits, lm_head(-ln_final(h)) (`--out` key `inverse_logit_lens`).
    #[arg(long)]
    inverse: bool,
    /// Output safetensors file: `logit_lens` [L, B, T, vocab] (float32 logits) and `input_ids`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Heatmap PNG (first row of the batch): per layer and position, the probability the layer's
    /// lens gives to the token the model finally predicts there.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
}

/// What `nnscope lens` computed: the tensors it writes and the token labels, returned for
/// pictures (`--png` draws from it).
#[allow(dead_code)] // Read by the picture code.
pub struct LensResult {
    /// The lens.
    pub lens: lens::LensOutput,
    /// Each row's tokens as text [B][T].
    pub tokens: Vec<Vec<String>>,
}

/// Runs `nnscope lens`.
pub fn lens_cmd(args: LensArgs) -> Result<LensResult, String> {
    let dtype = parse_dtype(&args.dtype)?;
    if let Some(out) = &args.out {
        check_out(out)?;
    }
    if let Some(png) = &args.png {
        check_out(png)?;
    }
    if args.top_k == 0 {
        return Err("--top-k must be at least 1".into());
    }
    let input = match (args.inputs, args.prompts.is_empty()) {
        (Some(p), _) => read_inputs(&p)?,
        (None, false) => Input::Prompts(args.prompts),
        (None, true) => return Err("give --prompt TEXT or --inputs IDS.safetensors".into()),
    };
    let dir = locate(&args.model)?;
    for out in [&args.out, &args.png].into_iter().flatten() {
        hub::check_output_path(out, &dir).map_err(err)?;
    }
    let m = load_dir(&args.model, &dir, dtype)?;
    let res = lens::logit_lens(&m, &input, args.inverse).map_err(err)?;
    let probs = res.last_probs(false).map_err(err)?; // [B, L, V]
    let ids = res.input_ids.to_vec2::<u32>().map_err(candle_err)?;
    let b = ids.len();
    for (row, row_ids) in ids.iter().enumerate() {
        if b > 1 {
            println!("prompt {row}:");
        }
        let last = row_ids.last().copied().unwrap_or(0);
        println!("  last token {:?}", token_text(&m, last));
        let p = probs.get(row).map_err(candle_err)?;
        for l in 0..m.num_layers() {
            let top = top_k(&p.get(l).map_err(candle_err)?, args.top_k).map_err(err)?;
            let cells: Vec<String> = top
                .iter()
                .map(|(id, pr)| format!("{:?} {pr:.3}", token_text(&m, *id)))
                .collect();
            println!("  layer {l:>3}: {}", cells.join("  "));
        }
    }
    let tokens: Vec<Vec<String>> = ids
        .iter()
        .map(|r| r.iter().map(|&i| token_text(&m, i)).collect())
        .collect();
    if let Some(out) = &args.out {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert(
            "logit_lens".into(),
            res.logits.contiguous().map_err(candle_err)?,
        );
        if let Some(inv) = &res.inverse {
            tensors.insert(
                "inverse_logit_lens".into(),
                inv.contiguous().map_err(candle_err)?,
            );
        }
        tensors.insert(
            "input_ids".into(),
            res.input_ids.to_dtype(DType::I64).map_err(candle_err)?,
        );
        write_atomic(&tensors, out)?;
    }
    if let Some(png) = &args.png {
        lens_png(&res, &tokens, png)?;
        eprintln!("wrote {}", png.display());
    }
    Ok(LensResult { lens: res, tokens })
}

/// The lens picture of row 0: [L, T] probabilities of the last layer's top token at each position.
fn lens_png(
    res: &lens::LensOutput,
    tokens: &[Vec<String>],
    png: &std::path::Path,
) -> Result<(), String> {
    let row = res
        .logits
        .narrow(1, 0, 1)
        .and_then(|t| t.squeeze(1))
        .map_err(candle_err)?; // [L, T, V]
    let probs = row
        .max_keepdim(candle_core::D::Minus1)
        .and_then(|m| row.broadcast_sub(&m))
        .and_then(|x| x.exp())
        .and_then(|e| {
            e.sum_keepdim(candle_core::D::Minus1)
                .and_then(|s| e.broadcast_div(&s))
        })
        .map_err(candle_err)?;
    let l = probs.dim(0).map_err(candle_err)?;
    let last = probs.get(l - 1).map_err(candle_err)?; // [T, V]
    let top = last.argmax(candle_core::D::Minus1).map_err(candle_err)?; // [T]
    let (_, t, v) = probs.dims3().map_err(candle_err)?;
    let idx = top
        .reshape((1, t, 1))
        .and_then(|i| i.broadcast_as((l, t, 1)))
        .and_then(|i| i.contiguous())
        .map_err(candle_err)?;
    let picked = probs
        .gather(&idx, 2)
        .and_then(|p| p.squeeze(2))
        .map_err(candle_err)?; // [L, T]
    let _ = v;
    let layers: Vec<String> = (0..l).map(|i| format!("L{i}")).collect();
    let cols = tokens.first().cloned().unwrap_or_default();
    nnscope::viewer::heatmap_png(
        &picked,
        &layers,
        &cols,
        "logit lens: probability of the final top token, per layer and position",
        png,
    )
    .map_err(err)
}
