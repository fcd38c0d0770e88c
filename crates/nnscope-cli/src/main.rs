//! `nnscope`: run traces, print sources, check and discover attention-probability hookpoints.

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod generate_cmd;

#[derive(Parser)]
#[command(
    name = "nnscope",
    version,
    about = "Read and overwrite what happens inside transformer language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a traced forward and save hookpoint values to a safetensors file.
    Run {
        /// Model folder or hub id (from the local cache).
        model: String,
        /// A prompt (repeat for a left-padded batch).
        #[arg(long = "prompt", conflicts_with = "inputs")]
        prompts: Vec<String>,
        /// A safetensors file with `input_ids` (I64 [B, T]) and optionally `attention_mask`.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// A standard name or hookpoint path to save; `*` in place of a layer index means every layer.
        #[arg(long = "save")]
        saves: Vec<String>,
        /// Output safetensors file (tensors written as float32 under the names as given).
        #[arg(long)]
        out: PathBuf,
        /// Compute dtype: float32, bfloat16 or float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
    },
    /// Generate tokens with the key/value cache, saving hookpoint values at every step.
    Generate(generate_cmd::GenerateArgs),
    /// Run the seed's testing checklist on the model's registered attention-probability hookpoint.
    Check {
        /// Model folder or hub id.
        model: String,
        /// Print one JSON object instead of a checklist.
        #[arg(long)]
        json: bool,
    },
    /// Find the attention-probability hookpoint automatically (without the registry).
    FindAttnProbs {
        /// Model folder or hub id.
        model: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the source listing of a module's forward or of a nested call, with its hookpoints.
    Source {
        /// Model folder or hub id.
        model: String,
        /// Module or call path (`attentions.0`, `attentions.0.source.attention_interface_0`).
        path: String,
    },
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

fn load(model: &str, dtype: DType) -> Result<Model, String> {
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    Model::load(model, &opts).map_err(|e| e.to_string())
}

/// `layers_output.*` -> `layers_output.0`, `layers_output.1`, ...
fn expand_stars(name: &str, num_layers: usize) -> Vec<String> {
    if name.split('.').any(|p| p == "*") {
        (0..num_layers)
            .map(|i| {
                name.split('.')
                    .map(|p| {
                        if p == "*" {
                            i.to_string()
                        } else {
                            p.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect()
    } else {
        vec![name.to_string()]
    }
}

fn read_inputs(path: &Path) -> Result<Input, String> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", path.display()))?;
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
        .map_err(|e| format!("{}: {e}", out.display()));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", out.display())
    })
}

fn run(
    model: &str,
    prompts: Vec<String>,
    inputs: Option<PathBuf>,
    saves: Vec<String>,
    out: PathBuf,
    dtype: &str,
) -> Result<(), String> {
    let dtype = parse_dtype(dtype)?;
    // Check where the result goes before loading and running, which can take minutes.
    check_out(&out)?;
    let input = match (inputs, prompts.is_empty()) {
        (Some(p), _) => read_inputs(&p)?,
        (None, false) => Input::Prompts(prompts),
        (None, true) => return Err("give --prompt TEXT or --inputs IDS.safetensors".into()),
    };
    let m = load(model, dtype)?;
    let names: Vec<String> = saves
        .iter()
        .flat_map(|s| expand_stars(s, m.num_layers()))
        .collect();
    let mut trace = m.trace(input);
    let mut derived = Vec::new();
    for n in &names {
        if n == "next_token_probs" {
            derived.push(n.clone());
            continue;
        }
        trace = trace.save(n).map_err(|e| e.to_string())?;
    }
    let res = trace.run().map_err(|e| e.to_string())?;
    let mut tensors = HashMap::new();
    for n in &names {
        let t = if derived.contains(n) {
            res.next_token_probs().map_err(|e| e.to_string())?
        } else {
            res.get(n).map_err(|e| e.to_string())?.clone()
        };
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.contiguous())
            .map_err(|e| e.to_string())?;
        tensors.insert(n.clone(), t);
    }
    write_atomic(&tensors, &out)
}

fn source(model: &str, path: &str) -> Result<(), String> {
    let m = load(model, DType::F32)?;
    let info = nnscope::trace::path::resolve_function(&m, path).map_err(|e| e.to_string())?;
    println!("{}  ({}:{})", info.name, info.file, info.first_line);
    print!("{}", nnscope::trace::listing(info, None));
    Ok(())
}

fn check(model: &str, json: bool) -> Result<bool, String> {
    let m = match load(model, DType::F32) {
        Ok(m) => m,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"model": model, "checks": {"loads": false}, "passed": false, "error": e})
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

fn find_attn_probs(model: &str, json: bool) -> Result<(), String> {
    let m = load(model, DType::F32)?;
    let d = nnscope::discover::find_attention_probabilities(&m).map_err(|e| e.to_string())?;
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
        "registry row (crates/nnscope/src/models/mod.rs):\n{}",
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
            out,
            dtype,
        } => run(&model, prompts, inputs, saves, out, &dtype),
        Cmd::Generate(args) => generate_cmd::generate(args),
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
            eprintln!("error: {}", e.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
