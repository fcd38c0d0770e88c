//! `nnscope collect`: activations over a corpus, into resumable safetensors shards; `--merge` joins
//! the folders of a run split with `--shard I/N`.

use crate::sae_args::SaeArgs;
use crate::{err, load_dir, locate, parse_dtype, progress, ModelArgs};
use clap::Args;
use nnscope::collect::{self, CollectOptions, Corpus, Positions, Shard};
use std::path::PathBuf;

/// Arguments of `nnscope collect`.
#[derive(Args)]
pub struct CollectArgs {
    /// Model folder or Hugging Face Hub id (`owner/name`); not with --merge.
    #[arg(required_unless_present = "merge")]
    model: Option<String>,
    /// Branch, tag or commit of a hub id (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// The corpus: plain text (one document a line), or JSON Lines (`.jsonl`, `.ndjson`, or when
    /// --field is given) with each document under --field.
    #[arg(long, required_unless_present = "merge")]
    dataset: Option<PathBuf>,
    /// The JSON Lines field holding the text [default: text].
    #[arg(long)]
    field: Option<String>,
    /// A standard name or hookpoint path whose value is [batch, tokens, ...] (`layers_output.3`,
    /// `mlps_output.*`, `logits`); repeat for several. `*` means every layer, negative indices
    /// count from the last layer.
    #[arg(long = "save")]
    saves: Vec<String>,
    /// Output folder: part-NNNNN.safetensors shards and manifest.json. Running the same command
    /// again resumes after the last complete shard.
    #[arg(long)]
    out: PathBuf,
    /// Which token positions of each document to write: all, last, or mean (over real tokens).
    #[arg(long, default_value = "all")]
    positions: String,
    /// Truncate each document to its first N tokens [default: the model's maximum length].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Documents per forward (left-padded).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Documents per shard file (with the batch, what bounds memory).
    #[arg(long, default_value_t = 1000)]
    shard_docs: usize,
    /// Take only part I of N of the corpus (I from 0), contiguous and deterministic: for a Slurm
    /// array or a Kubernetes Indexed Job, each part into its own --out, then --merge.
    #[arg(long)]
    shard: Option<String>,
    /// Merge the finished folders of all parts of a --shard run into --out (hard links to their
    /// shard files and one manifest).
    #[arg(long, num_args = 1.., conflicts_with_all = ["model", "dataset", "saves", "shard", "saes", "top_k"])]
    merge: Vec<PathBuf>,
    /// Compute dtype: float32, bfloat16 or float16 (values are written as float32).
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Sparse autoencoders (--sae DIR[=PATH], then --save PATH.sae.feature_acts), --splice and
    /// --clamp, as on `run`; recorded in manifest.json.
    #[command(flatten)]
    sae: SaeArgs,
    /// Store only the K largest features of each row of every `*.sae.feature_acts` save, as
    /// SAVE.top_k_values (float32 [rows, K]) and SAVE.top_k_indices (int64 [rows, K]); with
    /// --positions mean, the top K of the document's mean activations.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
}

/// Runs `nnscope collect`.
pub fn collect(args: CollectArgs) -> Result<(), String> {
    if !args.merge.is_empty() {
        let s = collect::merge(&args.merge, &args.out).map_err(err)?;
        println!(
            "merged {} folders: {} documents, {} tokens in {} shards in {}",
            args.merge.len(),
            s.documents,
            s.tokens,
            s.parts,
            s.out.display()
        );
        return Ok(());
    }
    // Everything the user gave is checked before the model loads, which can take minutes.
    let dtype = parse_dtype(&args.dtype)?;
    let positions: Positions = args.positions.parse().map_err(err)?;
    let shard: Option<Shard> = args
        .shard
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(err)?;
    if args.saves.is_empty() {
        return Err(
            "give at least one --save NAME (a standard name such as `layers_output.0`, or a hookpoint path)"
                .into(),
        );
    }
    if args.batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    if args.shard_docs == 0 {
        return Err("--shard-docs must be at least 1".into());
    }
    if args.max_tokens == Some(0) {
        return Err("--max-tokens must be at least 1".into());
    }
    if args.top_k == Some(0) {
        return Err("--top-k must be at least 1".into());
    }
    if args.top_k.is_some() && !args.saves.iter().any(|s| collect::is_feature_acts(s)) {
        return Err(
            "--top-k keeps the largest SAE features: give --sae DIR and --save H.sae.feature_acts"
                .into(),
        );
    }
    let clamps = args.sae.clamps()?;
    let Some(model_name) = args.model else {
        return Err("give MODEL".into());
    };
    let Some(dataset) = args.dataset else {
        return Err("give --dataset FILE".into());
    };
    if !dataset.is_file() {
        return Err(format!("--dataset {}: no such file", dataset.display()));
    }
    if args.out.exists() && !args.out.is_dir() {
        return Err(format!(
            "--out {}: is a file; collect writes a folder",
            args.out.display()
        ));
    }
    let jsonl = args.field.is_some()
        || matches!(
            dataset.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "ndjson")
        );
    let corpus = if jsonl {
        Corpus::json_lines(&dataset, args.field.as_deref().unwrap_or("text"))
    } else {
        Corpus::text(&dataset)
    };
    let model_args = ModelArgs {
        model: model_name.clone(),
        revision: args.revision.clone(),
    };
    let saes = args.sae.attachments()?;
    let dir = locate(&model_args)?;
    let m = load_dir(&model_args, &dir, dtype)?;
    // `layers_output.*` per layer, and hookpoint patterns (`*`, `**`).
    let mut saves: Vec<String> = Vec::new();
    for s in &args.saves {
        saves.extend(m.expand_pattern(s).map_err(err)?);
    }
    // A folder is recorded by its absolute path, so a resume from elsewhere names the same model.
    let model_id = if std::path::Path::new(&model_name).is_dir() {
        std::fs::canonicalize(&model_name)
            .map(|p| p.display().to_string())
            .unwrap_or(model_name)
    } else {
        model_name
    };
    let opts = CollectOptions {
        saves,
        positions,
        max_tokens: args.max_tokens,
        batch_size: args.batch_size,
        shard_documents: args.shard_docs,
        shard,
        progress: progress(),
        model_id,
        revision: args.revision,
        saes,
        clamps,
        top_k: args.top_k,
    };
    let s = collect::collect(&m, &corpus, &args.out, &opts).map_err(err)?;
    println!("{s}");
    Ok(())
}
