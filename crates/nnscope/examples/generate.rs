//! Generate with the key/value cache: greedy and sampled, a left-padded batch, attention read at
//! every step, and a steering vector applied while the model writes.
//!
//! `cargo run --release -p nnscope --example generate -- tests/fixtures/llama`

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model};

fn main() -> nnscope::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/llama".into());
    let model = Model::load(&path, &LoadOptions::default())?;
    let prompts = ["The quick brown fox", "Free software"];

    // Greedy, 8 new tokens, the last layer's attention saved at every step.
    let last = model.num_layers() - 1;
    let out = model
        .generate(Input::prompts(&prompts))
        .max_new_tokens(8)
        .save(&format!("attention_probabilities.{last}"))?
        .run()?;
    for (p, text) in prompts.iter().zip(&out.texts) {
        println!("greedy   {p:?} -> {text:?}");
    }
    // Step 0 is the prompt's forward ([B, H, T, T]); step S a single new token ([B, H, 1, T + S]).
    for s in [0, 1, 2] {
        let probs = out.get(&format!("attention_probabilities.{last}@{s}"))?;
        println!("  attention at step {s}: {:?}", probs.dims());
    }

    // Sampling: temperature, top-k, top-p and a seed (the same seed gives the same tokens).
    let sampled = model
        .generate(Input::prompts(&prompts))
        .max_new_tokens(8)
        .temperature(0.8)
        .top_k(40)
        .top_p(0.95)
        .seed(1)
        .run()?;
    for (p, text) in prompts.iter().zip(&sampled.texts) {
        println!("sampled  {p:?} -> {text:?}");
    }

    // Steering while generating (nnterp's use): add a vector to layer 0's output at every step
    // from the first new token on (step 1), leaving the prompt's forward untouched.
    let v = Tensor::ones(model.hidden_size()?, DType::F32, &Device::Cpu)?;
    let steered = model
        .generate(Input::prompts(&prompts))
        .max_new_tokens(8)
        .steer(&[0], &v, 8.0, None)?
        .steps_from(1)?
        .run()?;
    for (p, text) in prompts.iter().zip(&steered.texts) {
        println!("steered  {p:?} -> {text:?}");
    }
    Ok(())
}
