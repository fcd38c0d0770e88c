//! Phi, Phi-3, Mixtral, Qwen3-MoE and Falcon against transformers 5.24 goldens: the base fixture of
//! each and variants for the options it leaves at their defaults (tests/fixtures/generate/c11_variants.py).
mod common;

// Parallel attention + MLP, half of each head rotated (PhiConfig's default), biases, gelu_new.
#[test]
fn phi() {
    common::parity("phi");
}

// q/k LayerNorm, GQA, a quarter of each head rotated, tied embeddings with lm_head's own bias.
#[test]
fn phi_qk_layernorm_gqa() {
    common::parity("phi_qk_layernorm_gqa");
}

// transformers-4 config layout (top-level rope_theta / partial_rotary_factor 1.0).
#[test]
fn phi_v4_layout() {
    common::parity("phi_v4_layout");
}

// Fused qkv_proj and gate_up_proj, GQA, whole head rotated.
#[test]
fn phi3() {
    common::parity("phi3");
}

// LongRoPE over half of each head, original_max_position_embeddings 20: the 39-token prompt uses the
// long factors; the 16-token batch crosses 20 while generating, where transformers drops the cache
// and recomputes the sequence with the long factors (gen.batch.* checks nnscope does the same).
#[test]
fn phi3_longrope() {
    common::parity("phi3_longrope");
}

// Sliding window 8 on every layer, tied embeddings, gelu_new, transformers-4 layout.
#[test]
fn phi3_sliding_v4() {
    common::parity("phi3_sliding_v4");
}

// 4 experts, top 2, sliding window 8 (< 39 tokens) on every layer, GQA; hub weight names
// (`block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w3/w2`).
#[test]
fn mixtral() {
    common::parity("mixtral");
}

// Top 1 of 3 experts, no window, explicit head_dim 24, tied embeddings, gelu, transformers-4 config
// layout; transformers 5's fused weight names (`mlp.gate`, `mlp.experts.gate_up_proj` / `down_proj`).
#[test]
fn mixtral_top1_head_dim() {
    common::parity("mixtral_top1_head_dim");
}

/// The router logits of every sparse layer are hookpoints (`model.layers.L.mlp.gate.output.0`,
/// [tokens, experts]) equal to transformers' `output_router_logits` (router_logits.safetensors).
fn router_logits(arch: &str) {
    let model = common::load(arch);
    let g = common::golden(arch);
    let path = common::fixture(arch).join("router_logits.safetensors");
    let reference = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    assert!(!reference.is_empty(), "{arch}: no router logits");
    let ids = g.t["single.input_ids"].clone();
    let mut tr = model.trace(nnscope::Input::ids(ids));
    let name = |k: &str| {
        let l = k.trim_start_matches("router_logits.");
        format!("model.layers.{l}.mlp.gate.output.0")
    };
    for k in reference.keys() {
        tr = tr.save(&name(k)).unwrap();
    }
    let out = tr.run().unwrap();
    for (k, r) in &reference {
        let ours = out.get(&name(k)).unwrap();
        assert_eq!(ours.dims(), r.dims(), "{arch} {k}: shape");
        let tol = 1e-4 * common::max_abs(r).max(1.0);
        let d = common::max_diff(ours, r);
        assert!(d <= tol, "{arch} {k}: max diff {d} > {tol}");
    }
}

#[test]
fn mixtral_router_logits() {
    router_logits("mixtral");
    router_logits("mixtral_top1_head_dim");
}

// q/k norm, 4 experts top 2, norm_topk_prob on; hub per-expert weight names.
#[test]
fn qwen3_moe() {
    common::parity("qwen3_moe");
}

// Three layers, layer 1 in mlp_only_layers (dense between two sparse blocks), norm_topk_prob off,
// attention_bias, top 3 of 4, tied embeddings, transformers-4 config layout.
#[test]
fn qwen3_moe_mlp_only() {
    common::parity("qwen3_moe_mlp_only");
}

// use_sliding_window: window 8 on every layer; decoder_sparse_step 2 (layer 0 dense, layer 1
// sparse); fused expert weights (transformers 5 names).
#[test]
fn qwen3_moe_sliding() {
    common::parity("qwen3_moe_sliding");
}

#[test]
fn qwen3_moe_router_logits() {
    router_logits("qwen3_moe");
    router_logits("qwen3_moe_mlp_only");
    router_logits("qwen3_moe_sliding");
}

// Falcon-7B layout: multi_query (one key/value head after the query heads in query_key_value),
// parallel attention + MLP, rotary, no biases, tied lm_head; probabilities at the softmax.
#[test]
fn falcon() {
    common::parity("falcon");
}

// Falcon-RW layout: ALiBi (built in bfloat16 from the mask), per-head interleaved q/k/v, sequential
// residual with post_attention_layernorm, biases; probabilities at self_attention_dropout_0.
#[test]
fn falcon_alibi() {
    common::parity("falcon_alibi");
}

// Falcon-40B layout: new_decoder_architecture with 2 key/value groups, ln_attn + ln_mlp,
// rope_theta 500 in the transformers-4 config layout.
#[test]
fn falcon_new_arch() {
    common::parity("falcon_new_arch");
}

// new_decoder_architecture with num_ln_in_parallel_attn 1, ffn_hidden_size, biases, untied lm_head.
#[test]
fn falcon_new_arch_1ln() {
    common::parity("falcon_new_arch_1ln");
}

// ALiBi with multi_query and a sequential residual.
#[test]
fn falcon_alibi_mqa_seq() {
    common::parity("falcon_alibi_mqa_seq");
}

/// A prefix of 2 tokens then 37 single-token cached steps equals one forward over the 39 tokens on
/// the sliding-window fixtures (window 8: the decode crosses it many times).
#[test]
fn long_cached_decode_crosses_sliding_windows() {
    use candle_core::{DType, Device, Tensor};
    for name in ["mixtral", "phi3_sliding_v4", "qwen3_moe_sliding"] {
        let model = common::load(name);
        let g = common::golden(name);
        let ids = g.t["single.input_ids"].clone();
        let t = ids.dim(1).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let whole = model
            .forward(&nnscope::Input::Ids {
                input_ids: ids.clone(),
                attention_mask: Some(mask.clone()),
                position_ids: None,
            })
            .unwrap();
        let cache = nnscope::nn::KvCache::new();
        let mut parts = vec![model
            .forward_cached(
                &ids.narrow(1, 0, 2).unwrap(),
                Some(&mask.narrow(1, 0, 2).unwrap()),
                &cache,
            )
            .unwrap()];
        for i in 2..t {
            parts.push(
                model
                    .forward_cached(
                        &ids.narrow(1, i, 1).unwrap(),
                        Some(&mask.narrow(1, 0, i + 1).unwrap()),
                        &cache,
                    )
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        let d = common::max_diff(&whole, &cached) / common::max_abs(&whole).max(1.0);
        assert!(d <= 1e-4, "{name}: cached logits differ by {d} (relative)");
    }
}

/// Configurations transformers refuses (or cannot run) are one-line config errors naming the key.
#[test]
fn bad_configs_name_the_key() {
    let cases: &[(&str, &str, serde_json::Value, &str)] = &[
        (
            "falcon_new_arch",
            "parallel_attn",
            serde_json::json!(false),
            "parallel_attn",
        ),
        (
            "falcon_alibi",
            "num_kv_heads",
            serde_json::json!(2),
            "num_kv_heads",
        ),
        (
            "mixtral",
            "num_experts_per_tok",
            serde_json::json!(9),
            "num_experts_per_tok",
        ),
        (
            "qwen3_moe",
            "decoder_sparse_step",
            serde_json::json!(0),
            "decoder_sparse_step",
        ),
        ("phi", "hidden_act", serde_json::json!("nope"), "hidden_act"),
        (
            "phi3",
            "rope_parameters",
            serde_json::json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
            "rope_type",
        ),
        (
            "phi3_longrope",
            "rope_parameters",
            serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5, "short_factor": [1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}),
            "short_factor",
        ),
    ];
    for (fixture, key, value, needle) in cases {
        let src = common::fixture(fixture);
        let dir = common::TempDir::new("c11-config");
        common::copy_files(
            &src,
            &dir.0,
            &[
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            ],
        );
        let text = std::fs::read_to_string(src.join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg[*key] = value.clone();
        std::fs::write(dir.0.join("config.json"), cfg.to_string()).unwrap();
        let err = match nnscope::Model::load(dir.0.to_str().unwrap(), &Default::default()) {
            Ok(_) => panic!("{fixture} with {key} = {value}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(needle) && !err.contains('\n'),
            "{fixture} with {key} = {value}: {err}"
        );
    }
}
