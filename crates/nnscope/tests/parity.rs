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
