//! Steer a layer's output, skip a layer, and edit attention, and see what each does to the next
//! token.
//!
//! `cargo run --release -p nnscope --example steering -- tests/fixtures/gpt2`

use candle_core::{Device, Tensor};
use nnscope::{Input, LoadOptions, Model};

fn top(model: &Model, probs: &Tensor) -> nnscope::Result<String> {
    let p = probs.get(0)?.to_vec1::<f32>()?;
    let (id, best) = p.iter().enumerate().fold(
        (0, f32::MIN),
        |a, (i, x)| if *x > a.1 { (i, *x) } else { a },
    );
    let word = model
        .tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id as u32], false).ok())
        .unwrap_or_default();
    Ok(format!("{word:?} (id {id}, p = {best:.3})"))
}

fn main() -> nnscope::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/gpt2".into());
    let model = Model::load(&path, &LoadOptions::default())?;
    let prompt = ["The quick brown fox jumps over the lazy"];
    let plain = model.trace(Input::prompts(&prompt)).run()?;
    println!(
        "plain:            {}",
        top(&model, &plain.next_token_probs()?)?
    );

    // A steering vector: here just a direction along the first embedding row.
    let hidden = model.hidden_size()?;
    let v = Tensor::arange(0f32, hidden as f32, &Device::Cpu)?.affine(1.0 / hidden as f64, -0.5)?;
    let steered = model
        .trace(Input::prompts(&prompt))
        .steer(&[0], &v, 8.0, None)?
        .run()?;
    println!(
        "steered layer 0:  {}",
        top(&model, &steered.next_token_probs()?)?
    );

    let skipped = model
        .trace(Input::prompts(&prompt))
        .skip_layer(model.num_layers() - 1)?
        .run()?;
    println!(
        "skip last layer:  {}",
        top(&model, &skipped.next_token_probs()?)?
    );

    // Uniform causal attention in layer 0, written through the standard name.
    let uniform = model
        .trace(Input::prompts(&prompt))
        .edit("attention_probabilities.0", |p| {
            let (b, h, q, k) = p.dims4()?;
            // Lower-triangular ones, each row divided by its length: 1/(q+1) on keys 0..q.
            let mask = Tensor::tril2(q, p.dtype(), p.device())?.narrow(1, 0, k)?;
            let rows = mask.sum_keepdim(1)?;
            mask.broadcast_div(&rows)?
                .broadcast_as((b, h, q, k))?
                .contiguous()
        })?
        .run()?;
    println!(
        "uniform attn L0:  {}",
        top(&model, &uniform.next_token_probs()?)?
    );
    Ok(())
}
