//! Save every layer's attention probabilities for a batch of prompts and print their row sums.
//!
//! `cargo run --release -p nnscope --example attention_probs -- tests/fixtures/llama`

use nnscope::{Input, LoadOptions, Model};

fn main() -> nnscope::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/llama".into());
    let model = Model::load(&path, &LoadOptions::default())?;
    let prompts = [
        "The quick brown fox jumps over the lazy dog",
        "Free software",
    ];
    let mut trace = model.trace(Input::prompts(&prompts));
    for layer in 0..model.num_layers() {
        trace = trace.save(&format!("attention_probabilities.{layer}"))?;
    }
    let out = trace.run()?;
    println!(
        "{} ({}): attention probabilities at attentions.L.{}",
        model.class_name(),
        model.arch.model_type,
        model.attention_probabilities_path().unwrap_or("?")
    );
    for layer in 0..model.num_layers() {
        let p = out.get(&format!("attention_probabilities.{layer}"))?;
        // Rows sum to 1 (padding rows too: they attend to padding).
        let sums = p
            .sum(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (lo, hi) = sums
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        println!(
            "layer {layer}: shape {:?}, row sums {lo:.6}..{hi:.6}",
            p.dims()
        );
    }
    Ok(())
}
