//! Sparse autoencoders and transcoders against goldens from transformers + torch
//! (`tests/fixtures/<arch>/saes/<name>/golden.safetensors`, `tests/fixtures/generate/mk_sae.py`):
//! feature activations, reconstruction, logits unchanged by attaching, spliced logits, and logits
//! with one feature clamped (error term kept), each within 1e-4 * max(1, max |ref|).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load, max_abs};
use nnscope::{Attach, Input, Model, Sae};
use std::collections::HashMap;

fn sae_dir(arch: &str, name: &str) -> String {
    fixture(arch)
        .join("saes")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn sae_golden(arch: &str, name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(arch)
            .join("saes")
            .join(name)
            .join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let d = max_abs(
        &(ours.to_dtype(DType::F32).unwrap() - reference.to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let tol = 1e-4 * max_abs(reference).max(1.0);
    assert!(d <= tol, "{what}: max |diff| {d} > {tol}");
    println!("{what}: max |diff| {d:.2e} (tolerance {tol:.1e})");
}

/// Runs the five checks for one SAE fixture, reading it at `hook` (the cfg.json hook when None).
fn check(arch: &str, name: &str, hook: Option<&str>) {
    let model = load(arch);
    let g = sae_golden(arch, name);
    let model_golden = common::golden(arch);
    let ids = model_golden.t["single.input_ids"].clone();
    let sae = Sae::load(&sae_dir(arch, name)).unwrap();
    let h = hook
        .map(str::to_string)
        .unwrap_or_else(|| sae.hook_name.clone().unwrap());
    let attach = || match hook {
        Some(h) => Attach::from(sae.clone()).at(h),
        None => Attach::from(sae.clone()),
    };
    let fa = format!("{h}.sae.feature_acts");
    let rec = format!("{h}.sae.reconstruction");
    let err = format!("{h}.sae.error");

    // Attached: the values, and nothing changes downstream.
    let out = model
        .trace(Input::ids(ids.clone()))
        .sae(attach())
        .unwrap()
        .save(&fa)
        .unwrap()
        .save(&rec)
        .unwrap()
        .save(&err)
        .unwrap()
        .run()
        .unwrap();
    assert_close(
        &format!("{arch}/{name} feature_acts"),
        out.get(&fa).unwrap(),
        &g["feature_acts"],
    );
    assert_close(
        &format!("{arch}/{name} reconstruction"),
        out.get(&rec).unwrap(),
        &g["reconstruction"],
    );
    assert_close(
        &format!("{arch}/{name} logits (attached)"),
        out.logits.as_ref().unwrap(),
        &g["logits"],
    );
    let plain = model.trace(Input::ids(ids.clone())).run().unwrap();
    let same = (out.logits.as_ref().unwrap() - plain.logits.as_ref().unwrap())
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(max_abs(&same), 0.0, "attaching changed the logits");
    // error = x - reconstruction (x: the value at the output hook)
    assert_eq!(out.get(&err).unwrap().dims(), g["reconstruction"].dims());

    // Spliced.
    let out = model
        .trace(Input::ids(ids.clone()))
        .sae(attach().splice(true))
        .unwrap()
        .run()
        .unwrap();
    assert_close(
        &format!("{arch}/{name} spliced_logits"),
        out.logits.as_ref().unwrap(),
        &g["spliced_logits"],
    );

    // One feature clamped, the error term kept.
    let c = g["clamp"].to_vec1::<f32>().unwrap();
    let out = model
        .trace(Input::ids(ids))
        .sae(attach())
        .unwrap()
        .clamp(&fa, c[0] as usize, c[1] as f64)
        .unwrap()
        .run()
        .unwrap();
    assert_close(
        &format!("{arch}/{name} clamped_logits"),
        out.logits.as_ref().unwrap(),
        &g["clamped_logits"],
    );
}

#[test]
fn llama_standard_resid_post() {
    check("llama", "res_post_0", None);
}

#[test]
fn llama_standard_resid_post_standard_name() {
    check("llama", "res_post_0", Some("layers_output.0"));
}

#[test]
fn gpt2_jumprelu_resid_pre() {
    check("gpt2", "res_pre_1", None);
}

#[test]
fn llama_topk_resid_post() {
    check("llama", "topk_post_1", None);
}

#[test]
fn gpt2_gated_constant_norm_rescale_mlp_out() {
    check("gpt2", "gated_mlp_out_0", None);
}

#[test]
fn llama_layer_norm_no_b_dec_resid_pre() {
    check("llama", "ln_pre_1", None);
}

#[test]
fn llama_jumprelu_expected_average_attn_out() {
    check("llama", "avg_attn_out_0", None);
}

#[test]
fn gpt2_transcoder() {
    check("gpt2", "tc_0", None);
}

#[test]
fn llama_skip_transcoder() {
    check("llama", "skip_tc_1", None);
}

#[test]
fn sae_config_fields() {
    let s = Sae::load(&sae_dir("llama", "topk_post_1")).unwrap();
    assert_eq!(s.architecture, nnscope::sae::Architecture::TopK(8));
    assert!(!s.apply_b_dec_to_input);
    let s = Sae::load(&sae_dir("gpt2", "tc_0")).unwrap();
    assert!(s.transcoder);
    assert_eq!(s.hook_name_out.as_deref(), Some("blocks.0.hook_mlp_out"));
}

/// Copies an SAE fixture into a temporary folder and lets `f` change it.
fn altered(
    arch: &str,
    name: &str,
    f: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(arch).join("saes").join(name);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cfg.json")).unwrap()).unwrap();
    let mut w =
        candle_core::safetensors::load(src.join("sae_weights.safetensors"), &Device::Cpu).unwrap();
    f(&mut cfg, &mut w);
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(&w, dir.path().join("sae_weights.safetensors")).unwrap();
    dir
}

#[test]
fn errors_are_clear() {
    let model: Model = load("llama");
    // Unknown architecture.
    let d = altered("llama", "res_post_0", |c, _| {
        c["architecture"] = "matryoshka_quux".into()
    });
    let e = Sae::load(d.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown SAE architecture `matryoshka_quux`") && e.contains("jumprelu"),
        "{e}"
    );
    // Missing tensor: names the file and the tensor.
    let d = altered("gpt2", "res_pre_1", |_, w| {
        w.remove("threshold");
    });
    let e = Sae::load(d.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sae_weights.safetensors") && e.contains("`threshold`"),
        "{e}"
    );
    // d_in that does not match the hookpoint: gpt2's SAE (d_in 64) on llama is fine by size, so
    // make one with another d_in.
    let d = altered("llama", "res_post_0", |c, w| {
        c["d_in"] = 32.into();
        let we = w["W_enc"].narrow(0, 0, 32).unwrap();
        let wd = w["W_dec"].narrow(1, 0, 32).unwrap();
        let bd = w["b_dec"].narrow(0, 0, 32).unwrap();
        w.insert("W_enc".into(), we);
        w.insert("W_dec".into(), wd);
        w.insert("b_dec".into(), bd);
    });
    let sae = Sae::load(d.path().to_str().unwrap()).unwrap();
    let e = model
        .trace(Input::prompts(&["hi"]))
        .sae(sae.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("d_in is 32") && e.contains("blocks.0.hook_resid_post") && e.contains("64"),
        "{e}"
    );
    // At a hookpoint whose size is only known when it runs: a clear error then, not a panic.
    let e = model
        .trace(Input::prompts(&["hi"]))
        .sae(Attach::from(sae).at("mlps.0.source.self_act_fn_0.output"))
        .and_then(|t| t.run())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("d_in 32"), "{e}");
    // A request on an SAE hookpoint with no SAE attached.
    let e = model
        .trace(Input::prompts(&["hi"]))
        .save("layers_output.1.sae.feature_acts")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no SAE is attached"), "{e}");
    // Reconstruction is read-only.
    let sae = Sae::load(&sae_dir("llama", "res_post_0")).unwrap();
    let e = model
        .trace(Input::prompts(&["hi"]))
        .sae(sae)
        .unwrap()
        .clamp("blocks.0.hook_resid_post.sae.reconstruction", 0, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
}

#[test]
fn clamp_any_hookpoint() {
    let model = load("llama");
    let out = model
        .trace(Input::prompts(&["The quick brown fox"]))
        .clamp("mlps.0.source.self_act_fn_0.output", 3, 5.0)
        .unwrap()
        .save("mlps.0.source.self_act_fn_0.output")
        .unwrap()
        .clamp("layers_output.0", 7, -2.0)
        .unwrap()
        .save("blocks.0.hook_resid_post")
        .unwrap()
        .run()
        .unwrap();
    use candle_core::IndexOp;
    let n = out.get("mlps.0.source.self_act_fn_0.output").unwrap();
    let col = n
        .i((.., .., 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(col.iter().all(|v| *v == 5.0));
    let r = out.get("blocks.0.hook_resid_post").unwrap();
    let col = r
        .i((.., .., 7))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(col.iter().all(|v| *v == -2.0));
}

#[test]
fn top_k_per_token() {
    let f = Tensor::new(
        &[[[0.0f32, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let (v, i) = Sae::top_k(&f, 2).unwrap();
    assert_eq!(
        v.to_vec3::<f32>().unwrap(),
        vec![vec![vec![3.0, 2.0], vec![5.0, 4.0]]]
    );
    assert_eq!(
        i.to_vec3::<u32>().unwrap(),
        vec![vec![vec![1, 3], vec![0, 3]]]
    );
    assert!(Sae::top_k(&f, 5).is_err());
}

#[test]
fn sae_in_generation() {
    let model = load("llama");
    let sae = Sae::load(&sae_dir("llama", "res_post_0")).unwrap();
    let out = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(3)
        .sae(sae)
        .unwrap()
        .save("layers_output.0.sae.feature_acts")
        .unwrap()
        .run()
        .unwrap();
    let f0 = out.get("layers_output.0.sae.feature_acts@0").unwrap();
    let f2 = out.get("layers_output.0.sae.feature_acts@2").unwrap();
    assert_eq!(f0.dims()[2], 256);
    assert_eq!(f2.dims()[1], 1);

    // Steps on SAE requests: a save and a clamp from step 1 on (the prompt's forward untouched).
    let sae = Sae::load(&sae_dir("llama", "res_post_0")).unwrap();
    let plain = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(3)
        .save("logits")
        .unwrap()
        .run()
        .unwrap();
    let out = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(3)
        .sae(sae)
        .unwrap()
        .save("layers_output.0.sae.feature_acts")
        .unwrap()
        .steps_from(1)
        .unwrap()
        .clamp("layers_output.0.sae.feature_acts", 5, 30.0)
        .unwrap()
        .steps(1, 2)
        .unwrap()
        .save("logits")
        .unwrap()
        .run()
        .unwrap();
    assert!(out.get("layers_output.0.sae.feature_acts@0").is_err());
    assert!(out.get("layers_output.0.sae.feature_acts@1").is_ok());
    let d0 = max_abs(&(out.get("logits@0").unwrap() - plain.get("logits@0").unwrap()).unwrap());
    assert_eq!(d0, 0.0, "step 0 must be untouched");
    let d1 = max_abs(&(out.get("logits@1").unwrap() - plain.get("logits@1").unwrap()).unwrap());
    assert!(d1 > 1e-3, "the clamp at step 1 must change the logits");
    // Rows do not apply to SAE hookpoints.
    let sae = Sae::load(&sae_dir("llama", "res_post_0")).unwrap();
    let e = model
        .trace(Input::prompts(&["a", "b"]))
        .sae(sae)
        .unwrap()
        .save("layers_output.0.sae.feature_acts")
        .unwrap()
        .rows(&[0])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not apply to SAE hookpoints"), "{e}");
}

/// Every fixture folder (architectures and their config variants).
fn fixtures() -> Vec<String> {
    let dir = fixture("");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path().join("config.json").is_file() && e.path().join("golden.safetensors").is_file()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// TransformerLens names resolve to the same hookpoints as the standard names, on every fixture;
/// `layers_mid.L` (`hook_resid_mid`) is the residual between attention and MLP, or a clear error
/// for parallel-residual architectures.
#[test]
fn transformer_lens_names_on_every_fixture() {
    let fx = fixtures();
    assert!(fx.len() > 10);
    for name in fx {
        let model = load(&name);
        let l = model.num_layers() - 1;
        let pairs = [
            (
                format!("blocks.{l}.hook_resid_pre"),
                format!("layers_input.{l}"),
            ),
            (
                format!("blocks.{l}.hook_resid_post"),
                format!("layers_output.{l}"),
            ),
            (
                format!("blocks.{l}.hook_attn_out"),
                format!("attentions_output.{l}"),
            ),
            (format!("blocks.{l}.hook_mlp_in"), format!("mlps_input.{l}")),
            (
                format!("blocks.{l}.ln2.hook_normalized"),
                format!("mlps_input.{l}"),
            ),
            (
                format!("blocks.{l}.hook_mlp_out"),
                format!("mlps_output.{l}"),
            ),
            (
                format!("blocks.{l}.attn.hook_pattern"),
                format!("attention_probabilities.{l}"),
            ),
            ("hook_embed".to_string(), "token_embeddings".to_string()),
        ];
        for (tl, std) in &pairs {
            let a = model
                .resolve(tl)
                .unwrap_or_else(|e| panic!("{name}: {tl}: {e}"));
            let b = model.resolve(std).unwrap();
            assert_eq!(a.canonical, b.canonical, "{name}: {tl} vs {std}");
            assert_eq!(a.select, b.select, "{name}: {tl} vs {std}");
        }
        // Per-head names: resolve as the standard names once those exist, else say they are
        // pending.
        for (tl, std) in [
            ("attn.hook_z", "heads"),
            ("attn.hook_q", "queries"),
            ("attn.hook_k", "keys"),
            ("attn.hook_v", "values"),
        ] {
            let tl = format!("blocks.{l}.{tl}");
            let std = format!("{std}.{l}");
            match model.resolve(&std) {
                Ok(b) => assert_eq!(model.resolve(&tl).unwrap().canonical, b.canonical),
                Err(_) => {
                    let e = model.resolve(&tl).err().unwrap().to_string();
                    assert!(
                        e.contains(&format!("TransformerLens name of `{std}`")),
                        "{e}"
                    );
                }
            }
        }
        let parallel = name.starts_with("gptj")
            || (name.starts_with("phi") && !name.starts_with("phi3"))
            || name == "falcon"
            || name.starts_with("falcon_new_arch")
            || name.contains("parallel")
            || (name.starts_with("gpt_neox") && !name.contains("sequential"));
        let mid = model.resolve(&format!("blocks.{l}.hook_resid_mid"));
        if parallel {
            let e = mid.err().unwrap().to_string();
            assert!(e.contains("parallel residual"), "{name}: {e}");
            continue;
        }
        assert!(mid.is_ok(), "{name}: {:?}", mid.err());
        let out = model
            .trace(Input::prompts(&["The quick brown fox"]))
            .save(&format!("mlps_input.{l}"))
            .unwrap()
            .save(&format!("layers_input.{l}"))
            .unwrap()
            .save(&format!("attentions_output.{l}"))
            .unwrap()
            .save(&format!("blocks.{l}.hook_resid_mid"))
            .unwrap()
            .run()
            .unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(out.get(&format!("layers_input.{l}")).unwrap());
        let a = f32(out.get(&format!("attentions_output.{l}")).unwrap());
        let m = f32(out.get(&format!("blocks.{l}.hook_resid_mid")).unwrap());
        // Bloom's attention and DBRX's norm_attn_norm return the residual already added;
        // post-norm OPT's MLP reads the normed residual itself.
        let expect = if name.starts_with("bloom") || name.starts_with("dbrx") {
            a
        } else if name == "opt_post_ln" || name.starts_with("olmo2") {
            f32(out.get(&format!("mlps_input.{l}")).unwrap())
        } else if name.starts_with("gemma2") || name.starts_with("gemma3") {
            // The attention's output is normed before the residual add.
            let normed = model
                .trace(Input::prompts(&["The quick brown fox"]))
                .save(&format!("layers.{l}.post_attention_layernorm.output"))
                .unwrap()
                .run()
                .unwrap();
            let n = f32(normed
                .get(&format!("layers.{l}.post_attention_layernorm.output"))
                .unwrap());
            (x + n).unwrap()
        } else {
            (x + a).unwrap()
        };
        let tol = 1e-2 * max_abs(&expect).max(1.0);
        let d = max_abs(&(m - &expect).unwrap());
        assert!(d <= tol, "{name}: layers_mid != residual + attention ({d})");
    }
}
