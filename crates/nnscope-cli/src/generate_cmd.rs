//! `nnscope generate`: generation with the key/value cache, with saves at every step.

use crate::{
    candle_err, check_out, err, load_dir, locate, parse_dtype, read_inputs, warn_non_finite_value,
    write_atomic, ModelArgs,
};
use candle_core::DType;
use clap::Args;
use nnscope::hub;
use nnscope::{GenerateOptions, Input};
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `nnscope generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A prompt (repeat for a left-padded batch).
    #[arg(long = "prompt", conflicts_with = "inputs")]
    prompts: Vec<String>,
    /// A safetensors file with `input_ids` (I64 [B, T]) and optionally `attention_mask`.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// How many new tokens to generate.
    #[arg(long)]
    max_new_tokens: usize,
    /// Sample with this temperature (greedy when no sampling flag is given).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability reaches P, in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampler (the same seed gives the same tokens).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating after end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// A standard name or hookpoint path to save at every step, as NAME@STEP; `*` in place of a
    /// layer index means every layer; hookpoint patterns take `*` (one segment) and `**` (any).
    #[arg(long = "save")]
    saves: Vec<String>,
    /// Save only at steps A..B (A:B, end excluded; A: for every step from A). Step 0 is the
    /// forward over the prompt, step S the forward over the S-th new token.
    #[arg(long)]
    steps: Option<String>,
    /// Output safetensors file: `output_ids` (I64 [B, T + N]) and every save as NAME@STEP
    /// (float32).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[command(flatten)]
    sae: crate::sae_args::SaeArgs,
}

/// `A:B` or `A:` -> (A, Some(B)) / (A, None).
fn parse_steps(s: &str) -> Result<(usize, Option<usize>), String> {
    let bad = || format!("--steps `{s}`: expected A:B (steps A to B - 1) or A: (from A on)");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let a: usize = if a.is_empty() {
        0
    } else {
        a.parse().map_err(|_| bad())?
    };
    let b = if b.is_empty() {
        None
    } else {
        Some(b.parse::<usize>().map_err(|_| bad())?)
    };
    if let Some(b) = b {
        if b <= a {
            return Err(format!("--steps `{s}`: the range is empty ({b} <= {a})"));
        }
    }
    Ok((a, b))
}

/// Runs `nnscope generate`.
pub fn generate(args: GenerateArgs) -> Result<(), String> {
    let dtype = parse_dtype(&args.dtype)?;
    if let Some(out) = &args.out {
        check_out(out)?;
    }
    let steps = args.steps.as_deref().map(parse_steps).transpose()?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ignore_eos: args.ignore_eos,
    };
    // Bad options fail before the model loads, which can take minutes.
    opts.validate().map_err(err)?;
    let input = match (args.inputs, args.prompts.is_empty()) {
        (Some(p), _) => read_inputs(&p)?,
        (None, false) => Input::Prompts(args.prompts),
        (None, true) => return Err("give --prompt TEXT or --inputs IDS.safetensors".into()),
    };
    let dir = locate(&args.model)?;
    // Never write over a file the model is loaded from.
    if let Some(out) = &args.out {
        hub::check_output_path(out, &dir).map_err(err)?;
    }
    let m = load_dir(&args.model, &dir, dtype)?;
    let mut gen = crate::sae_args::apply_sae_args!(m.generate(input).options(opts), args.sae);
    // Patterns (`layers_output.*`, `model.layers.*.self_attn.**`) expand in the library.
    for n in &args.saves {
        gen = gen.save(n).map_err(err)?;
        if let Some((a, b)) = steps {
            gen = match b {
                Some(b) => gen.steps(a, b),
                None => gen.steps_from(a),
            }
            .map_err(err)?;
        }
    }
    let res = gen.run().map_err(err)?;
    for text in &res.texts {
        println!("{text}");
    }
    if let Some(out) = &args.out {
        let mut tensors = HashMap::new();
        tensors.insert("output_ids".to_string(), res.output_ids.clone());
        for (name, vals) in &res.saved {
            // A hookpoint that fires more than once in a forward also writes NAME#1, NAME#2, ...
            for (i, v) in vals.iter().enumerate() {
                let key = if i == 0 {
                    name.clone()
                } else {
                    format!("{name}#{i}")
                };
                let t = v
                    .to_dtype(DType::F32)
                    .and_then(|t| t.contiguous())
                    .map_err(candle_err)?;
                warn_non_finite_value(&key, &t)?;
                tensors.insert(key, t);
            }
        }
        write_atomic(&tensors, out)?;
        // stdout holds the continuations; what was written goes to stderr.
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for n in names {
            eprintln!("{n} {:?} {:?}", tensors[n].dims(), tensors[n].dtype());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_steps;

    #[test]
    fn steps_parse() {
        assert_eq!(parse_steps("1:3"), Ok((1, Some(3))));
        assert_eq!(parse_steps("2:"), Ok((2, None)));
        assert!(parse_steps("3:1").is_err());
        assert!(parse_steps("x").is_err());
    }
}
