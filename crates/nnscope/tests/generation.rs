//! The key/value cache and generation: a prefix forward followed by single-token cached steps equals
//! one forward over the whole sequence on every fixture; sampling is seeded; a left-padded batch
//! generates what each prompt generates alone; bad options are clear errors.
mod common;

use candle_core::{DType, Device, Tensor};
use nnscope::nn::KvCache;
use nnscope::{GenerateOptions, Input, Model};

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
    v
}

/// The relative difference of the logits, as the fixtures' tolerance measures it.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_diff(a, b) / common::max_abs(b).max(1.0)
}

/// Logits of a batch run whole, and run as a prefix plus single-token cached steps.
fn whole_and_cached(model: &Model, ids: &Tensor, mask: &Tensor, prefix: usize) -> (Tensor, Tensor) {
    let whole = model
        .forward(&Input::Ids {
            input_ids: ids.clone(),
            attention_mask: Some(mask.clone()),
            position_ids: None,
        })
        .unwrap();
    let t = ids.dim(1).unwrap();
    let cache = KvCache::new();
    let mut parts = vec![model
        .forward_cached(
            &ids.narrow(1, 0, prefix).unwrap(),
            Some(&mask.narrow(1, 0, prefix).unwrap()),
            &cache,
        )
        .unwrap()];
    for i in prefix..t {
        parts.push(
            model
                .forward_cached(
                    &ids.narrow(1, i, 1).unwrap(),
                    Some(&mask.narrow(1, 0, i + 1).unwrap()),
                    &cache,
                )
                .unwrap(),
        );
    }
    assert_eq!(cache.seq_len(), t);
    (whole, Tensor::cat(&parts, 1).unwrap())
}

#[test]
fn cached_equals_whole_on_every_fixture() {
    let mut checked = 0;
    for name in fixtures() {
        let model = common::load(&name);
        let g = common::golden(&name);
        // The left-padded batch: padding, positions from the mask, and every layer type.
        let ids = g.t["batch.input_ids"].clone();
        let mask = g.t["batch.attention_mask"].clone();
        let t = ids.dim(1).unwrap();
        let (whole, cached) = whole_and_cached(&model, &ids, &mask, t - 5);
        let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let d = rel_diff(
            &whole.broadcast_mul(&keep).unwrap(),
            &cached.broadcast_mul(&keep).unwrap(),
        );
        assert!(d <= 1e-4, "{name}: cached logits differ by {d} (relative)");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} fixtures found");
}

#[test]
fn long_cached_decode_crosses_sliding_windows() {
    // gpt_oss slides with a window of 8: decoding 30 tokens one at a time crosses it many times.
    for name in ["gpt_oss", "mistral_sw", "qwen2_sw"] {
        let model = common::load(name);
        let g = common::golden(name);
        let ids = g.t["single.input_ids"].clone();
        let t = ids.dim(1).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let (whole, cached) = whole_and_cached(&model, &ids, &mask, 2);
        let d = rel_diff(&whole, &cached);
        assert!(d <= 1e-4, "{name}: cached logits differ by {d} (relative)");
    }
}

#[test]
fn a_left_padded_batch_generates_what_each_prompt_generates_alone() {
    for name in ["gpt2", "llama", "gpt_oss"] {
        let model = common::load(name);
        let g = common::golden(name);
        let batch = model
            .generate(Input::prompts(&g.batch))
            .max_new_tokens(6)
            .ignore_eos(true)
            .run()
            .unwrap();
        let rows = batch.new_tokens().unwrap();
        for (i, p) in g.batch.iter().enumerate() {
            let alone = model
                .generate(Input::prompts(&[p]))
                .max_new_tokens(6)
                .ignore_eos(true)
                .run()
                .unwrap();
            assert_eq!(
                alone.new_tokens().unwrap()[0],
                rows[i],
                "{name}: row {i} of the batch"
            );
            assert_eq!(alone.texts[0], batch.texts[i], "{name}: row {i} text");
        }
    }
}

#[test]
fn sampling_is_seeded() {
    let model = common::load("llama");
    let run = |seed: u64| {
        model
            .generate(Input::prompts(&["The quick brown fox"]))
            .max_new_tokens(12)
            .temperature(1.5)
            .top_k(50)
            .top_p(0.95)
            .seed(seed)
            .ignore_eos(true)
            .run()
            .unwrap()
            .new_tokens()
            .unwrap()
    };
    assert_eq!(run(7), run(7), "same seed, same tokens");
    let greedy = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(12)
        .ignore_eos(true)
        .run()
        .unwrap()
        .new_tokens()
        .unwrap();
    // A random tiny model is close to uniform: at temperature 1.5 some seed must leave greedy.
    assert!(
        (0..5).any(|s| run(s) != greedy),
        "sampling never differed from greedy decoding"
    );
}

#[test]
fn top_k_one_is_greedy() {
    let model = common::load("gpt2");
    let gen = |opts: GenerateOptions| {
        model
            .generate(Input::prompts(&["Free software"]))
            .options(opts)
            .run()
            .unwrap()
            .new_tokens()
            .unwrap()
    };
    let mut sampled = GenerateOptions::greedy(8);
    sampled.top_k = Some(1);
    sampled.temperature = Some(3.0);
    sampled.ignore_eos = true;
    let mut greedy = GenerateOptions::greedy(8);
    greedy.ignore_eos = true;
    assert_eq!(gen(sampled), gen(greedy));
}

#[test]
fn stops_at_end_of_sequence_and_pads_finished_rows() {
    // The rule, checked on the model's own greedy output: without `ignore_eos` each row is the
    // free-running row up to its first end-of-sequence id, then padding, and generation ends when
    // every row has finished.
    let model = common::load("llama");
    let g = common::golden("llama");
    let free = model
        .generate(Input::prompts(&g.batch))
        .max_new_tokens(24)
        .ignore_eos(true)
        .run()
        .unwrap();
    let stopping = model
        .generate(Input::prompts(&g.batch))
        .max_new_tokens(24)
        .run()
        .unwrap();
    let eos = nnscope::generate::eos_ids(&model);
    assert!(
        !eos.is_empty(),
        "the fixture declares an end-of-sequence id"
    );
    let pad = nnscope::generate::generation_pad_id(&model);
    let free_rows = free.new_tokens().unwrap();
    let stop_rows = stopping.new_tokens().unwrap();
    // Each row equals the free run up to and including its first eos, then pad.
    let first_eos = |r: &Vec<u32>| {
        r.iter()
            .position(|t| eos.contains(t))
            .map(|i| i + 1)
            .unwrap_or(r.len())
    };
    let n = stop_rows[0].len();
    let expected_n = free_rows.iter().map(first_eos).max().unwrap();
    assert_eq!(n, expected_n, "stops when every row has finished");
    for (f, s) in free_rows.iter().zip(&stop_rows) {
        let k = first_eos(f).min(n);
        assert_eq!(&s[..k], &f[..k]);
        assert!(s[k..].iter().all(|t| *t == pad), "finished rows are padded");
    }
}

#[test]
fn bad_generation_options_are_clear_errors() {
    let model = common::load("gpt2");
    let e = model
        .generate(Input::prompts(&["Hi"]))
        .max_new_tokens(0)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_new_tokens"), "{e}");
    let e = model
        .generate(Input::prompts(&["Hi"]))
        .top_p(0.0)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_p"), "{e}");
    let e = model
        .generate(Input::prompts(&["Hi"]))
        .temperature(-1.0)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("temperature"), "{e}");
    // Past GPT-2's learned positions.
    let n = model.max_positions().unwrap();
    let e = model
        .generate(Input::prompts(&["Hi"]))
        .max_new_tokens(n + 1)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("positions"), "{e}");
}

/// A decode step's attention probabilities are [B, H, 1, past + 1] (GPT-OSS: + 1 sink column) and
/// equal the matching row of one forward over the whole sequence, on every fixture and layer.
#[test]
fn cached_probabilities_equal_whole_on_every_fixture() {
    use nnscope::models::ProbShape;
    for name in fixtures() {
        let model = common::load(&name);
        let g = common::golden(&name);
        let prompts = g.batch.clone();
        let n_new = 4;
        let mut gen = model
            .generate(Input::prompts(&prompts))
            .max_new_tokens(n_new)
            .ignore_eos(true);
        for l in 0..model.num_layers() {
            gen = gen.save(&format!("attention_probabilities.{l}")).unwrap();
        }
        let out = gen.run().unwrap();
        // The sequence the forwards saw: the prompt and every new token but the last.
        let t = out.prompt_len;
        let seen = out.output_ids.narrow(1, 0, t + n_new - 1).unwrap();
        let b = seen.dim(0).unwrap();
        let mask = Tensor::cat(
            &[
                &model.tokenize(&prompts).unwrap().1.unwrap(),
                &Tensor::ones((b, n_new - 1), DType::U32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let mut tr = model.trace(Input::Ids {
            input_ids: seen,
            attention_mask: Some(mask.clone()),
            position_ids: None,
        });
        for l in 0..model.num_layers() {
            tr = tr.save(&format!("attention_probabilities.{l}")).unwrap();
        }
        let whole = tr.run().unwrap();
        let sink = model.attention_probabilities_shape() == ProbShape::SinkColumn;
        for l in 0..model.num_layers() {
            let w = whole.get(&format!("attention_probabilities.{l}")).unwrap();
            for s in 1..n_new {
                let p = out
                    .get(&format!("attention_probabilities.{l}@{s}"))
                    .unwrap();
                let keys = t + s;
                let (pb, _h, q, k) = p.dims4().unwrap();
                assert_eq!(
                    (pb, q, k),
                    (b, 1, keys + usize::from(sink)),
                    "{name} l{l} s{s}"
                );
                let row = w.narrow(2, keys - 1, 1).unwrap();
                let (ours, theirs) = if sink {
                    let kw = row.dim(3).unwrap();
                    (
                        Tensor::cat(
                            &[
                                &p.narrow(3, 0, keys).unwrap(),
                                &p.narrow(3, keys, 1).unwrap(),
                            ],
                            3,
                        )
                        .unwrap(),
                        Tensor::cat(
                            &[
                                &row.narrow(3, 0, keys).unwrap(),
                                &row.narrow(3, kw - 1, 1).unwrap(),
                            ],
                            3,
                        )
                        .unwrap(),
                    )
                } else {
                    (p.clone(), row.narrow(3, 0, keys).unwrap())
                };
                let d = common::max_diff(&ours, &theirs);
                assert!(
                    d <= 1e-5,
                    "{name} layer {l} step {s}: probabilities differ by {d}"
                );
            }
        }
    }
}

#[test]
fn saves_are_named_by_step_and_limited_by_steps() {
    let model = common::load("llama");
    let out = model
        .generate(Input::prompts(&["The quick brown fox", "Hi"]))
        .max_new_tokens(4)
        .ignore_eos(true)
        .save("logits")
        .unwrap()
        .save("layers_output.1")
        .unwrap()
        .steps(1, 3)
        .unwrap()
        .run()
        .unwrap();
    let t = out.prompt_len;
    let scores = out.scores.as_ref().unwrap();
    for s in 0..4 {
        let l = out.get(&format!("logits@{s}")).unwrap();
        let expect_t = if s == 0 { t } else { 1 };
        assert_eq!(l.dims(), &[2, expect_t, model.vocab_size()]);
        // The last position of step S's logits is what token S + 1 was picked from.
        let last = l.narrow(1, expect_t - 1, 1).unwrap().squeeze(1).unwrap();
        assert_eq!(common::max_diff(&last, &scores.get(s).unwrap()), 0.0);
    }
    let names: Vec<&str> = out
        .saved
        .iter()
        .filter(|(n, _)| n.starts_with("layers_output"))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["layers_output.1@1", "layers_output.1@2"]);
}

#[test]
fn steering_while_generating() {
    let model = common::load("llama");
    let hidden = model.hidden_size().unwrap();
    let plain = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(8)
        .ignore_eos(true)
        .run()
        .unwrap();
    let v = Tensor::ones(hidden, DType::F32, &Device::Cpu).unwrap();
    let steered = |factor: f64| {
        model
            .generate(Input::prompts(&["The quick brown fox"]))
            .max_new_tokens(8)
            .ignore_eos(true)
            .steer(&[0, 1], &v, factor, None)
            .unwrap()
            .run()
            .unwrap()
    };
    assert_eq!(
        steered(0.0).new_tokens().unwrap(),
        plain.new_tokens().unwrap(),
        "factor 0 changes nothing"
    );
    assert_ne!(
        steered(40.0).new_tokens().unwrap(),
        plain.new_tokens().unwrap(),
        "a large factor changes the tokens"
    );
    // Limited to the generated tokens (steps 1..): the first new token is unchanged.
    let late = model
        .generate(Input::prompts(&["The quick brown fox"]))
        .max_new_tokens(8)
        .ignore_eos(true)
        .steer(&[0, 1], &v, 40.0, None)
        .unwrap()
        .steps_from(1)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        late.new_tokens().unwrap()[0][0],
        plain.new_tokens().unwrap()[0][0]
    );
}

#[test]
fn stop_and_skip_while_generating() {
    let model = common::load("gpt2");
    let out = model
        .generate(Input::prompts(&["Free software"]))
        .max_new_tokens(5)
        .ignore_eos(true)
        .save("layers_output.0")
        .unwrap()
        .stop_after("layers_output.0")
        .unwrap()
        .steps(2, 3)
        .unwrap()
        .run()
        .unwrap();
    assert!(out.stopped);
    // Steps 0 and 1 ran whole (2 new tokens), step 2 stopped after layer 0.
    assert_eq!(out.new_tokens().unwrap()[0].len(), 2);
    assert!(out.get("layers_output.0@2").is_ok());
    let skipped = model
        .generate(Input::prompts(&["Free software"]))
        .max_new_tokens(5)
        .ignore_eos(true)
        .skip_layer(1)
        .unwrap()
        .save("logits")
        .unwrap()
        .run()
        .unwrap();
    let plain = model
        .generate(Input::prompts(&["Free software"]))
        .max_new_tokens(5)
        .ignore_eos(true)
        .save("logits")
        .unwrap()
        .run()
        .unwrap();
    assert!(
        common::max_diff(
            skipped.get("logits@0").unwrap(),
            plain.get("logits@0").unwrap()
        ) > 1e-3
    );
}

/// With no request near the output head, generation multiplies only the last position through it
/// (transformers' `logits_to_keep=1`); saving `logits` makes it compute every position. Both must pick
/// the same tokens from the same scores, on heads of several kinds (tied GPT-2, untied LLaMA).
#[test]
fn last_position_logits_equal_all_position_logits() {
    for name in ["gpt2", "llama", "gpt_neox"] {
        let model = common::load(name);
        let g = common::golden(name);
        let run = |save_logits: bool| {
            let mut gen = model
                .generate(Input::prompts(&g.batch))
                .max_new_tokens(4)
                .ignore_eos(true);
            if save_logits {
                gen = gen.save("logits").unwrap();
            }
            gen.run().unwrap()
        };
        let (last, all) = (run(false), run(true));
        assert_eq!(
            last.new_tokens().unwrap(),
            all.new_tokens().unwrap(),
            "{name}"
        );
        let (a, b) = (last.scores.clone().unwrap(), all.scores.clone().unwrap());
        let tol = 1e-5 * common::max_abs(&b).max(1.0);
        let d = common::max_diff(&a, &b);
        assert!(d <= tol, "{name}: scores differ by {d} > {tol}");
        // The saved step-0 logits cover the whole prompt; the last position is what was picked from.
        assert_eq!(all.get("logits@0").unwrap().dim(1).unwrap(), all.prompt_len);
    }
}
