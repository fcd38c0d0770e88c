//! The seed's workflow in a few lines: discover where a model's attention probabilities are, without
//! the registry, and check the registered hookpoint.
//!
//! `cargo run --release -p nnscope --example find_attention -- tests/fixtures/dbrx`

use nnscope::{LoadOptions, Model};

fn main() -> nnscope::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/llama".into());
    let model = Model::load(&path, &LoadOptions::default())?;
    let found = nnscope::discover::find_attention_probabilities(&model)?;
    println!(
        "found: attentions.L.{}  shape {:?}",
        found.hookpoint, found.shape
    );
    println!("{}", found.listing);
    let report = nnscope::discover::check(&model);
    println!("checklist passed: {}", report.passed);
    Ok(())
}
