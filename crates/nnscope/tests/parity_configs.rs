//! LLaMA-like and GPT-2 configurations beyond the two base fixtures, against transformers' goldens
//! (tests/fixtures/<variant>/, made by tests/fixtures/generate/config_variants.py), and the ways a
//! checkpoint can be stored: a hub id in the local cache, shards, bfloat16 weights.
mod common;

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

// Mistral, every layer sliding (window 8 < 39 tokens), explicit head_dim 24 != 64 / 4.
#[test]
fn mistral_sliding_window_and_head_dim() {
    common::parity("mistral_sw");
}

// Qwen2, q/k/v bias, use_sliding_window with max_window_layers=1 and no `layer_types` in config.json.
#[test]
fn qwen2_sliding_from_max_window_layers() {
    common::parity("qwen2_sw");
}

// Qwen3, q/k norm, attention_bias, `layer_types` mixing sliding and full attention.
#[test]
fn qwen3_layer_types_and_bias() {
    common::parity("qwen3_mixed");
}

// Linear RoPE scaling, tied embeddings, gelu_pytorch_tanh.
#[test]
fn llama_rope_linear_tied_gelu_tanh() {
    common::parity("llama_linear");
}

// Dynamic NTK RoPE past max_position_embeddings (20 < 39 tokens), MLP and attention biases.
#[test]
fn llama_rope_dynamic_biases() {
    common::parity("llama_dynamic");
}

// Llama 3 RoPE, GQA with a single key/value head.
#[test]
fn llama_rope_llama3_one_kv_head() {
    common::parity("llama_llama3");
}

// YaRN RoPE (attention factor from `factor`), theta 500000, exact gelu.
#[test]
fn llama_rope_yarn_gelu() {
    common::parity("llama_yarn");
}

// transformers-4 config layout: top-level rope_theta / rope_scaling with the legacy `type` key.
#[test]
fn llama_transformers4_config_layout() {
    common::parity("llama_v4layout");
}

// LongRoPE: long factors for the 39-token prompt (> original_max_position_embeddings 20), short ones
// for the 16-token batch; factor and attention factor derived.
#[test]
fn llama_rope_longrope() {
    common::parity("llama_longrope");
}

// YaRN with mscale / mscale_all_dim, beta_fast / beta_slow, truncate = false.
#[test]
fn llama_rope_yarn_mscale_untruncated() {
    common::parity("llama_yarn_mscale");
}

// Default RoPE with partial_rotary_factor 0.5: Llama rotates the whole head anyway.
#[test]
fn llama_default_rope_ignores_partial_factor() {
    common::parity("llama_partial");
}

// Qwen3 with head_dim, layer_types, max_window_layers, use_sliding_window absent from config.json
// (head_dim 128; sliding_window set but unused), tied embeddings.
#[test]
fn qwen3_config_defaults() {
    common::parity("qwen3_defaults");
}

// GPT-2 with scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, n_inner, exact gelu. The
// uniform edit goes through `attention_probabilities.L`, which for this config is
// `_upcast_and_reordered_attn`'s dropout (the golden wrote the same hookpoint in nnsight).
#[test]
fn gpt2_reorder_upcast_inverse_layer_idx() {
    common::parity("gpt2_reorder");
}

// The reordered attention is a hookpoint under its transformers name, and `attention_probabilities.L`
// is that hookpoint's value.
#[test]
fn gpt2_reorder_probabilities_path() {
    let model = common::load("gpt2_reorder");
    let p =
        "attentions.1.source.self__upcast_and_reordered_attn_0.source.self_attn_dropout_0.output";
    let out = model
        .trace(Input::prompts(&["Free software"]))
        .save(p)
        .unwrap()
        .save("attention_probabilities.1")
        .unwrap()
        .run()
        .unwrap();
    let a = out.get(p).unwrap();
    let b = out.get("attention_probabilities.1").unwrap();
    assert_eq!(max_diff(a, b), 0.0);
}

// GPT-2 without 1/sqrt(d) scaling, relu, untied lm_head.
#[test]
fn gpt2_unscaled_relu_untied() {
    common::parity("gpt2_noscale");
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().abs().unwrap();
    a.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nnscope-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_files(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

/// Logits for the golden `single` input.
fn logits(model: &Model, g: &common::Golden) -> Tensor {
    let ids = g.t["single.input_ids"].clone();
    model.trace(Input::ids(ids)).run().unwrap().logits.unwrap()
}

/// The `nnscope` binary next to this test's build (target/<profile>/nnscope), built first when
/// missing: the test lives in the library crate, so cargo does not build the CLI for it.
fn cli() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/parity_configs-<hash>
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let bin = profile_dir.join(format!("nnscope{}", std::env::consts::EXE_SUFFIX));
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "nnscope-cli", "--bin", "nnscope"]);
        if release {
            cmd.arg("--release");
        }
        let target_dir = profile_dir.parent().unwrap();
        cmd.env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let st = cmd
            .status()
            .expect("running cargo to build the nnscope CLI");
        assert!(st.success(), "building the nnscope CLI failed");
    });
    assert!(bin.is_file(), "no CLI binary at {}", bin.display());
    bin
}

/// Writes the golden `single` ids as an `--inputs` file.
fn write_inputs(g: &common::Golden, path: &Path) {
    let ids = g.t["single.input_ids"].clone();
    let mut m = HashMap::new();
    m.insert("input_ids".to_string(), ids);
    candle_core::safetensors::save(&m, path).unwrap();
}

const LLAMA_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

// MODEL as a hub id, found offline in a local cache laid out like huggingface_hub's
// (models--org--name/snapshots/<rev>, refs/main). HF_HUB_CACHE is set for the child process only:
// other tests of this process run concurrently.
#[test]
fn hub_id_from_local_cache() {
    let g = common::golden("llama");
    let tmp = TempDir::new("hub");
    let cache = tmp.0.join("hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--tiny-org--tiny-llama");
    copy_files(
        &common::fixture("llama"),
        &repo.join("snapshots").join(rev),
        LLAMA_FILES,
    );
    // A stale snapshot that refs/main does not point at: it must not be picked.
    std::fs::create_dir_all(repo.join("snapshots/ffffffffffffffffffffffffffffffffffffffff"))
        .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let inputs = tmp.0.join("ids.safetensors");
    write_inputs(&g, &inputs);
    let out = tmp.0.join("out.safetensors");
    let run = |model: &str| {
        Command::new(cli())
            .args(["run", model, "--inputs"])
            .arg(&inputs)
            .args(["--save", "logits", "--out"])
            .arg(&out)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HOME")
            .env("HOME", &tmp.0)
            .output()
            .unwrap()
    };
    let o = run("tiny-org/tiny-llama");
    assert!(
        o.status.success(),
        "nnscope run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let saved = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mask = g.t["single.attention_mask"].clone();
    common::assert_hidden("hub.logits", &saved["logits"], &g.t["single.logits"], &mask);
    // An id that is not in the cache is a one-line error, not a download.
    let o = run("tiny-org/absent");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tiny-org/absent"), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");
}

// model.safetensors split into two shards with model.safetensors.index.json gives the same logits.
#[test]
fn sharded_checkpoint() {
    let src = common::fixture("llama");
    let tmp = TempDir::new("shards");
    copy_files(
        &src,
        &tmp.0,
        &["config.json", "tokenizer.json", "tokenizer_config.json"],
    );
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        for (n, v) in &views {
            total += v.data().len();
            weight_map.insert(n.clone(), serde_json::Value::from(file.clone()));
        }
        safetensors::serialize_to_file(views, None, &tmp.0.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        tmp.0.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert!(!tmp.0.join("model.safetensors").exists());

    let g = common::golden("llama");
    let sharded = Model::load(tmp.0.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let whole = common::load("llama");
    let (a, b) = (logits(&sharded, &g), logits(&whole, &g));
    assert_eq!(
        max_diff(&a, &b),
        0.0,
        "sharded and single-file logits differ"
    );
    common::check_input(&sharded, &g, "single");
}

/// A copy of the llama fixture with its weights converted to bfloat16 here (candle rounds to nearest
/// even, as torch does).
fn bf16_copy(tmp: &TempDir) -> PathBuf {
    let src = common::fixture("llama");
    let dir = tmp.0.join("llama-bf16");
    copy_files(
        &src,
        &dir,
        &["config.json", "tokenizer.json", "tokenizer_config.json"],
    );
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    dir
}

// The llama fixture stored in bfloat16 (tests/fixtures/llama_bf16), loaded with float32 compute (the
// default), against transformers' float32 compute on the same bfloat16 weights: full float32 parity.
#[test]
fn llama_bf16_weights_f32_compute() {
    common::parity("llama_bf16");
}

// The llama fixture stored in float16, float32 compute, against transformers on the same weights.
#[test]
fn llama_f16_weights_f32_compute() {
    common::parity("llama_f16");
}

// Weights converted to bfloat16 in a temp dir and loaded with float32 compute. They round exactly as
// torch's conversion did for tests/fixtures/llama_bf16, so the float32 tolerances of that golden apply
// (1e-4 * max |ref| for logits): the weights are the same numbers, only the file differs. Against the
// float32 golden of the unrounded weights the logits move by about 0.15 (of |logit| <= 7), which is
// bfloat16's 8-bit mantissa (2^-9 relative per weight) amplified by the sharp attention of these
// random weights; transformers moves by the same amount on the same rounded weights.
#[test]
fn bfloat16_weights() {
    let tmp = TempDir::new("bf16");
    let dir = bf16_copy(&tmp);
    let ours_w =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let torch_w = candle_core::safetensors::load(
        common::fixture("llama_bf16").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours_w.len(), torch_w.len());
    for (k, v) in &ours_w {
        assert_eq!(v.dtype(), DType::BF16);
        assert_eq!(
            max_diff(v, &torch_w[k]),
            0.0,
            "{k}: bf16 rounding differs from torch's"
        );
    }
    let g = common::golden("llama_bf16");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(model.dtype, DType::F32);
    let ours = logits(&model, &g);
    assert_eq!(ours.dtype(), DType::F32);
    let mask = g.t["single.attention_mask"].clone();
    common::assert_hidden(
        "bf16 weights, f32 compute: logits",
        &ours,
        &g.t["single.logits"],
        &mask,
    );

    // bfloat16 compute through the CLI: runs, writes float32, finite and near the golden. Activations
    // round to 8 bits at every op through 2 layers (measured: max |diff| ~0.5 for |logit| <= 7), so
    // this is a sanity bound (15% of the logit scale), not parity.
    let reference = &g.t["single.logits"];
    let inputs = tmp.0.join("ids.safetensors");
    write_inputs(&g, &inputs);
    let out = tmp.0.join("out.safetensors");
    let o = Command::new(cli())
        .args([
            "run",
            dir.to_str().unwrap(),
            "--dtype",
            "bfloat16",
            "--inputs",
        ])
        .arg(&inputs)
        .args(["--save", "logits", "--save", "layers_output.*", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nnscope run --dtype bfloat16 failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let saved = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let l = &saved["logits"];
    assert_eq!(l.dtype(), DType::F32);
    assert_eq!(l.dims(), reference.dims());
    assert!(saved.contains_key("layers_output.1"));
    let d = max_diff(l, reference);
    eprintln!("bf16 compute: max |logit - golden| = {d}");
    let tol = 0.15 * max_abs(reference).max(1.0);
    assert!(
        d.is_finite() && d <= tol,
        "bf16 compute: max logit diff {d} > {tol}"
    );
}

// GPT-2 weights saved from `GPT2Model` (no `transformer.` prefix, as in openai-community/gpt2) load into
// the same module tree and reproduce the golden.
#[test]
fn gpt2_unprefixed_checkpoint() {
    let src = common::fixture("gpt2");
    let tmp = TempDir::new("gpt2-noprefix");
    copy_files(
        &src,
        &tmp.0,
        &["config.json", "tokenizer.json", "tokenizer_config.json"],
    );
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("transformer.").map(|k| (k.to_string(), v)))
        .collect();
    assert!(w.contains_key("wte.weight"));
    candle_core::safetensors::save(&w, tmp.0.join("model.safetensors")).unwrap();
    let model = Model::load(tmp.0.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(model.modules().find("transformer.h.0.attn").is_some());
    let g = common::golden("gpt2");
    common::check_input(&model, &g, "single");
}
