//! The standardized view, `check` and `find-attn-probs`, on every fixture in tests/fixtures.
mod common;

use candle_core::{DType, Device, Tensor};
use nnscope::models::{architecture, ProbShape};
use nnscope::{Error, Input, LoadOptions, Model};

/// Every fixture folder (architectures and their config variants).
fn fixtures() -> Vec<String> {
    let dir = common::fixture("");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path().join("config.json").is_file() && e.path().join("golden.safetensors").is_file()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    assert!(v.len() >= 2, "fixtures missing in {}", dir.display());
    v
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

fn ids(model: &Model) -> Tensor {
    common::golden_path_ids(model)
}

#[test]
fn accessors_read_and_write_on_every_fixture() {
    for name in fixtures() {
        let model = common::load(&name);
        let ids = ids(&model);
        let (b, t) = ids.dims2().unwrap();
        let hidden = model.hidden_size().unwrap();
        let n = model.num_layers();
        assert!(
            n >= 1 && model.num_heads().unwrap() >= 1 && model.vocab_size() > 0,
            "{name}"
        );
        let values = [
            "token_embeddings",
            "layers_input.0",
            "layers_output.0",
            "attentions_output.0",
            "mlps_input.0",
            "mlps_output.0",
            "ln_final.output",
            "embed_tokens.output",
            "lm_head.output",
        ];
        // Post-norm OPT has no final norm; OPT has no MLP module (`mlps.0` is checked below).
        let has_ln_final = model.names().ln_final.is_some();
        let values: Vec<&str> = values
            .into_iter()
            .filter(|v| has_ln_final || !v.starts_with("ln_final"))
            .collect();
        let mut tr = model.trace(Input::ids(ids.clone()));
        for v in &values {
            tr = tr.save(v).unwrap();
        }
        tr = tr
            .save("logits")
            .unwrap()
            .save(&format!("layers_output.{}", n - 1))
            .unwrap();
        let out = tr.run().unwrap();
        for v in values
            .iter()
            .filter(|v| !v.starts_with("embed_tokens") && !v.starts_with("lm_head"))
        {
            let dims = out.get(v).unwrap().dims().to_vec();
            if *v == "token_embeddings" {
                // OPT's embeddings may be narrower than the hidden size (`word_embed_proj_dim`).
                assert_eq!(dims[..2], [b, t], "{name}: {v}");
            } else {
                assert_eq!(dims, [b, t, hidden], "{name}: {v}");
            }
        }
        let logits = out.logits.clone().unwrap();
        assert_eq!(logits.dims(), [b, t, model.vocab_size()], "{name}");
        assert_eq!(
            max_diff(out.get("logits").unwrap(), &logits),
            0.0,
            "{name}: logits accessor"
        );
        // next_token_probs: a distribution over the vocabulary.
        let p = out.next_token_probs().unwrap();
        let s = p.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            s.iter().all(|x| (x - 1.0).abs() < 1e-4),
            "{name}: next_token_probs sums {s:?}"
        );
        // project_on_vocab of the last layer's output is the logits.
        let last = out.get(&format!("layers_output.{}", n - 1)).unwrap();
        let proj = model.project_on_vocab(last).unwrap();
        let tol = 1e-4
            * logits
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
        assert!(max_diff(&proj, &logits) <= tol, "{name}: project_on_vocab");

        // Writing: zeroing the MLP output of layer 0 changes the logits; a write of the same value
        // does not.
        let zeroed = model
            .trace(Input::ids(ids.clone()))
            .edit("mlps_output.0", |x| x.zeros_like())
            .unwrap()
            .run()
            .unwrap();
        assert!(
            max_diff(zeroed.logits.as_ref().unwrap(), &logits) > 1e-5,
            "{name}: mlps_output write"
        );
        let same = model
            .trace(Input::ids(ids.clone()))
            .edit("attentions_output.0", |x| Ok(x.clone()))
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(
            max_diff(same.logits.as_ref().unwrap(), &logits),
            0.0,
            "{name}: identity write"
        );

        // Module accessors are not values.
        let has_mlp = model.names().mlp.is_some();
        for m in [
            "layers.0",
            "attentions.0",
            "mlps.0",
            "embed_tokens",
            "ln_final",
            "lm_head",
        ] {
            if (m == "mlps.0" && !has_mlp) || (m == "ln_final" && !has_ln_final) {
                // Not a module here: resolving it is a clear error instead.
                let Err(e) = model.resolve(m) else {
                    panic!("{name}: {m} resolved")
                };
                assert!(e.to_string().contains("has no"), "{name}: {m}: {e}");
                continue;
            }
            let e = model
                .trace(Input::ids(ids.clone()))
                .set(m, logits.clone())
                .err()
                .expect("module write must fail");
            assert!(e.to_string().contains("is a module"), "{name}: {m}: {e}");
        }
    }
}

#[test]
fn steering_changes_only_the_steered_positions_and_layers() {
    for name in fixtures() {
        let model = common::load(&name);
        let ids = ids(&model);
        let (_, t) = ids.dims2().unwrap();
        let hidden = model.hidden_size().unwrap();
        // Not a constant vector: LayerNorm removes a constant shift entirely.
        let v = Tensor::arange(0f32, hidden as f32, &Device::Cpu)
            .unwrap()
            .affine(2.0 / hidden as f64, -1.0)
            .unwrap();
        let base = model
            .trace(Input::ids(ids.clone()))
            .save("layers_output.0")
            .unwrap()
            .run()
            .unwrap();
        let pos = t - 2;
        let steered = model
            .trace(Input::ids(ids.clone()))
            .steer(&[0], &v, 3.0, Some(&[pos]))
            .unwrap()
            .save("layers_output.0")
            .unwrap()
            .run()
            .unwrap();
        let a = base.get("layers_output.0").unwrap();
        let b = steered.get("layers_output.0").unwrap();
        let d = (b - a).unwrap();
        // Exactly +3 at the steered position, 0 elsewhere.
        let at = d.narrow(1, pos, 1).unwrap();
        let expect = (v.reshape((1, 1, hidden)).unwrap() * 3.0).unwrap();
        assert!(max_diff(&at, &expect) < 1e-5, "{name}: steered position");
        let before = d.narrow(1, 0, pos).unwrap();
        assert_eq!(
            before
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0,
            "{name}: earlier positions"
        );
        // Causality: later layers differ only from the steered position on.
        let logits_a = base.logits.as_ref().unwrap().narrow(1, 0, pos).unwrap();
        let logits_b = steered.logits.as_ref().unwrap().narrow(1, 0, pos).unwrap();
        assert!(
            max_diff(&logits_a, &logits_b) < 1e-5,
            "{name}: logits before the steered position"
        );
        assert!(
            max_diff(
                base.logits.as_ref().unwrap(),
                steered.logits.as_ref().unwrap()
            ) > 1e-5,
            "{name}: steering has an effect"
        );
        // A wrong-sized vector is a clear error.
        let bad = Tensor::ones(hidden + 1, DType::F32, &Device::Cpu).unwrap();
        let e = model
            .trace(Input::ids(ids.clone()))
            .steer(&[0], &bad, 1.0, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("steering vector"), "{e}");
    }
}

#[test]
fn skipping_a_layer_makes_it_the_identity() {
    for name in fixtures() {
        let model = common::load(&name);
        let ids = ids(&model);
        let plain = model.trace(Input::ids(ids.clone())).run().unwrap();
        let out = model
            .trace(Input::ids(ids.clone()))
            .skip_layer(0)
            .unwrap()
            .save("layers_input.0")
            .unwrap()
            .save("layers_output.0")
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(
            max_diff(
                out.get("layers_input.0").unwrap(),
                out.get("layers_output.0").unwrap()
            ),
            0.0,
            "{name}"
        );
        assert!(
            max_diff(plain.logits.as_ref().unwrap(), out.logits.as_ref().unwrap()) > 1e-5,
            "{name}: skipping changes the output"
        );
    }
}

#[test]
fn check_passes_on_every_fixture() {
    for name in fixtures() {
        let model = common::load(&name);
        let r = nnscope::discover::check(&model);
        assert!(r.passed, "{name}: {:?}", r);
        let json = serde_json::to_value(&r).unwrap();
        for k in [
            "loads",
            "source",
            "resolves",
            "shape",
            "sums",
            "changes_output",
            "registered",
        ] {
            assert_eq!(json["checks"][k], true, "{name}: {k}");
        }
    }
}

#[test]
fn discovery_finds_the_seed_table_path_on_every_fixture() {
    for name in fixtures() {
        let model = common::load(&name);
        let row = architecture(model.arch.model_type).unwrap();
        let d = nnscope::discover::find_attention_probabilities(&model).unwrap();
        // Discovery never reads the registry; it must land on what the registry gives for this
        // model's configuration...
        let registered = model.attention_probabilities_path().unwrap();
        assert_eq!(
            d.hookpoint, registered,
            "{name}: candidates {:?}",
            d.candidates
        );
        assert_eq!(
            d.prob_shape,
            model.attention_probabilities_shape(),
            "{name}"
        );
        // ...which, for each architecture's base fixture, is the seed's table path as written.
        if name == row.model_type {
            assert_eq!(
                d.hookpoint, row.attention_probabilities,
                "{name}: the seed's table"
            );
            assert_eq!(d.prob_shape, row.prob_shape, "{name}");
        }
        assert!(d.changes_output, "{name}");
        assert!(
            d.listing.contains(">> "),
            "{name}: listing marks the hookpoint"
        );
    }
}

#[test]
fn discovery_recovers_a_removed_registry_row() {
    for name in fixtures() {
        let mut model = common::load(&name);
        let registered = model.attention_probabilities_path().unwrap().to_string();
        model.clear_attention_probabilities();
        let e = model.resolve("attention_probabilities.0").unwrap_err();
        assert!(e.to_string().contains("find-attn-probs"), "{name}: {e}");
        let d = nnscope::discover::find_attention_probabilities(&model).unwrap();
        assert_eq!(d.hookpoint, registered, "{name}");
        model
            .set_attention_probabilities(&d.hookpoint, d.prob_shape)
            .unwrap();
        // And the recovered hookpoint gives the golden probabilities.
        let g = common::golden(&name);
        let ids = g.t["single.input_ids"].clone();
        let out = model
            .trace(Input::ids(ids))
            .save("attention_probabilities.0")
            .unwrap()
            .run()
            .unwrap();
        let mut p = out.get("attention_probabilities.0").unwrap().clone();
        let reference = &g.t["single.attention_probabilities.0"];
        if d.prob_shape == ProbShape::SinkColumn {
            p = p.narrow(3, 0, reference.dim(3).unwrap()).unwrap();
        }
        assert!(max_diff(&p, reference) <= 1e-5, "{name}");
    }
}

#[test]
fn standard_name_errors_are_clear() {
    let model = common::load("llama");
    let ids = ids(&model);
    let e = model.resolve("layers_output.7").unwrap_err();
    assert!(e.to_string().contains("past the last layer"), "{e}");
    let e = model.resolve("layer_output.0").unwrap_err();
    assert!(
        e.to_string().contains("layers_output"),
        "suggests the nearest name: {e}"
    );
    let e = model
        .resolve("attentions.0.source.attention_interface_0.source.nn_functional_dropout_0")
        .unwrap_err();
    assert!(
        e.to_string().contains(".output"),
        "the seed's 'forgetting .output' pitfall: {e}"
    );
    let e = model
        .resolve("attentions.0.source.attention_interfce_0.output")
        .unwrap_err();
    assert!(e.to_string().contains("attention_interface_0"), "{e}");
    let e = model.resolve("layers_output").unwrap_err();
    assert!(e.to_string().contains("layer index"), "{e}");
    // The seed's table path for LLaMA resolves as written.
    model
        .resolve("attentions.0.source.attention_interface_0.source.nn_functional_dropout_0.output")
        .unwrap();
    let _ = ids;
    // A wrong-shaped write names the hookpoint and both shapes.
    let bad = Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let e = model
        .trace(Input::ids(common::golden_path_ids(&model)))
        .set("attention_probabilities.0", bad)
        .unwrap()
        .run()
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("attention_probabilities.0")
            && e.to_string().contains("[1, 1, 1, 1]"),
        "{e}"
    );
}

#[test]
fn renaming_overrides_are_checked() {
    let path = common::fixture("llama");
    let mut opts = LoadOptions::default();
    opts.rename.mlp = Some("input_layernorm".into());
    let e = Model::load(path.to_str().unwrap(), &opts);
    // input_layernorm exists and has [B, T, hidden] in and out, so this renaming is accepted...
    assert!(e.is_ok());
    opts.rename.mlp = Some("no_such_module".into());
    let e = Model::load(path.to_str().unwrap(), &opts).unwrap_err();
    assert!(e.to_string().contains("RenameConfig::mlp"), "{e}");
}

#[test]
fn negative_layer_indices_count_from_the_end() {
    let model = common::load("llama");
    let n = model.num_layers();
    for name in [
        "layers",
        "attentions",
        "mlps",
        "layers_input",
        "layers_output",
        "attentions_output",
        "mlps_input",
        "attention_probabilities",
    ] {
        let expand = |i: &str| nnscope::standard::expand(&model, &format!("{name}.{i}")).unwrap();
        assert_eq!(expand("-1"), expand(&(n - 1).to_string()), "{name}");
        assert_eq!(expand(&format!("-{n}")), expand("0"), "{name}");
    }
    let e = model
        .resolve(&format!("layers_output.-{}", n + 1))
        .unwrap_err();
    assert!(e.to_string().contains("before the first layer"), "{e}");
    // Saved under the name as given; the value is transformers' last hidden layer output.
    let g = common::golden("llama");
    let out = model
        .trace(Input::ids(g.t["single.input_ids"].clone()))
        .save("layers_output.-1")
        .unwrap()
        .run()
        .unwrap();
    common::assert_hidden(
        "layers_output.-1",
        out.get("layers_output.-1").unwrap(),
        &g.t[&format!("single.layers_output.{}", n - 1)],
        &g.t["single.attention_mask"],
    );
}
