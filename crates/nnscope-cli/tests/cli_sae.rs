//! `--sae`, `--splice` and `--clamp` on `run` and `generate`, against the SAE goldens from
//! transformers + torch (`tests/fixtures/<arch>/saes/<name>/golden.safetensors`).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

fn fixture(a: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(a)
}

fn nnscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nnscope"))
        .args(args)
        .output()
        .expect("run nnscope")
}

fn load(p: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}");
    let d = max_abs(&(ours - reference).unwrap());
    let tol = 1e-4 * max_abs(reference).max(1.0);
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
}

/// Runs `nnscope run` on the fixture's `single` input with `extra` arguments; returns the saves.
fn run(arch: &str, dir: &tempfile::TempDir, tag: &str, extra: &[&str]) -> HashMap<String, Tensor> {
    let g = load(&fixture(arch).join("golden.safetensors"));
    let ids = dir.path().join("ids.safetensors");
    if !ids.exists() {
        let t = g["single.input_ids"].to_dtype(DType::I64).unwrap();
        candle_core::safetensors::save(&HashMap::from([("input_ids".to_string(), t)]), &ids)
            .unwrap();
    }
    let out = dir.path().join(format!("{tag}.safetensors"));
    let model = fixture(arch);
    let mut args = vec![
        "run",
        model.to_str().unwrap(),
        "--inputs",
        ids.to_str().unwrap(),
        "--save",
        "logits",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = nnscope(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    load(&out)
}

#[test]
fn run_sae_splice_clamp_match_the_goldens() {
    for (arch, name, hook) in [
        ("llama", "res_post_0", "blocks.0.hook_resid_post"),
        ("gpt2", "res_pre_1", "blocks.1.hook_resid_pre"),
        ("gpt2", "tc_0", "blocks.0.ln2.hook_normalized"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sae = fixture(arch).join("saes").join(name);
        let sae = sae.to_str().unwrap();
        let g = load(
            &fixture(arch)
                .join("saes")
                .join(name)
                .join("golden.safetensors"),
        );
        let fa = format!("{hook}.sae.feature_acts");
        let t = run(arch, &dir, "attached", &["--sae", sae, "--save", &fa]);
        assert_close("feature_acts", &t[&fa], &g["feature_acts"]);
        assert_close("logits", &t["logits"], &g["logits"]);
        let t = run(arch, &dir, "spliced", &["--sae", sae, "--splice"]);
        assert_close("spliced_logits", &t["logits"], &g["spliced_logits"]);
        let c = g["clamp"].to_vec1::<f32>().unwrap();
        let clamp = format!("{fa}:{}={}", c[0] as usize, c[1]);
        let t = run(arch, &dir, "clamped", &["--sae", sae, "--clamp", &clamp]);
        assert_close("clamped_logits", &t["logits"], &g["clamped_logits"]);
    }
}

#[test]
fn run_sae_at_another_hookpoint() {
    let dir = tempfile::tempdir().unwrap();
    let sae = fixture("llama").join("saes/res_post_0");
    let g = load(&sae.join("golden.safetensors"));
    let spec = format!("{}=layers_output.0", sae.to_str().unwrap());
    let t = run(
        "llama",
        &dir,
        "at",
        &[
            "--sae",
            &spec,
            "--save",
            "layers_output.0.sae.reconstruction",
        ],
    );
    assert_close(
        "reconstruction",
        &t["layers_output.0.sae.reconstruction"],
        &g["reconstruction"],
    );
}

#[test]
fn generate_with_an_sae() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.safetensors");
    let sae = fixture("llama").join("saes/res_post_0");
    let model = fixture("llama");
    let o = nnscope(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "2",
        "--sae",
        sae.to_str().unwrap(),
        "--splice",
        "--clamp",
        "mlps.0.source.self_act_fn_0.output:3=1.5",
        "--save",
        "blocks.0.hook_resid_post.sae.feature_acts",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = load(&out);
    assert_eq!(
        t["blocks.0.hook_resid_post.sae.feature_acts@1"].dims(),
        &[1, 1, 256]
    );
}

#[test]
fn bad_sae_arguments_are_one_line_errors() {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    for (args, want) in [
        (vec!["--sae", "/nonexistent/sae"], "no such SAE folder"),
        (vec!["--clamp", "layers_output.0:abc=1"], "is not an index"),
        (
            vec!["--clamp", "layers_output.0:999=1"],
            "past the end of the last axis",
        ),
        (
            vec!["--save", "layers_output.0.sae.feature_acts"],
            "no SAE is attached",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.safetensors");
        let mut a = vec!["run", model, "--prompt", "hi", "--save", "logits", "--out"];
        a.push(out.to_str().unwrap());
        a.extend(args.iter().copied());
        let o = nnscope(&a);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
}
