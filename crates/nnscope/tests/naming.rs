//! The hookpoint naming rule and the source listing.
mod common;

use candle_core::{Result, Tensor};
use nnscope::nn;
use nnscope::trace::{hooked, listing};
use nnscope::Input;

#[hooked]
fn helper(x: &Tensor) -> Result<Tensor> {
    x.sqr()
}

#[hooked]
fn sample(x: &Tensor) -> Result<Tensor> {
    let y = x.reshape((2, 2))?.transpose(0, 1)?;
    let z = y.reshape(4)?;
    let w = nn::functional::dropout(&z, 0.1)?;
    if z.dims().len() > 5 {
        return nn::functional::dropout(&w, 0.2);
    }
    let v = helper(&w.exp()?)?;
    let pair = Ok::<_, candle_core::Error>((v.clone(), v.clone()))?;
    let out = pair.0.broadcast_add(&pair.1)?;
    Ok(out)
}

#[test]
fn labels_follow_nnsights_rule() {
    let info = sample_source();
    assert_eq!(
        info.labels,
        &[
            // Receiver before the call; a chained call is named by its method alone.
            "x_reshape_0",
            "transpose_0",
            "y_reshape_0",
            // Paths joined with `_`.
            "nn_functional_dropout_0",
            // Non-tensor calls are hookpoints too (read-only).
            "z_dims_0",
            "len_0",
            // A branch not taken still consumes a number.
            "nn_functional_dropout_1",
            // Arguments before the call itself.
            "w_exp_0",
            "helper_0",
            // `Ok(..)` is a constructor, not a hookpoint; `v.clone()` twice: numbered.
            "v_clone_0",
            "v_clone_1",
            "pair_0_broadcast_add_0",
        ]
    );
    assert_eq!(helper_source().labels, &["x_sqr_0"]);
    // Running it untraced is plain computation.
    let x = Tensor::new(&[1f32, 2., 3., 4.], &candle_core::Device::Cpu).unwrap();
    let out = sample(&x).unwrap();
    assert_eq!(out.dims(), [4]);
}

#[test]
fn listing_has_nnsights_layout() {
    let info = sample_source();
    let text = listing(info, Some("helper_0"));
    let lines: Vec<&str> = text.lines().collect();
    let mut distinct = info.site_lines.to_vec();
    distinct.dedup();
    let continuations = info.site_lines.len() - distinct.len();
    assert_eq!(
        lines.len(),
        info.lines.len() + continuations,
        "one line per source line, plus one per further hookpoint of a line"
    );
    // The first hookpoint of a line is at its left with the line number (0-based from `fn`).
    let first = lines.iter().find(|l| l.contains("x_reshape_0")).unwrap();
    assert!(
        first.contains("x_reshape_0") && first.contains("->") && first.contains(" 1 "),
        "{first}"
    );
    assert!(
        first.contains("let y = x.reshape((2, 2))?.transpose(0, 1)?;"),
        "real source text: {first}"
    );
    // Further hookpoints of that line follow as `name ->  + ...`.
    let cont = lines.iter().find(|l| l.contains("transpose_0")).unwrap();
    assert!(cont.contains("+ ...") && !cont.contains("let"), "{cont}");
    // The marked label.
    assert!(lines
        .iter()
        .any(|l| l.starts_with(">> ") && !l.contains("w_exp_0") && l.contains("helper_0")));
    assert!(lines[0].contains("fn sample("), "{}", lines[0]);
}

#[test]
fn nested_sources_resolve_and_fire() {
    let model = common::load("llama");
    let ids = common::golden("llama").t["single.input_ids"].clone();
    // Two levels of nesting: attention -> apply_rotary_pos_emb -> rotate_half.
    let p =
        "attentions.0.source.apply_rotary_pos_emb_0.source.rotate_half_0.source.x_narrow_0.output";
    let out = model
        .trace(Input::ids(ids.clone()))
        .save(p)
        .unwrap()
        .run()
        .unwrap();
    let t = out.get(p).unwrap();
    assert_eq!(t.dims()[3], 8, "half of head_dim 16");
    // rotate_half is called twice (q and k): the two call sites are separate scopes.
    let q = "attentions.0.source.apply_rotary_pos_emb_0.source.rotate_half_0.output";
    let k = "attentions.0.source.apply_rotary_pos_emb_0.source.rotate_half_1.output";
    let out = model
        .trace(Input::ids(ids.clone()))
        .save(q)
        .unwrap()
        .save(k)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(out.get(q).unwrap().dims()[1], 4, "query heads");
    assert_eq!(out.get(k).unwrap().dims()[1], 2, "key/value heads");
    // A label that is not a call into an instrumented function has no `.source`.
    let e = model.resolve("attentions.0.source.self_q_proj_0.source.x_0.output");
    assert!(e.is_err());
    let e = model
        .resolve("attentions.0.source.transpose_0.source.x.output")
        .unwrap_err();
    assert!(e.to_string().contains("no `.source`"), "{e}");
    // `.output` of a call that returns no tensor.
    let e = model
        .resolve("attentions.0.source.hidden_states_dims3_0.output")
        .unwrap_err();
    assert!(e.to_string().contains("no tensor"), "{e}");
    // A tuple-valued hookpoint needs an element.
    let e = model
        .resolve("attentions.0.source.attention_interface_0.output")
        .unwrap_err();
    assert!(e.to_string().contains("tuple"), "{e}");
    let both = "attentions.0.source.attention_interface_0.output.1";
    let probs = "attention_probabilities.0";
    let out = model
        .trace(Input::ids(ids))
        .save(both)
        .unwrap()
        .save(probs)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        out.get(both).unwrap().to_vec3::<f32>().ok(),
        None::<Vec<Vec<Vec<f32>>>>,
        "4-D"
    );
    let d = (out.get(both).unwrap() - out.get(probs).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        d, 0.0,
        "the interface returns the dropout's output as its second element"
    );
}

#[test]
fn edits_take_effect_downstream_and_stop_early() {
    let model = common::load("gpt2");
    let ids = common::golden("gpt2").t["single.input_ids"].clone();
    // Editing the MLP's activation inside the MLP's source changes that MLP's output.
    let act = "mlps.0.source.self_act_0.output";
    let base = model
        .trace(Input::ids(ids.clone()))
        .save("mlps_output.0")
        .unwrap()
        .run()
        .unwrap();
    let edited = model
        .trace(Input::ids(ids.clone()))
        .edit(act, |x| x.zeros_like())
        .unwrap()
        .save("mlps_output.0")
        .unwrap()
        .run()
        .unwrap();
    let a = base.get("mlps_output.0").unwrap();
    let b = edited.get("mlps_output.0").unwrap();
    // With a zero activation the MLP output is just c_proj's bias.
    let bias_only = b.narrow(1, 0, 1).unwrap();
    let bias_only2 = b.narrow(1, 1, 1).unwrap();
    let d = (&bias_only - &bias_only2)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0, "every position gets the same bias");
    assert!(
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
            > 1e-4
    );
    // Stopping after layer 0 returns what was saved and no logits.
    let out = model
        .trace(Input::ids(ids))
        .save("layers_output.0")
        .unwrap()
        .stop_after("layers_output.0")
        .unwrap()
        .run()
        .unwrap();
    assert!(out.logits.is_none());
    assert_eq!(out.get("layers_output.0").unwrap().dims()[0], 1);
}
