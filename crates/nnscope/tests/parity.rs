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
