//! `nnscope`: save and edit what happens inside transformer language models from the command line:
//! run traces, print a module's source with its hookpoints, find and check the
//! attention-probability hookpoint.

use candle_core::{DType, Device, Tensor};
use clap::{CommandFactory, Parser, Subcommand};
use nnscope::hub::{self, HubOptions};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod collect_cmd;
mod experiments_cmd;
mod generate_cmd;
mod lens_cmd;
mod patch_cmd;
mod sae_args;
mod view_cmd;

#[derive(Parser)]
#[command(
    name = "nnscope",
    version,
    about = "Read and overwrite what happens inside transformer language models",
    long_about = "Read and overwrite what happens inside transformer language models.\n\n\
        MODEL is a folder with config.json, safetensors weights and tokenizer.json, or a Hugging Face \
        Hub id (`owner/name`), taken from the local Hugging Face cache or downloaded into it \
        (HF_TOKEN for gated models, HF_ENDPOINT, HF_HUB_OFFLINE=1 to never download)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which model to load.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model folder or Hugging Face Hub id (`owner/name`).
    model: String,
    /// Branch, tag or commit of a hub id (default: main).
    #[arg(long)]
    revision: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the model on prompts or token ids and save hookpoint values to a safetensors file.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// A prompt (repeat for a left-padded batch).
        #[arg(long = "prompt", conflicts_with = "inputs")]
        prompts: Vec<String>,
        /// A safetensors file with `input_ids` (I64 [B, T]) and optionally `attention_mask`.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// A standard name (`layers_output.3`, `attention_probabilities.-1`, `heads.0`, `logits`)
        /// or hookpoint path to save; `*` in place of a layer index means every layer, negative
        /// indices count from the last layer. Hookpoint patterns: `*` is one path segment, `**`
        /// any number (`model.layers.*.self_attn.**`).
        #[arg(long = "save")]
        saves: Vec<String>,
        /// Save every module's output (as TransformerLens's run_with_cache); the memory estimate
        /// is checked before the run.
        #[arg(long)]
        save_all: bool,
        /// Keep only these rows of the batch in every --save (comma-separated, e.g. 0,2).
        #[arg(long, value_delimiter = ',')]
        rows: Option<Vec<usize>>,
        /// Output safetensors file (tensors written as float32 under the names as given).
        #[arg(long)]
        out: PathBuf,
        /// Compute dtype: float32, bfloat16 or float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        #[command(flatten)]
        sae: sae_args::SaeArgs,
    },
    /// Generate tokens with the key/value cache, saving hookpoint values at every step.
    Generate(generate_cmd::GenerateArgs),
    /// Logit lens: every layer's output through the model's own head; top tokens per layer.
    Lens(lens_cmd::LensArgs),
    /// Activation and attribution patching (clean -> corrupt) of the residual stream and heads.
    Patch(patch_cmd::PatchArgs),
    /// Patchscope: a source prompt's hidden state read by a target prompt, per layer.
    Patchscope(experiments_cmd::PatchscopeArgs),
    /// Direct logit attribution of a logit difference to embeddings, attentions (heads), MLPs.
    Dla(experiments_cmd::DlaArgs),
    /// Target-token probabilities over prompts, from the logits or every layer (nnterp's run_prompts).
    Prompts(experiments_cmd::PromptsArgs),
    /// Gradients of a logit (difference) with respect to hookpoints, through candle's autograd.
    Grad(experiments_cmd::GradArgs),
    /// Save activations over a corpus (plain text or JSON Lines) into resumable safetensors
    /// shards; `--shard I/N` and `--merge` split a corpus over machines.
    Collect(collect_cmd::CollectArgs),
    /// Pictures of a prompt's attention: a self-contained HTML page, a PNG of one layer's heads.
    View(view_cmd::ViewArgs),
    /// Check the model's attention-probability hookpoint: it resolves, has the expected shape,
    /// its rows sum to 1, and changing it changes the output.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Print one JSON object instead of a checklist.
        #[arg(long)]
        json: bool,
    },
    /// Find the attention-probability hookpoint of an architecture automatically, by tracing it.
    FindAttnProbs {
        #[command(flatten)]
        model: ModelArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the source listing of a module's forward or of a nested call, with its hookpoints.
    Source {
        #[command(flatten)]
        model: ModelArgs,
        /// Module or call path (`attentions.0`, `attentions.0.source.attention_interface_0`).
        path: String,
    },
    /// Print a shell completion script (e.g. `nnscope completions bash > ~/.local/share/bash-completion/completions/nnscope`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// An error message as one line: candle attaches a backtrace when `RUST_BACKTRACE` is set; it and
/// anything after it are dropped, and the remaining lines joined.
fn one_line(msg: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for l in msg.lines() {
        let t = l.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if frame || t.starts_with("stack backtrace:") {
            break;
        }
        if !t.is_empty() {
            out.push(l.trim());
        }
    }
    out.join(" ")
}

fn err(e: impl std::fmt::Display) -> String {
    one_line(&e.to_string())
}

fn candle_err(e: candle_core::Error) -> String {
    err(nnscope::Error::from(e))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "float32" | "f32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(format!(
            "unknown --dtype `{other}`; use float32, bfloat16 or float16"
        )),
    }
}

fn progress() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The model's folder: as given, from the local cache, or downloaded.
fn locate(m: &ModelArgs) -> Result<PathBuf, String> {
    let mut o = HubOptions::from_env();
    o.revision = m.revision.clone();
    o.progress = progress();
    hub::resolve_with(&m.model, &o).map_err(err)
}

/// Says on stderr which weights hold NaN or infinity (they are loaded all the same).
fn warn_non_finite_weights(dir: &Path) {
    let Ok(files) = hub::weight_files(dir) else {
        return; // the load that follows reports it
    };
    if let Ok(bad) = hub::non_finite_tensors(&files) {
        for (name, file) in bad.iter().take(10) {
            eprintln!(
                "warning: weight `{name}` ({}) holds NaN or infinity",
                file.display()
            );
        }
        if bad.len() > 10 {
            eprintln!(
                "warning: ... and {} more weights hold NaN or infinity",
                bad.len() - 10
            );
        }
    }
}

fn load_dir(model: &ModelArgs, dir: &Path, dtype: DType) -> Result<Model, String> {
    warn_non_finite_weights(dir);
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        progress: progress(),
        ..Default::default()
    };
    // The folder was resolved above; a non-UTF-8 path falls back to what the user gave.
    match dir.to_str() {
        Some(d) => Model::load(d, &opts),
        None => Model::load(
            &model.model,
            &LoadOptions {
                revision: model.revision.clone(),
                ..opts
            },
        ),
    }
    .map_err(err)
}

fn load(model: &ModelArgs, dtype: DType) -> Result<Model, String> {
    let dir = locate(model)?;
    load_dir(model, &dir, dtype)
}

fn read_inputs(path: &Path) -> Result<Input, String> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("{}: {}", path.display(), candle_err(e)))?;
    let ids = tensors
        .get("input_ids")
        .ok_or_else(|| format!("{}: no tensor `input_ids`", path.display()))?
        .clone();
    let mask = tensors.get("attention_mask").cloned();
    let position_ids = tensors.get("position_ids").cloned();
    Ok(Input::Ids {
        input_ids: ids,
        attention_mask: mask,
        position_ids,
    })
}

/// `--out` must name a file (new or to replace) in an existing folder.
fn check_out(out: &Path) -> Result<(), String> {
    if out.is_dir() {
        return Err(format!(
            "--out {}: is a directory; give a file name such as {}",
            out.display(),
            out.join("out.safetensors").display()
        ));
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "--out {}: the output folder {} does not exist",
            out.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The process's umask (Linux: /proc/self/status), else the common 022.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A new file's usual permissions, 0666 less the umask (the safetensors writer creates 0600).
fn usual_permissions(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes to a temporary file beside `out` and renames it, so a failure leaves nothing partial.
fn write_atomic(tensors: &HashMap<String, Tensor>, out: &Path) -> Result<(), String> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "{}: the output folder {} does not exist",
            out.display(),
            dir.display()
        ));
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into()),
        std::process::id()
    ));
    let r = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| format!("{}: {}", out.display(), candle_err(e)))
        .and_then(|()| usual_permissions(&tmp).map_err(|e| format!("{}: {e}", out.display())));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", out.display())
    })
}

/// Says on stderr when a saved value holds NaN or infinity.
fn warn_non_finite_value(name: &str, t: &Tensor) -> Result<(), String> {
    // Any NaN or infinity makes the sum non-finite; only then are they counted.
    let sum = t
        .sum_all()
        .and_then(|s| s.to_scalar::<f32>())
        .map_err(candle_err)?;
    if sum.is_finite() {
        return Ok(());
    }
    let v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err)?;
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    let what = match (nan, inf) {
        (0, 0) => return Ok(()),
        (n, 0) => format!("{n} NaN"),
        (0, i) => format!("{i} infinite"),
        (n, i) => format!("{n} NaN and {i} infinite"),
    };
    eprintln!(
        "warning: saved value `{name}` holds {what} values (of {})",
        v.len()
    );
    Ok(())
}

/// Options of `run` beyond its inputs and outputs.
struct RunOpts {
    save_all: bool,
    rows: Option<Vec<usize>>,
    sae: sae_args::SaeArgs,
}

fn run(
    model: &ModelArgs,
    prompts: Vec<String>,
    inputs: Option<PathBuf>,
    saves: Vec<String>,
    out: PathBuf,
    dtype: &str,
    opts: RunOpts,
) -> Result<(), String> {
    let dtype = parse_dtype(dtype)?;
    // Check where the result goes before loading and running, which can take minutes.
    check_out(&out)?;
    let input = match (inputs, prompts.is_empty()) {
        (Some(p), _) => read_inputs(&p)?,
        (None, false) => Input::Prompts(prompts),
        (None, true) => return Err("give --prompt TEXT or --inputs IDS.safetensors".into()),
    };
    if saves.is_empty() && !opts.save_all {
        return Err(
            "give at least one --save NAME (a standard name such as `logits`, or a hookpoint path), or --save-all"
                .into(),
        );
    }
    let dir = locate(model)?;
    // Never write over a file the model is loaded from.
    hub::check_output_path(&out, &dir).map_err(err)?;
    let m = load_dir(model, &dir, dtype)?;
    let mut trace = sae_args::apply_sae_args!(m.trace(input), opts.sae);
    let mut derived = false;
    if opts.save_all {
        trace = trace.save_all().map_err(err)?;
    }
    for n in &saves {
        if n == "next_token_probs" {
            derived = true;
            continue;
        }
        // Standard names with `*` as the layer, and hookpoint patterns (`*`, `**`), expand in
        // the library.
        trace = trace.save(n).map_err(err)?;
        if let Some(rows) = &opts.rows {
            trace = trace.rows(rows).map_err(err)?;
        }
    }
    let res = trace.run().map_err(err)?;
    let mut tensors = HashMap::new();
    let mut order = Vec::new();
    let mut put = |n: String, t: &Tensor| -> Result<(), String> {
        if tensors.contains_key(&n) {
            return Ok(());
        }
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.contiguous())
            .map_err(candle_err)?;
        warn_non_finite_value(&n, &t)?;
        order.push(n.clone());
        tensors.insert(n, t);
        Ok(())
    };
    for (n, values) in &res.saved {
        // A hookpoint that fired more than once (in a loop) also writes NAME#1, NAME#2, ...
        for (i, t) in values.iter().enumerate() {
            put(
                if i == 0 {
                    n.clone()
                } else {
                    format!("{n}#{i}")
                },
                t,
            )?;
        }
    }
    if derived {
        put(
            "next_token_probs".into(),
            &res.next_token_probs().map_err(err)?,
        )?;
    }
    write_atomic(&tensors, &out)?;
    for n in &order {
        println!("{n} {:?} float32", tensors[n].dims());
    }
    Ok(())
}

fn source(model: &ModelArgs, path: &str) -> Result<(), String> {
    let m = load(model, DType::F32)?;
    let info = nnscope::trace::path::resolve_function(&m, path).map_err(err)?;
    println!("{}  ({}:{})", info.name, info.file, info.first_line);
    print!("{}", nnscope::trace::listing(info, None));
    Ok(())
}

fn check(model: &ModelArgs, json: bool) -> Result<bool, String> {
    let m = match load(model, DType::F32) {
        Ok(m) => m,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"model": model.model, "checks": {"loads": false}, "passed": false, "error": e})
                );
                return Ok(false);
            }
            return Err(e);
        }
    };
    let r = nnscope::discover::check(&m);
    if json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        println!(
            "{} ({})  hookpoint: attentions.L.{}",
            r.architecture, r.model_type, r.hookpoint
        );
        let c = &r.checks;
        let rows = [
            ("loads", c.loads, "model loads"),
            ("source", c.source, "attentions.0 source is available"),
            ("resolves", c.resolves, "hookpoint resolves"),
            ("shape", c.shape, "probabilities have the expected shape"),
            (
                "sums",
                c.sums,
                "rows sum to 1 (or the documented exception)",
            ),
            (
                "changes_output",
                c.changes_output,
                "changing probabilities changes the output",
            ),
            ("registered", c.registered, "architecture is registered"),
        ];
        for (name, ok, what) in rows {
            let why = r
                .failures
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, w)| format!("  ({w})"))
                .unwrap_or_default();
            println!("  [{}] {what}{why}", if ok { "x" } else { " " });
        }
        println!("{}", if r.passed { "passed" } else { "FAILED" });
    }
    Ok(r.passed)
}

fn find_attn_probs(model: &ModelArgs, json: bool) -> Result<(), String> {
    let m = load(model, DType::F32)?;
    let d = nnscope::discover::find_attention_probabilities(&m).map_err(err)?;
    if json {
        println!("{}", serde_json::to_string(&d).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("{} ({})", d.architecture, d.model_type);
    println!("attention probabilities: attentions.L.{}", d.hookpoint);
    println!(
        "  shape {:?}, row sums {:.6}..{:.6}, editing it changes the output: {}",
        d.shape, d.row_sum_min, d.row_sum_max, d.changes_output
    );
    println!("\ncandidates (best first):");
    for c in &d.candidates {
        println!(
            "  {:<70} {:?} sums {:.4}..{:.4} priority {}",
            c.hookpoint, c.shape, c.row_sum_min, c.row_sum_max, c.priority
        );
    }
    println!("\n{}", d.listing);
    println!(
        "to register it, add this row to ARCHITECTURES in crates/nnscope/src/models/mod.rs:\n{}",
        d.registry_row()
    );
    Ok(())
}

fn main() -> ExitCode {
    // Freed activations stay in the process for the next operation (see nnscope::keep_freed_memory).
    nnscope::keep_freed_memory();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run {
            model,
            prompts,
            inputs,
            saves,
            save_all,
            rows,
            out,
            dtype,
            sae,
        } => run(
            &model,
            prompts,
            inputs,
            saves,
            out,
            &dtype,
            RunOpts {
                save_all,
                rows,
                sae,
            },
        ),
        Cmd::Generate(args) => generate_cmd::generate(args),
        Cmd::Lens(args) => lens_cmd::lens_cmd(args).map(|_| ()),
        Cmd::Patch(args) => patch_cmd::patch_cmd(args).map(|_| ()),
        Cmd::Patchscope(args) => experiments_cmd::patchscope_cmd(args),
        Cmd::Dla(args) => experiments_cmd::dla_cmd(args),
        Cmd::Prompts(args) => experiments_cmd::prompts_cmd(args),
        Cmd::Grad(args) => experiments_cmd::grad_cmd(args),
        Cmd::Collect(args) => collect_cmd::collect(args),
        Cmd::View(args) => view_cmd::view(args),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "nnscope",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Source { model, path } => source(&model, &path),
        Cmd::FindAttnProbs { model, json } => find_attn_probs(&model, json),
        Cmd::Check { model, json } => match check(&model, json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
