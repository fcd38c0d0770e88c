//! The experiments (`nnscope::experiments`) against transformers: the logit lens (`lens.logits`) and
//! activation / attribution patching (`patch.*`) on every fixture folder; per-head patching and
//! gradients against `experiments.safetensors` (written by `tests/fixtures/generate/mk_experiments.py`)
//! where a fixture has one; per-head writes (all heads at once == the attention output); the direct
//! logit attribution identity; patchscopes and target-token probabilities against their definitions.
mod common;

use candle_core::{DType, Device, Tensor};
use nnscope::experiments::{attribution, gradients, lens, patching, patchscope, prompts};
use nnscope::{Input, Model};
use std::collections::HashMap;

/// Every fixture folder (a config.json beside a golden).
fn fixtures() -> Vec<String> {
    let root = common::fixture("");
    let mut v: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    assert!(v.len() >= 8, "fixtures not found under {}", root.display());
    v
}

/// max |a - b| / max(1, max |b|): the fixtures' tolerance measure.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    common::max_diff(a, b) / common::max_abs(b).max(1.0)
}

fn setup() -> patching::PatchSetup {
    patching::PatchSetup::new(
        "The quick brown fox jumps over the lazy",
        "The quick brown box jumps over the lazy",
        " dog",
        " cat",
    )
}

fn experiments_golden(arch: &str) -> Option<HashMap<String, Tensor>> {
    let p = common::fixture(arch).join("experiments.safetensors");
    p.is_file()
        .then(|| candle_core::safetensors::load(&p, &Device::Cpu).unwrap())
}

#[test]
fn logit_lens_matches_golden_on_every_fixture() {
    let mut worst = (0f32, String::new());
    for arch in fixtures() {
        let model = common::load(&arch);
        let g = common::golden(&arch);
        let ids = g.t["single.input_ids"].clone();
        let out = lens::logit_lens(&model, &Input::ids(ids), false).unwrap();
        let reference = &g.t["lens.logits"];
        assert_eq!(out.logits.dims(), reference.dims(), "{arch}");
        let d = rel(&out.logits, reference);
        assert!(d <= 1e-4, "{arch}: lens.logits relative difference {d}");
        // The last layer's lens is the logits.
        let n = model.num_layers();
        let last = out.logits.get(n - 1).unwrap();
        assert!(rel(&last, &g.t["single.logits"]) <= 1e-4, "{arch}");
        if d > worst.0 {
            worst = (d, arch.clone());
        }
    }
    println!(
        "lens.logits worst relative difference {:.2e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn inverse_logits_are_the_head_on_the_negated_norm_output() {
    let model = common::load("llama");
    let input = Input::prompts(&["The quick brown fox"]);
    let out = lens::logit_lens(&model, &input, true).unwrap();
    let inv = out.inverse.as_ref().unwrap();
    let base = model
        .trace(input)
        .save("layers_output.0")
        .unwrap()
        .save("ln_final.output")
        .unwrap()
        .run()
        .unwrap();
    // Layer 0: lm_head(-ln_final(h0)). For llama the head is lm_head alone, so compute it through
    // project_on_vocab of a value whose norm output is negated: ln_final(-x) = -ln_final(x) for RMS.
    let h0 = base.get("layers_output.0").unwrap();
    let expect = model.project_on_vocab(&h0.neg().unwrap()).unwrap();
    let d = rel(&inv.get(0).unwrap(), &expect);
    assert!(d <= 1e-5, "inverse logits differ by {d}");
    let p = out.last_probs(true).unwrap();
    assert_eq!(p.dims(), [1, model.num_layers(), model.vocab_size()]);
}

#[test]
fn patching_matches_golden_on_every_fixture() {
    let mut worst: HashMap<&str, (f32, String)> = HashMap::new();
    for arch in fixtures() {
        let model = common::load(&arch);
        let g = common::golden(&arch);
        let heads = experiments_golden(&arch);
        let p = patching::patch(&model, &setup(), heads.is_some()).unwrap();
        let ids = |t: &Tensor| {
            t.to_dtype(DType::I64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
        };
        assert_eq!(ids(&p.clean_ids), ids(&g.t["patch.clean_ids"]), "{arch}");
        assert_eq!(
            ids(&p.corrupt_ids),
            ids(&g.t["patch.corrupt_ids"]),
            "{arch}"
        );
        assert_eq!(
            vec![p.answer_wrong[0] as i64, p.answer_wrong[1] as i64],
            ids(&g.t["patch.answer_wrong"]),
            "{arch}"
        );
        let dev = Device::Cpu;
        // A fresh-model patch.* (experiments.safetensors) where there is one: see mk_experiments.py
        // (transformers' dynamic RoPE keeps the longest sequence's frequencies across calls).
        let pg = |k: &str| -> Tensor {
            match heads.as_ref().and_then(|h| h.get(&format!("patch.{k}"))) {
                Some(t) => t.clone(),
                None => g.t[&format!("patch.{k}")].clone(),
            }
        };
        let mut checks = vec![
            (
                "clean_metric",
                Tensor::new(&[p.clean_metric], &dev).unwrap(),
                pg("clean_metric"),
            ),
            (
                "corrupt_metric",
                Tensor::new(&[p.corrupt_metric], &dev).unwrap(),
                pg("corrupt_metric"),
            ),
            ("resid", p.resid.clone(), pg("resid")),
            (
                "resid_attribution",
                p.resid_attribution.clone(),
                pg("attrib"),
            ),
        ];
        if let Some(h) = &heads {
            checks.push(("heads", p.heads.clone().unwrap(), h["heads"].clone()));
            checks.push((
                "heads_attribution",
                p.heads_attribution.clone().unwrap(),
                h["heads_attribution"].clone(),
            ));
        }
        for (name, ours, reference) in checks {
            assert_eq!(ours.dims(), reference.dims(), "{arch} {name}");
            let d = rel(&ours, &reference);
            assert!(d <= 1e-4, "{arch}: patch {name} relative difference {d}");
            let w = worst.entry(name).or_insert((0.0, String::new()));
            if d >= w.0 {
                *w = (d, arch.clone());
            }
        }
    }
    let mut w: Vec<_> = worst.into_iter().collect();
    w.sort_by(|a, b| a.0.cmp(b.0));
    for (name, (d, arch)) in w {
        println!("patch.{name} worst relative difference {d:.2e} ({arch})");
    }
}

#[test]
fn patching_refuses_prompts_of_different_lengths() {
    let model = common::load("llama");
    let s = patching::PatchSetup::new(
        "The quick brown fox",
        "A much longer corrupt prompt here",
        " dog",
        " cat",
    );
    let e = patching::patch(&model, &s, false).unwrap_err().to_string();
    let (a, _) = model.tokenize(&["The quick brown fox"]).unwrap();
    let (b, _) = model
        .tokenize(&["A much longer corrupt prompt here"])
        .unwrap();
    assert!(
        e.contains(&a.dim(1).unwrap().to_string()) && e.contains(&b.dim(1).unwrap().to_string()),
        "{e}"
    );
}

/// Writing every head of layer L at once from the clean run equals writing `attentions_output.L`:
/// the per-head hookpoint is exactly what the output projection sees.
#[test]
fn all_heads_at_once_equal_the_attention_output() {
    let mut n = 0;
    for arch in fixtures() {
        let model = common::load(&arch);
        for l in 0..model.num_layers() {
            if arch == "bloom_tp_slow" {
                // pretraining_tp > 1 with slow_but_exact: the output projection is applied in
                // slices (F.linear on parts of its weight), so the module never runs: a clear
                // error, not a silent skip.
                let e = patching::all_heads_vs_attention_output(&model, &setup(), l).unwrap_err();
                assert!(e.to_string().contains("never ran"), "{e}");
                continue;
            }
            let (heads, proj, attn) =
                patching::all_heads_vs_attention_output(&model, &setup(), l).unwrap();
            let d = (heads - proj).abs() / proj.abs().max(1.0);
            assert!(
                d <= 1e-5,
                "{arch} layer {l}: all heads {heads} vs output projection {proj}"
            );
            if arch.starts_with("bloom") || arch.starts_with("dbrx") {
                // Bloom's attention module adds the residual itself (dropout_add), and DBRX's
                // standard attention (`norm_attn_norm`) holds the norms and the residual: their
                // output is not the projection's, and patching it also patches the residual.
                continue;
            }
            let d = (heads - attn).abs() / attn.abs().max(1.0);
            assert!(
                d <= 1e-5,
                "{arch} layer {l}: all heads {heads} vs attention output {attn}"
            );
            n += 1;
        }
    }
    assert!(n >= 16);
}

#[test]
fn gradients_match_torch() {
    let mut checked = 0;
    for arch in fixtures() {
        let Some(gold) = experiments_golden(&arch) else {
            continue;
        };
        let model = common::load(&arch);
        let names: Vec<String> = gold
            .keys()
            .filter_map(|k| k.strip_prefix("grad.").map(String::from))
            .collect();
        let wrt: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let (ids, _) = model.tokenize(&[setup().clean.as_str()]).unwrap();
        let a = nnscope::experiments::first_token(&model, " dog").unwrap();
        let b = nnscope::experiments::first_token(&model, " cat").unwrap();
        let g = gradients::gradients(&model, &Input::ids(ids), &wrt, |out| {
            Ok(patching::logit_diff(out.logits.as_ref().unwrap(), a, b)?.get(0)?)
        })
        .unwrap();
        for name in &names {
            let reference = &gold[&format!("grad.{name}")];
            let mut ours = g.get(name).unwrap().clone();
            if ours.dims() != reference.dims() && name.starts_with("attention_probabilities") {
                // Attention sinks (gpt_oss): nnscope's hookpoint keeps the sink column, last.
                let k = reference.dim(3).unwrap();
                ours = ours.narrow(3, 0, k).unwrap();
            }
            let ours = &ours;
            assert_eq!(ours.dims(), reference.dims(), "{arch} {name}");
            let d = common::max_diff(ours, reference) / common::max_abs(reference).max(1e-12);
            assert!(
                d <= 1e-4,
                "{arch}: gradient w.r.t. {name}: relative difference {d}"
            );
            println!("{arch} grad {name}: relative difference {d:.2e}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} gradients checked");
}

#[test]
fn gradients_refuse_what_they_cannot_compute() {
    let model = common::load("llama");
    let input = Input::prompts(&["The quick brown fox"]);
    // A scalar that does not depend on the hookpoint: an error, not a zero.
    let e = gradients::gradients(&model, &input, &["layers_output.1"], |out| {
        Ok(out.get("layers_output.0")?.sum_all()?)
    });
    assert!(e.is_err());
    let e = gradients::gradients_with(
        &model,
        &input,
        &["layers_output.1"],
        |t| t.save("layers_output.0"),
        |out| Ok(out.get("layers_output.0")?.sum_all()?),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not depend"), "{e}");
    // Not a scalar.
    let e = gradients::gradients(&model, &input, &["layers_output.0"], |out| {
        Ok(out.logits.clone().unwrap())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("one element"), "{e}");
    // Through an op candle treats as a constant (ceil): an error, not a zero.
    let e = gradients::gradients(&model, &input, &["layers_output.0"], |out| {
        Ok(out.logits.as_ref().unwrap().ceil()?.sum_all()?)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not depend"), "{e}");
}

#[test]
fn direct_logit_attribution_parts_sum_to_the_logit_difference() {
    let mut held = 0;
    for arch in fixtures() {
        let model = common::load(&arch);
        let input = Input::prompts(&[setup().clean.as_str()]);
        for heads in [false, true] {
            if heads && arch == "bloom_tp_slow" {
                continue; // no output-projection module runs (see above)
            }
            match attribution::direct_logit_attribution(&model, &input, " dog", " cat", heads) {
                Ok(a) => {
                    let d = (a.sum() - a.logit_diff).abs() / a.logit_diff.abs().max(1.0);
                    assert!(
                        d <= 1e-4,
                        "{arch} heads={heads}: parts sum to {} but the logit difference is {}",
                        a.sum(),
                        a.logit_diff
                    );
                    let n = model.num_layers();
                    let expect = 1 + n * if heads {
                        model.num_heads().unwrap() + 2
                    } else {
                        2
                    };
                    assert_eq!(a.parts.len(), expect, "{arch}");
                    if heads {
                        held += 1;
                        println!(
                            "{arch}: DLA identity off by {d:.2e} (residual split error {:.2e})",
                            a.residual_error
                        );
                    }
                }
                Err(e) => {
                    // Only where the residual is genuinely not a sum of the parts.
                    let e = e.to_string();
                    assert!(e.contains("not the sum"), "{arch}: {e}");
                    // Bloom's attention and MLP modules add the residual themselves; DBRX's
                    // attention module holds the norms and the residual; post-norm OPT adds the
                    // residual before a norm; Gemma 2 / 3 and OLMo 2 normalize the attention and MLP
                    // outputs (post-norms) before adding them to the residual.
                    assert!(
                        arch.starts_with("bloom")
                            || arch.starts_with("dbrx")
                            || arch == "opt_post_ln"
                            || arch.starts_with("gemma2")
                            || arch.starts_with("gemma3")
                            || arch.starts_with("olmo2"),
                        "{arch}: {e}"
                    );
                }
            }
        }
    }
    assert!(held >= 25, "the identity held on only {held} fixtures");
}

#[test]
fn head_outputs_path_finds_each_output_projection() {
    for (arch, tail) in [
        ("llama", "o_proj.input"),
        ("gpt2", "c_proj.input"),
        ("bloom", "dense.input"),
        ("gptj", "out_proj.input"),
    ] {
        let model = common::load(arch);
        let p = patching::head_outputs_path(&model, 0).unwrap();
        assert!(p.ends_with(tail), "{arch}: {p}");
    }
}

#[test]
fn patchscope_lens_writes_the_source_state_into_the_target() {
    let model = common::load("llama");
    let target = patchscope::TargetPrompt::default();
    assert_eq!(target.prompt, "king king\n1135 1135\nhello hello\n?");
    let sources = ["The quick brown fox", "Free software"];
    let probs = patchscope::patchscope_lens(&model, &sources, &target, None, -1).unwrap();
    assert_eq!(probs.dims(), [2, model.num_layers(), model.vocab_size()]);
    // By hand for source 1 (the shorter, left-padded one), layer 1: its own last hidden state.
    let alone = model
        .trace(Input::prompts(&["Free software"]))
        .save("layers_output.1")
        .unwrap()
        .run()
        .unwrap();
    let h = alone.get("layers_output.1").unwrap();
    let t = h.dim(1).unwrap();
    let src = h.get(0).unwrap().get(t - 1).unwrap();
    let (ids, _) = model.tokenize(&[target.prompt.as_str()]).unwrap();
    let tt = ids.dim(1).unwrap();
    let out = model
        .trace(Input::ids(ids))
        .edit("layers_output.1", move |x| {
            let keep = x.narrow(1, 0, tt - 1)?;
            Tensor::cat(&[keep, src.reshape((1, 1, ()))?], 1)
        })
        .unwrap()
        .run()
        .unwrap();
    let expect = out.next_token_probs().unwrap().get(0).unwrap();
    let d = common::max_diff(&probs.get(1).unwrap().get(1).unwrap(), &expect);
    assert!(d <= 1e-5, "patchscope lens differs by {d}");
    let texts = patchscope::patchscope_generate(&model, &sources, &target, 1, -1, 4).unwrap();
    assert_eq!(texts.len(), 2);
    assert!(patchscope::patchscope_lens(&model, &sources, &target, Some(&[9]), -1).is_err());
}

#[test]
fn target_token_probabilities_over_prompts() {
    let model = common::load("llama");
    let p = prompts::Prompt::from_words(
        &model,
        "The quick brown fox jumps over the lazy",
        &[("animal", &["dog", "cat"]), ("thing", &["box"])],
    )
    .unwrap();
    let mut want = Vec::new();
    for w in ["dog", " dog", "cat", " cat"] {
        let id = nnscope::experiments::first_token(&model, w).unwrap();
        if !want.contains(&id) {
            want.push(id);
        }
    }
    assert_eq!(p.targets[0].1, want);
    let last = prompts::run_prompts(&model, std::slice::from_ref(&p), false).unwrap();
    let per_layer = prompts::run_prompts(&model, &[p.clone(), p], true).unwrap();
    let probs = model
        .trace(Input::prompts(&["The quick brown fox jumps over the lazy"]))
        .run()
        .unwrap()
        .next_token_probs()
        .unwrap();
    let v = probs.get(0).unwrap().to_vec1::<f32>().unwrap();
    let expect: f32 = want.iter().map(|&i| v[i as usize]).sum();
    let got = last[0].1.to_vec1::<f32>().unwrap()[0];
    assert!((got - expect).abs() <= 1e-6, "{got} vs {expect}");
    assert_eq!(per_layer[0].1.dims(), [2, model.num_layers()]);
    // The last layer's lens is the model's own distribution.
    let l = per_layer[0].1.get(0).unwrap().to_vec1::<f32>().unwrap();
    assert!((l[model.num_layers() - 1] - expect).abs() <= 1e-5);
}

#[allow(dead_code)]
fn unused(_: &Model) {}
