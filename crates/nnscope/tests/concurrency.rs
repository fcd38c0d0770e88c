//! One loaded model shared by 8 threads, each tracing its own prompts with its own saves and edits:
//! results are bit-identical to running the same traces one after another, hooks of one trace never
//! leak into another, and the same input gives bit-identical outputs run after run (issue 6).

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model, TraceOutput};
use std::path::PathBuf;

fn load(arch: &str) -> Model {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch);
    Model::load(p.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn model_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<TraceOutput>();
}

/// Everything a trace produced, as exact bit patterns.
type Bits = Vec<(String, Vec<u32>)>;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn collect(out: TraceOutput) -> Bits {
    let mut v: Bits = out
        .saved
        .iter()
        .flat_map(|(n, ts)| ts.iter().map(move |t| (n.clone(), bits(t))))
        .collect();
    if let Some(l) = &out.logits {
        v.push(("logits".into(), bits(l)));
    }
    v
}

/// Job `i`: its own model, prompts, saves and edits.
fn job(i: usize, llama: &Model, gpt2: &Model) -> Bits {
    let out = match i {
        0 => llama
            .trace(Input::prompts(&["The quick brown fox"]))
            .save("layers_output.0")
            .unwrap()
            .save("attention_probabilities.1")
            .unwrap()
            .run(),
        1 => llama
            .trace(Input::prompts(&[
                "Hello",
                "A longer prompt, left-padded against the first",
            ]))
            .edit("mlps_output.1", |x| x.affine(0.5, 0.0))
            .unwrap()
            .save("logits")
            .unwrap()
            .run(),
        2 => gpt2
            .trace(Input::prompts(&["jumps over the lazy dog"]))
            .edit("layers_output.0", |x| x.zeros_like())
            .unwrap()
            .save("layers_output.1")
            .unwrap()
            .run(),
        3 => gpt2
            .trace(Input::prompts(&["one", "two three four"]))
            .edit("attentions_output.1", |x| x.affine(2.0, 0.0))
            .unwrap()
            .save("attention_probabilities.0")
            .unwrap()
            .run(),
        4 => llama
            .trace(Input::prompts(&["Determinism matters"]))
            .edit("layers_output.0", |x| x.affine(1.0, 1.0))
            .unwrap()
            .save("mlps_input.1")
            .unwrap()
            .run(),
        5 => llama
            .trace(Input::ids(
                Tensor::new(&[[5u32, 6, 7, 8], [9, 10, 11, 12]], &Device::Cpu).unwrap(),
            ))
            .save("layers_output.0")
            .unwrap()
            .stop_after("layers_output.0")
            .unwrap()
            .run(),
        6 => gpt2
            .trace(Input::prompts(&["plain forward"]))
            .save("token_embeddings")
            .unwrap()
            .run(),
        7 => llama
            .trace(Input::prompts(&["zero the attention output"]))
            .edit("attentions.1.source.attention_interface_0.output.0", |x| {
                x.zeros_like()
            })
            .unwrap()
            .save("attentions.1.source.attention_interface_0.output.1")
            .unwrap()
            .run(),
        _ => unreachable!(),
    };
    collect(out.unwrap())
}

#[test]
fn eight_threads_match_sequential() {
    let llama = load("llama");
    let gpt2 = load("gpt2");
    let sequential: Vec<Bits> = (0..8).map(|i| job(i, &llama, &gpt2)).collect();
    // Each job traced something different from the plain forward (the edits took effect).
    assert_ne!(sequential[1], sequential[0]);

    for _round in 0..3 {
        let parallel: Vec<Vec<Bits>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (llama, gpt2) = (&llama, &gpt2);
                    // Several runs per thread so that traces of different threads overlap.
                    s.spawn(move || (0..4).map(|_| job(i, llama, gpt2)).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, runs) in parallel.iter().enumerate() {
            for r in runs {
                assert!(
                    r == &sequential[i],
                    "job {i} differs between a threaded and a sequential run"
                );
            }
        }
    }
}

#[test]
fn hooks_never_leak_between_threads() {
    let model = std::sync::Arc::new(load("llama"));
    let prompt = ["The same prompt in both threads"];
    let plain = bits(&model.forward(&Input::prompts(&prompt)).unwrap());
    let edited = {
        let out = model
            .trace(Input::prompts(&prompt))
            .edit("layers_output.0", |x| x.zeros_like())
            .unwrap()
            .run()
            .unwrap();
        bits(out.logits.as_ref().unwrap())
    };
    assert_ne!(plain, edited);

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let with_edit = {
        let (m, b) = (model.clone(), barrier.clone());
        std::thread::spawn(move || {
            b.wait();
            (0..20)
                .map(|_| {
                    let out = m
                        .trace(Input::prompts(&prompt))
                        .edit("layers_output.0", |x| x.zeros_like())
                        .unwrap()
                        .run()
                        .unwrap();
                    bits(out.logits.as_ref().unwrap())
                })
                .collect::<Vec<_>>()
        })
    };
    let without_edit = {
        let (m, b) = (model.clone(), barrier.clone());
        std::thread::spawn(move || {
            b.wait();
            (0..20)
                .map(|i| {
                    // Alternate a plain forward and a trace with only a save: neither may see the edit.
                    if i % 2 == 0 {
                        bits(&m.forward(&Input::prompts(&prompt)).unwrap())
                    } else {
                        let out = m
                            .trace(Input::prompts(&prompt))
                            .save("layers_output.0")
                            .unwrap()
                            .run()
                            .unwrap();
                        bits(out.logits.as_ref().unwrap())
                    }
                })
                .collect::<Vec<_>>()
        })
    };
    for r in with_edit.join().unwrap() {
        assert!(r == edited, "the edited trace lost its edit");
    }
    for r in without_edit.join().unwrap() {
        assert!(r == plain, "an edit of another thread leaked into this one");
    }
}

#[test]
fn same_input_is_bit_identical_run_after_run() {
    let llama = load("llama");
    let gpt2 = load("gpt2");
    for model in [&llama, &gpt2] {
        let input = Input::prompts(&["Run after run", "the same numbers, bit for bit"]);
        let first = collect(
            model
                .trace(input.clone())
                .save("attention_probabilities.0")
                .unwrap()
                .save("layers_output.1")
                .unwrap()
                .run()
                .unwrap(),
        );
        for _ in 0..5 {
            let again = collect(
                model
                    .trace(input.clone())
                    .save("attention_probabilities.0")
                    .unwrap()
                    .save("layers_output.1")
                    .unwrap()
                    .run()
                    .unwrap(),
            );
            assert!(
                again == first,
                "{} output changed between runs",
                model.arch.model_type
            );
        }
    }
}

#[test]
fn failed_or_stopped_traces_leave_no_hooks_behind() {
    let model = load("llama");
    let input = || Input::prompts(&["After a failure"]);
    let plain = bits(&model.forward(&input()).unwrap());
    // An edit that fails, a replacement of the wrong shape, a stopped trace, and an edit that panics.
    assert!(model
        .trace(input())
        .edit("layers_output.0", |x| x.matmul(x))
        .unwrap()
        .run()
        .is_err());
    let wrong = Tensor::zeros((1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .trace(input())
        .set("mlps_output.1", wrong)
        .unwrap()
        .run()
        .is_err());
    let stopped = model
        .trace(input())
        .stop_after("layers_output.0")
        .unwrap()
        .run()
        .unwrap();
    assert!(stopped.logits.is_none());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = model
            .trace(input())
            .edit("layers_output.1", |_| panic!("edit panics"))
            .unwrap()
            .run();
    }));
    assert!(panicked.is_err());
    // The same thread then runs the plain forward exactly, traced or not.
    assert!(bits(&model.forward(&input()).unwrap()) == plain);
    let out = model
        .trace(input())
        .save("layers_output.1")
        .unwrap()
        .run()
        .unwrap();
    assert!(bits(out.logits.as_ref().unwrap()) == plain);
}
