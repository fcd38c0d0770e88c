//! Every architecture against its Hugging Face golden outputs.
mod common;

#[test]
fn gpt2() {
    common::parity("gpt2");
}

#[test]
fn llama() {
    common::parity("llama");
}

#[test]
fn qwen2_moe() {
    common::parity("qwen2_moe");
}

#[test]
fn dbrx() {
    common::parity("dbrx");
}

#[test]
fn gpt_oss() {
    common::parity("gpt_oss");
}

/// GPT-OSS's attention sinks: the seed's hookpoint (`F_softmax_0`) has the sink column, rows summing
/// to 1; uniform attention is written at the tensor that multiplies V (after the sink is dropped).
fn gpt_oss_sinks_and_uniform_attention(arch: &str) {
    use candle_core::{DType, D};
    let model = common::load(arch);
    let g = common::golden(arch);
    let ids = g.t["single.input_ids"].clone();
    let t = ids.dim(1).unwrap();
    let softmax =
        |l: usize| format!("attentions.{l}.source.attention_interface_0.source.F_softmax_0.output");
    let mut tr = model.trace(nnscope::Input::ids(ids));
    for l in 0..model.num_layers() {
        tr = tr.save(&softmax(l)).unwrap();
    }
    let out = tr.run().unwrap();
    for l in 0..model.num_layers() {
        let p = out.get(&softmax(l)).unwrap();
        assert_eq!(p.dim(3).unwrap(), t + 1, "{arch} layer {l}: K + 1 columns");
        let sums = p.to_dtype(DType::F32).unwrap().sum(D::Minus1).unwrap();
        let worst = (sums - 1.0)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let worst = worst.to_scalar::<f32>().unwrap();
        assert!(
            worst < 1e-5,
            "{arch} layer {l}: rows sum to 1 within {worst}"
        );
    }
    common::check_uniform(&model, &g, |l| {
        format!("attentions.{l}.source.attention_interface_0.source.nn_functional_dropout_0.output")
    });
}

#[test]
fn gpt_oss_sinks() {
    gpt_oss_sinks_and_uniform_attention("gpt_oss");
}

// Variants (tests/fixtures/generate/arch_b_variants.py): options the base fixtures leave at defaults.

#[test]
fn qwen2_moe_topk_norm() {
    // norm_topk_prob, mlp_only_layers=[1], use_sliding_window (layer 0, window 8), top-3 of 4.
    common::parity("qwen2_moe_topk_norm");
}

#[test]
fn qwen2_moe_sparse_step() {
    // decoder_sparse_step=2, no qkv bias, gelu, top-1 of 6, MHA, rope_theta 500.
    common::parity("qwen2_moe_sparse_step");
}

#[test]
fn dbrx_no_norm() {
    // moe_normalize_expert_weights=None, MQA, top-3 of 4.
    common::parity("dbrx_no_norm");
}

#[test]
fn dbrx_p2() {
    // 2-norm router normalization, clip_qkv 0.5, gelu experts, MHA, rope_theta 1000.
    common::parity("dbrx_p2");
}

#[test]
fn gpt_oss_default_rope() {
    // full then sliding layers (window 6), default RoPE, no attention bias, swiglu_limit 0.5, top-3.
    common::parity("gpt_oss_default_rope");
    gpt_oss_sinks_and_uniform_attention("gpt_oss_default_rope");
}

#[test]
fn gpt_oss_yarn_truncate() {
    // YaRN with truncate=true, both layers sliding (window 4), MQA, head_dim 8, swiglu_limit 1.
    common::parity("gpt_oss_yarn_truncate");
    gpt_oss_sinks_and_uniform_attention("gpt_oss_yarn_truncate");
}

#[test]
fn dbrx_p3_all_experts() {
    // Generic p-norm (p=3) router normalization, top-4 of 4 experts, relu experts.
    common::parity("dbrx_p3_all_experts");
}

#[test]
fn gptj() {
    common::parity("gptj");
}

#[test]
fn bloom() {
    common::parity("bloom");
}

#[test]
fn stablelm() {
    common::parity("stablelm");
}

// Variants (tests/fixtures/generate/arch_a_variants.py): options the base fixtures leave at defaults.

#[test]
fn gptj_rotary_full() {
    common::parity("gptj_rotary_full");
}

#[test]
fn gptj_rotary4_tied() {
    common::parity("gptj_rotary4_tied");
}

#[test]
fn bloom_post_ln() {
    common::parity("bloom_post_ln");
}

#[test]
fn bloom_tp_slow() {
    common::parity("bloom_tp_slow");
}

#[test]
fn stablelm_qk_layernorm_parallel() {
    common::parity("stablelm_qk_layernorm_parallel");
}

#[test]
fn stablelm_v4_layout() {
    common::parity("stablelm_v4_layout");
}

#[test]
fn bloom_no_prefix() {
    common::parity("bloom_no_prefix");
}

#[test]
fn stablelm_rope_defaults() {
    common::parity("stablelm_rope_defaults");
}
