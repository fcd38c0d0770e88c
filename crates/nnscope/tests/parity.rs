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
