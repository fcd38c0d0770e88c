//! LLaMA-like and GPT-2 configurations beyond the two base fixtures, against transformers' goldens
//! (tests/fixtures/<variant>/, made by tests/fixtures/generate/config_variants.py), and the ways a
//! checkpoint can be stored: a hub id in the local cache, shards, bfloat16 weights.
mod common;

use common::*;

use candle_core::{Device, Tensor};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;

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
