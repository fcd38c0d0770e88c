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

/// `collect --sae --save H.sae.feature_acts --top-k K` on the golden's prompt: the manifest records
/// the SAE; the top-k equal the golden feature activations' top-k of the last token; a resume with
/// another SAE set is refused.
#[test]
fn collect_sae_feature_acts_top_k() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let sae = model.join("saes/res_post_0");
    let g = load(&sae.join("golden.safetensors"));
    let bytes = std::fs::read(model.join("golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let prompt = meta.metadata().clone().unwrap()["prompt"].clone();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, format!("{prompt}\nFree software\n")).unwrap();
    let out = dir.path().join("acts");
    let fa = "blocks.0.hook_resid_post.sae.feature_acts";
    let collect = |extra: &[&str]| {
        let mut args = vec![
            "collect",
            model.to_str().unwrap(),
            "--dataset",
            corpus.to_str().unwrap(),
            "--save",
            fa,
            "--positions",
            "last",
            "--top-k",
            "5",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        nnscope(&args)
    };
    let o = collect(&["--sae", sae.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let man: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(man["saes"][0]["hook"], "blocks.0.hook_resid_post");
    assert_eq!(man["top_k"], 5);
    let t = load(&out.join("part-00000.safetensors"));
    let vals: Vec<f32> = t[&format!("{fa}.top_k_values")]
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let idx: Vec<i64> = t[&format!("{fa}.top_k_indices")]
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let golden = g["feature_acts"].get(0).unwrap();
    let tt = golden.dim(0).unwrap();
    let last: Vec<f32> = golden.get(tt - 1).unwrap().to_vec1().unwrap();
    let mut sorted = last.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let tol = 1e-4 * sorted[0].abs().max(1.0);
    for j in 0..5 {
        assert!((vals[j] - sorted[j]).abs() <= tol, "top {j}");
        assert!((last[idx[j] as usize] - vals[j]).abs() <= tol, "index {j}");
    }
    // Another SAE set: refused, with the folder left as it was.
    let spec = format!("{}=layers_output.0", sae.to_str().unwrap());
    let o = collect(&["--sae", &spec]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("different SAEs"), "{e}");
    let o = collect(&["--sae", sae.to_str().unwrap(), "--splice"]);
    assert!(!o.status.success());
    // Top-k without an SAE save: a clear error before the model loads.
    let o = nnscope(&[
        "collect",
        model.to_str().unwrap(),
        "--dataset",
        corpus.to_str().unwrap(),
        "--save",
        "layers_output.0",
        "--top-k",
        "5",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--top-k"));
}
