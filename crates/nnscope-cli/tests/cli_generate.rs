//! `nnscope generate`: greedy output equals transformers' `generate()`, saves per step, errors.
use std::path::PathBuf;
use std::process::Command;

fn fixture(a: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(a)
        .to_string_lossy()
        .into_owned()
}

fn nnscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nnscope"))
        .args(args)
        .output()
        .expect("run nnscope")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nnscope-cli-gen-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn golden(arch: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        PathBuf::from(fixture(arch)).join("golden.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn generate_matches_transformers_and_saves_every_step() {
    let g = golden("gpt2");
    let d = tmp("batch");
    // The golden's left-padded batch as --inputs.
    let mut inputs = std::collections::HashMap::new();
    inputs.insert("input_ids".to_string(), g["batch.input_ids"].clone());
    inputs.insert(
        "attention_mask".to_string(),
        g["batch.attention_mask"].clone(),
    );
    let inp = d.join("ids.safetensors");
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let out = d.join("gen.safetensors");
    let o = nnscope(&[
        "generate",
        &fixture("gpt2"),
        "--inputs",
        inp.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--save",
        "logits",
        "--save",
        "attention_probabilities.*",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // One decoded continuation per row on stdout.
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        t["output_ids"].to_vec2::<i64>().unwrap(),
        g["gen.batch.sequences"].to_vec2::<i64>().unwrap()
    );
    let (b, tl) = g["batch.input_ids"].dims2().unwrap();
    let vocab = g["batch.logits"].dim(2).unwrap();
    assert_eq!(t["logits@0"].dims(), &[b, tl, vocab]);
    assert_eq!(t["logits@1"].dims(), &[b, 1, vocab]);
    assert!(t.contains_key("logits@7") && !t.contains_key("logits@8"));
    let p = &t["attention_probabilities.1@3"];
    assert_eq!(p.dims()[2..], [1, tl + 3]);
}

#[test]
fn generate_prints_the_continuation_and_limits_saves_to_steps() {
    let d = tmp("steps");
    let out = d.join("gen.safetensors");
    let o = nnscope(&[
        "generate",
        &fixture("llama"),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--save",
        "layers_output.*",
        "--steps",
        "1:3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = t
        .keys()
        .filter(|k| k.starts_with("layers_output"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "layers_output.0@1",
            "layers_output.0@2",
            "layers_output.1@1",
            "layers_output.1@2"
        ]
    );
    // Same seed, same text.
    let again = nnscope(&[
        "generate",
        &fixture("llama"),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--seed",
        "3",
    ]);
    assert_eq!(o.stdout, again.stdout);
}

#[test]
fn generate_refuses_bad_options_in_one_line() {
    for (args, word) in [
        (vec!["--max-new-tokens", "0"], "max_new_tokens"),
        (vec!["--max-new-tokens", "3", "--top-p", "1.5"], "top_p"),
        (vec!["--max-new-tokens", "3", "--top-p", "0"], "top_p"),
        (vec!["--max-new-tokens", "3", "--steps", "4:2"], "--steps"),
        (vec!["--max-new-tokens", "5000"], "positions"),
    ] {
        let mut a = vec!["generate", "placeholder", "--prompt", "Hi"];
        let f = fixture("gpt2");
        a[1] = &f;
        a.extend(args.iter());
        let o = nnscope(&a);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(word), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn run_takes_explicit_position_ids_from_the_inputs_file() {
    // GPT-2's learned positions make the difference visible: positions 0..T-1 on every row give
    // transformers' raw batch (`batch.logits`), the default (from the mask) gives `batchpos`.
    let g = golden("gpt2");
    let d = tmp("positions");
    let ids = g["batch.input_ids"].clone();
    let (b, t) = ids.dims2().unwrap();
    let positions = candle_core::Tensor::arange(0i64, t as i64, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((b, t))
        .unwrap()
        .contiguous()
        .unwrap();
    let mut inputs = std::collections::HashMap::new();
    inputs.insert("input_ids".to_string(), ids);
    inputs.insert(
        "attention_mask".to_string(),
        g["batch.attention_mask"].clone(),
    );
    inputs.insert("position_ids".to_string(), positions);
    let inp = d.join("ids.safetensors");
    candle_core::safetensors::save(&inputs, &inp).unwrap();
    let out = d.join("out.safetensors");
    let o = nnscope(&[
        "run",
        &fixture("gpt2"),
        "--inputs",
        inp.to_str().unwrap(),
        "--save",
        "logits",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = &candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()["logits"];
    let mask = g["batch.attention_mask"].to_vec2::<i64>().unwrap();
    let reference = &g["batch.logits"];
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    for (row, m) in mask.iter().enumerate() {
        let first = m.iter().position(|x| *x == 1).unwrap();
        let n = t - first;
        let a = ours.get(row).unwrap().narrow(0, first, n).unwrap();
        let r = reference.get(row).unwrap().narrow(0, first, n).unwrap();
        let d = (a - r)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 * scale, "row {row}: {d}");
    }
}
