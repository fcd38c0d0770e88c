//! `nnscope lens`, `patch`, `patchscope`, `dla`, `prompts` and `grad`: outputs against the
//! transformers goldens (`lens.logits`, `patch.*`, `experiments.safetensors`) and clear errors.

use candle_core::{Device, Tensor};
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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nnscope-cli-exp-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(p: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
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
    let m = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1.0)
}

const CLEAN: &str = "The quick brown fox jumps over the lazy";
const CORRUPT: &str = "The quick brown box jumps over the lazy";

#[test]
fn lens_writes_the_golden_logit_lens() {
    let g = load(&fixture("gpt2").join("golden.safetensors"));
    let bytes = std::fs::read(fixture("gpt2").join("golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let prompt = meta.metadata().as_ref().unwrap()["prompt"].clone();
    let out = tmp("lens").join("lens.safetensors");
    let model = fixture("gpt2");
    let o = nnscope(&[
        "lens",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--top-k",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("layer   0:") && stdout.contains("layer   1:"),
        "{stdout}"
    );
    let t = load(&out);
    assert!(rel(&t["logit_lens"], &g["lens.logits"]) <= 1e-4);
}

#[test]
fn patch_writes_the_golden_patching_and_heads() {
    let g = load(&fixture("llama").join("golden.safetensors"));
    let h = load(&fixture("llama").join("experiments.safetensors"));
    let out = tmp("patch").join("patch.safetensors");
    let model = fixture("llama");
    let o = nnscope(&[
        "patch",
        model.to_str().unwrap(),
        "--clean",
        CLEAN,
        "--corrupt",
        CORRUPT,
        "--answer",
        " dog",
        "--wrong",
        " cat",
        "--heads",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = load(&out);
    for (ours, golden) in [
        (&t["clean_metric"], &g["patch.clean_metric"]),
        (&t["corrupt_metric"], &g["patch.corrupt_metric"]),
        (&t["resid"], &g["patch.resid"]),
        (&t["resid_attribution"], &g["patch.attrib"]),
        (&t["heads"], &h["heads"]),
        (&t["heads_attribution"], &h["heads_attribution"]),
    ] {
        assert_eq!(ours.dims(), golden.dims());
        assert!(rel(ours, golden) <= 1e-4);
    }
    assert_eq!(
        t["answer_wrong"].to_vec1::<i64>().unwrap(),
        g["patch.answer_wrong"].to_vec1::<i64>().unwrap()
    );
}

#[test]
fn patch_refuses_prompts_of_different_lengths() {
    let model = fixture("llama");
    let o = nnscope(&[
        "patch",
        model.to_str().unwrap(),
        "--clean",
        "a b",
        "--corrupt",
        CLEAN,
        "--answer",
        " dog",
        "--wrong",
        " cat",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("same token length") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn grad_writes_torch_gradients() {
    let h = load(&fixture("qwen2_moe").join("experiments.safetensors"));
    let out = tmp("grad").join("grad.safetensors");
    let model = fixture("qwen2_moe");
    let o = nnscope(&[
        "grad",
        model.to_str().unwrap(),
        "--prompt",
        CLEAN,
        "--answer",
        " dog",
        "--wrong",
        " cat",
        "--wrt",
        "layers_output.*",
        "--wrt",
        "token_embeddings",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = load(&out);
    for k in ["layers_output.0", "layers_output.1", "token_embeddings"] {
        let r = &h[&format!("grad.{k}")];
        let d = (&t[k] - r)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = r
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4 * m, "{k}: {d} vs scale {m}");
    }
}

#[test]
fn patchscope_dla_and_prompts_run() {
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let o = nnscope(&[
        "patchscope",
        m,
        "--source",
        "The quick brown fox",
        "--source",
        "Free software",
        "--top-k",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("source 1"));
    let o = nnscope(&[
        "dla", m, "--prompt", CLEAN, "--answer", " dog", "--wrong", " cat", "--heads",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    let val = |name: &str| -> f32 {
        s.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!((val("sum") - val("logit difference")).abs() <= 1e-4, "{s}");
    assert!(s.contains("head.1.3"), "{s}");
    let o = nnscope(&[
        "prompts",
        m,
        "--prompt",
        CLEAN,
        "--target",
        "animal=dog,cat",
        "--target",
        "bad",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("NAME=word"));
}
