//! Fuzz harnesses for nnscope: each takes arbitrary bytes and drives one input surface. Any
//! panic is a bug (bad input must come back as an `nnscope::Error`). Used by the cargo-fuzz targets
//! in `fuzz_targets/` and, on the kept crash inputs in `fuzz/regressions/`, by the regression test
//! `crates/nnscope/tests/fuzz_regressions.rs` (which includes this file as a module).

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `tests/fixtures` of the repository, from either the fuzz crate or the nnscope crate.
pub fn fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for up in ["..", "../.."] {
        let p = here.join(up).join("tests/fixtures");
        if p.join("llama/config.json").is_file() {
            return p;
        }
    }
    panic!("tests/fixtures not found from {}", here.display());
}

fn fixture_model(arch: &str) -> &'static Model {
    static LLAMA: OnceLock<Model> = OnceLock::new();
    static GPT2: OnceLock<Model> = OnceLock::new();
    let cell = if arch == "gpt2" { &GPT2 } else { &LLAMA };
    cell.get_or_init(|| {
        let dir = fixtures().join(arch);
        Model::load(dir.to_str().unwrap(), &LoadOptions::default()).expect("fixture loads")
    })
}

fn fixture_weights(arch: &str) -> &'static HashMap<String, Tensor> {
    static LLAMA: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    static GPT2: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    let cell = if arch == "gpt2" { &GPT2 } else { &LLAMA };
    cell.get_or_init(|| {
        candle_core::safetensors::load(
            fixtures().join(arch).join("model.safetensors"),
            &Device::Cpu,
        )
        .expect("fixture weights load")
    })
}

/// A scratch folder for this process, holding the llama fixture's config and tokenizer.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("nnscope-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(fixtures().join("llama").join(f), d.join(f)).unwrap();
        }
        // Two shards of the llama weights, for the index target.
        let w = fixture_weights("llama");
        let mut names: Vec<&String> = w.keys().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        for (part, file) in [
            (a, "model-00001-of-00002.safetensors"),
            (b, "model-00002-of-00002.safetensors"),
        ] {
            let m: HashMap<String, Tensor> = part
                .iter()
                .map(|k| (k.to_string(), w[*k].clone()))
                .collect();
            candle_core::safetensors::save(&m, d.join(file)).unwrap();
        }
        d
    })
}

fn two_tokens() -> Input {
    Input::ids(Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap())
}

/// config.json text: `Config::parse`, its typed accessors, then each architecture's config reader
/// and model construction on the fixture's weights (a fake checkpoint in memory), and a forward.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = nnscope::config::Config::parse(PathBuf::from("config.json"), text) else {
        return;
    };
    let _ = cfg.layer_types(3, true);
    let _ = cfg.sub("rope_scaling");
    let _ = cfg.opt_usize_list("eos_token_id");
    let Ok(model_type) = cfg.model_type() else {
        return;
    };
    let arch = if model_type == "gpt2" {
        "gpt2"
    } else {
        "llama"
    };
    let vb = candle_nn::VarBuilder::from_tensors(
        fixture_weights(arch).clone(),
        DType::F32,
        &Device::Cpu,
    );
    let Ok(model) = Model::from_parts(cfg, vb, PathBuf::from("fuzz"), &LoadOptions::default())
    else {
        return;
    };
    let _ = model.forward(&two_tokens());
}

/// A model.safetensors file's bytes: header checks, then a full load beside the llama config.
/// Input starting with `{` is taken as the JSON header alone and put in front of the llama
/// fixture's data section, so that mutations hit dtypes, shapes and offsets over real data.
pub fn safetensors(data: &[u8]) {
    let dir = scratch().join("single");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).exists() {
            std::fs::copy(scratch().join(f), dir.join(f)).unwrap();
        }
    }
    let file = dir.join("model.safetensors");
    if data.first() == Some(&b'{') {
        let real = llama_safetensors();
        let n = u64::from_le_bytes(real[..8].try_into().unwrap()) as usize;
        let mut bytes = (data.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&real[8 + n..]);
        std::fs::write(&file, bytes).unwrap();
    } else {
        std::fs::write(&file, data).unwrap();
    }
    let _ = nnscope::hub::check_safetensors(std::slice::from_ref(&file));
    if let Ok(model) = Model::load(dir.to_str().unwrap(), &LoadOptions::default()) {
        let _ = model.forward(&two_tokens());
    }
}

fn llama_safetensors() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(fixtures().join("llama/model.safetensors")).unwrap())
}

/// The JSON header of the llama fixture's weights (a seed for the header mode of `safetensors`).
pub fn llama_header() -> &'static [u8] {
    let real = llama_safetensors();
    let n = u64::from_le_bytes(real[..8].try_into().unwrap()) as usize;
    &real[8..8 + n]
}

/// A model.safetensors.index.json's text: `weight_files`, then a full load of the sharded
/// checkpoint (two real shards are present).
pub fn index(data: &[u8]) {
    let dir = scratch();
    let file = dir.join("model.safetensors.index.json");
    std::fs::write(&file, data).unwrap();
    if let Ok(files) = nnscope::hub::weight_files(dir) {
        for f in &files {
            assert!(
                f.starts_with(dir),
                "weight file {} outside the checkpoint folder",
                f.display()
            );
            assert!(
                f.extension().is_some_and(|e| e == "safetensors"),
                "non-safetensors weight file {}",
                f.display()
            );
        }
        let _ = nnscope::hub::check_safetensors(&files);
        let _ = Model::load(dir.to_str().unwrap(), &LoadOptions::default());
    }
}

/// A hookpoint path: resolution (and listing lookup) on the tiny llama, then a trace saving it.
pub fn hookpoint(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let model = fixture_model("llama");
    let _ = nnscope::trace::path::resolve_function(model, path);
    if model.resolve(path).is_ok() {
        if let Ok(trace) = model.trace(two_tokens()).save(path) {
            let _ = trace.run();
        }
    }
}

/// Prompt text (lines are a batch): tokenization and left padding for both tokenizers.
pub fn prompt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let prompts: Vec<&str> = text.split('\n').collect();
    for arch in ["llama", "gpt2"] {
        let model = fixture_model(arch);
        if let Ok((ids, mask)) = model.tokenize(&prompts) {
            assert_eq!(
                ids.dims(),
                mask.as_ref().map(|m| m.dims()).unwrap_or(ids.dims())
            );
        }
    }
}

/// Keys the architectures' config readers look at (and a few they do not).
const KEYS: &[&str] = &[
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "n_inner",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "activation_function",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "max_position_embeddings",
    "n_positions",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "partial_rotary_factor",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "qk_norm",
];

fn value(i: u8) -> serde_json::Value {
    use serde_json::json;
    let rope = |t: &str| {
        json!({"rope_type": t, "rope_theta": 10000.0, "factor": 2.0,
        "original_max_position_embeddings": 64, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "beta_fast": 32.0, "beta_slow": 1.0, "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8]})
    };
    match i % 40 {
        0 => json!(0),
        1 => json!(1),
        2 => json!(2),
        3 => json!(3),
        4 => json!(4),
        5 => json!(8),
        6 => json!(16),
        7 => json!(32),
        8 => json!(64),
        9 => json!(128),
        10 => json!(512),
        11 => json!(1u64 << 40),
        12 => json!(u64::MAX),
        13 => json!(-1),
        14 => json!(0.5),
        15 => json!(1e300),
        16 => json!(-1e300),
        17 => json!(0.0),
        18 => serde_json::Value::Null,
        19 => json!(true),
        20 => json!(false),
        21 => json!("llama"),
        22 => json!("gpt2"),
        23 => json!("silu"),
        24 => json!("gelu_new"),
        25 => json!("no_such_activation"),
        26 => json!([]),
        27 => json!({}),
        28 => json!(["sliding_attention", "full_attention"]),
        29 => json!(["full_attention"]),
        30 => rope("default"),
        31 => rope("linear"),
        32 => rope("dynamic"),
        33 => rope("yarn"),
        34 => rope("longrope"),
        35 => rope("llama3"),
        36 => rope("no_such_rope"),
        37 => json!({"rope_type": "linear"}),
        38 => json!("qwen3"),
        _ => json!("mistral"),
    }
}

/// Structured config fuzzing: byte 0 picks the fixture (llama or gpt2), then each pair of bytes
/// sets one known key to one of a table of awkward values (zero, huge, negative, wrong type, every
/// RoPE type, ...). The model is built on the fixture's weights and run on two tokens.
pub fn config_edits(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let arch = if first % 2 == 0 { "llama" } else { "gpt2" };
    let text = std::fs::read_to_string(fixtures().join(arch).join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object_mut().unwrap();
    for pair in rest.chunks_exact(2) {
        let key = KEYS[pair[0] as usize % KEYS.len()];
        obj.insert(key.to_string(), value(pair[1]));
    }
    config(v.to_string().as_bytes());
}
