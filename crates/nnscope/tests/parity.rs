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
