//! GPT-NeoX, GPT-Neo, OPT, GPTBigCode and Starcoder2 (and their config variants) against their
//! Hugging Face golden outputs.
mod common;

#[test]
fn gpt_neox() {
    common::parity("gpt_neox");
}

#[test]
fn gpt_neox_sequential() {
    common::parity("gpt_neox_sequential");
}

#[test]
fn gpt_neox_tied_linear() {
    common::parity("gpt_neox_tied_linear");
}

#[test]
fn gpt_neo() {
    common::parity("gpt_neo");
}

#[test]
fn gpt_neo_local_untied() {
    common::parity("gpt_neo_local_untied");
}

#[test]
fn opt() {
    common::parity("opt");
}

#[test]
fn opt_post_ln() {
    common::parity("opt_post_ln");
}

#[test]
fn opt_no_affine() {
    common::parity("opt_no_affine");
}

#[test]
fn gpt_bigcode() {
    common::parity("gpt_bigcode");
}

#[test]
fn gpt_bigcode_mha() {
    common::parity("gpt_bigcode_mha");
}

#[test]
fn gpt_bigcode_noscale() {
    common::parity("gpt_bigcode_noscale");
}

#[test]
fn starcoder2() {
    common::parity("starcoder2");
}

#[test]
fn starcoder2_sw_nobias() {
    common::parity("starcoder2_sw_nobias");
}

#[test]
fn starcoder2_head_dim() {
    common::parity("starcoder2_head_dim");
}

/// A fixture's checkpoint with `key` set to `value` in config.json: the load error's message.
fn load_error(arch: &str, key: &str, value: serde_json::Value) -> String {
    let tmp = common::TempDir::new(arch);
    let from = common::fixture(arch);
    common::copy_files(
        &from,
        &tmp.0,
        &[
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
    );
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().insert(key.into(), value);
    std::fs::write(tmp.0.join("config.json"), cfg.to_string()).unwrap();
    match nnscope::Model::load(tmp.0.to_str().unwrap(), &nnscope::LoadOptions::default()) {
        Ok(_) => panic!("{arch}: the config with {key} edited loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_key() {
    use serde_json::json;
    let cases = [
        // attention_types expanding to 1 layer for 2, and an unknown layer type.
        (
            "gpt_neo",
            "attention_types",
            json!([[["global"], 1]]),
            "attention_types",
        ),
        (
            "gpt_neo",
            "attention_types",
            json!([[["sparse"], 2]]),
            "sparse",
        ),
        ("gpt_neox", "rotary_pct", json!(1.5), "rotary_pct"),
        (
            "opt",
            "activation_function",
            json!("swiglu9"),
            "activation_function",
        ),
        ("gpt_bigcode", "n_head", json!(5), "n_head"),
        ("starcoder2", "sliding_window", json!(0), "sliding_window"),
        (
            "starcoder2",
            "num_key_value_heads",
            json!(3),
            "num_key_value_heads",
        ),
    ];
    for (arch, key, value, expect) in cases {
        let msg = load_error(arch, key, value);
        assert!(
            msg.contains(expect),
            "{arch}: `{msg}` should name `{expect}`"
        );
    }
}
