//! The CLI contract: `nnscope run`, `nnscope source`, `nnscope check`, `nnscope find-attn-probs`.

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
    let d = std::env::temp_dir().join(format!("nnscope-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn run_saves_expanded_names_as_float32() {
    let out = tmp("run").join("out.safetensors");
    let o = nnscope(&[
        "run",
        &fixture("llama"),
        "--prompt",
        "The quick brown fox",
        "--prompt",
        "Free software",
        "--save",
        "attention_probabilities.*",
        "--save",
        "layers_output.1",
        "--save",
        "logits",
        "--save",
        "attentions.0.source.attention_interface_0.source.nn_functional_dropout_0.output",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut keys: Vec<_> = t.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "attention_probabilities.0",
            "attention_probabilities.1",
            "attentions.0.source.attention_interface_0.source.nn_functional_dropout_0.output",
            "layers_output.1",
            "logits"
        ]
    );
    for v in t.values() {
        assert_eq!(v.dtype(), candle_core::DType::F32);
        assert_eq!(v.dims()[0], 2, "batch of two prompts");
    }
    let a = &t["attention_probabilities.0"];
    let b = &t["attentions.0.source.attention_interface_0.source.nn_functional_dropout_0.output"];
    assert_eq!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn run_takes_inputs_from_safetensors() {
    let d = tmp("inputs");
    let golden = candle_core::safetensors::load(
        PathBuf::from(fixture("gpt2")).join("golden.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut inputs = std::collections::HashMap::new();
    inputs.insert("input_ids".to_string(), golden["batch.input_ids"].clone());
    inputs.insert(
        "attention_mask".to_string(),
        golden["batch.attention_mask"].clone(),
    );
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
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let ours = &t["logits"];
    // Positions come from the mask (as transformers' `generate()` computes them), so the padded row
    // equals its prompt alone: the golden run with those positions is `batchpos`.
    let reference = &golden["batchpos.logits"];
    // Compare the real (unpadded) positions of the second, padded sequence.
    let mask = golden["batch.attention_mask"].to_vec2::<i64>().unwrap();
    let first_real = mask[1].iter().position(|m| *m == 1).unwrap();
    let n = mask[1].len() - first_real;
    let a = ours.get(1).unwrap().narrow(0, first_real, n).unwrap();
    let b = reference.get(1).unwrap().narrow(0, first_real, n).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-3, "{d}");
}

#[test]
fn source_lists_the_seed_table_paths() {
    let o = nnscope(&["source", &fixture("gpt2"), "attentions.0"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    let has = |s: &str, label: &str| {
        s.lines()
            .any(|l| l.split_whitespace().next() == Some(label) && l.contains("->"))
    };
    assert!(has(&s, "attention_interface_0"), "{s}");
    let o = nnscope(&[
        "source",
        &fixture("gpt2"),
        "attentions.0.source.attention_interface_0",
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(has(&s, "module_attn_dropout_0"), "{s}");
    let o = nnscope(&[
        "source",
        &fixture("llama"),
        "attentions.0.source.attention_interface_0",
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(has(&s, "nn_functional_dropout_0"), "{s}");
    // A typo is a one-line error with a suggestion.
    let o = nnscope(&[
        "source",
        &fixture("llama"),
        "attentions.0.source.attention_interfac_0",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("attention_interface_0"), "{e}");
}

#[test]
fn check_and_discovery_json() {
    for arch in ["gpt2", "llama"] {
        let o = nnscope(&["check", &fixture(arch), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["passed"], true);
        let o = nnscope(&["find-attn-probs", &fixture(arch), "--json"]);
        assert!(o.status.success());
        let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            d["hookpoint"], v["hookpoint"],
            "discovery agrees with the registry"
        );
        assert_eq!(d["changes_output"], true);
    }
}

/// The seed's Quick Reference Table, written out from `attentions.L` (the contract; see
/// shared/seed/find-attention-probability-hooks.md).
const SEED_TABLE: &[(&str, &str)] = &[
    ("qwen2_moe", "source.nn_functional_dropout_0"),
    ("dbrx", "attn.source.nn_functional_dropout_0"),
    ("stablelm", "source.self_attention_dropout_0"),
    ("gpt_oss", "source.attention_interface_0.source.F_softmax_0"),
    (
        "llama",
        "source.attention_interface_0.source.nn_functional_dropout_0",
    ),
    ("bloom", "source.self_attention_dropout_0"),
    (
        "gpt2",
        "source.attention_interface_0.source.module_attn_dropout_0",
    ),
    ("gptj", "source.self__attn_0.source.self_attn_dropout_0"),
];

#[test]
fn every_seed_table_path_runs_and_is_listed() {
    let d = tmp("seed");
    for (arch, path) in SEED_TABLE {
        let name = format!("attentions.0.{path}.output");
        let out = d.join(format!("{arch}.safetensors"));
        let o = nnscope(&[
            "run",
            &fixture(arch),
            "--prompt",
            "hello world",
            "--save",
            &name,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
        let p = &t[&name];
        let (_, _, q, k) = p.dims4().unwrap();
        assert!(
            k == q || (*arch == "gpt_oss" && k == q + 1),
            "{arch}: {:?}",
            p.dims()
        );
        let sums = p
            .sum(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{arch}: rows sum to 1"
        );
        // The listing of the function holding the last label shows it.
        let (holder, label) = path
            .rsplit_once(".source.")
            .map(|(h, l)| (format!("attentions.0.{h}"), l))
            .unwrap_or(("attentions.0".into(), path.trim_start_matches("source.")));
        let holder = if holder == "attentions.0.source" {
            "attentions.0".to_string()
        } else {
            holder
        };
        let o = nnscope(&["source", &fixture(arch), &holder]);
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(
            s.lines()
                .any(|l| l.split_whitespace().next() == Some(label) && l.contains("->")),
            "{arch}: `{label}` in the listing of {holder}:\n{s}"
        );
    }
}
