//! Plans (issue 9, section 6): requests resolved once into an owned `Plan`, run on several inputs,
//! at chosen steps, on chosen rows of the batch, from several threads.

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model, Plan, StepOutput, Steps, TraceOutput};
use std::path::PathBuf;
use std::sync::Arc;

fn load(arch: &str) -> Model {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch);
    Model::load(p.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    vals(a)
        .iter()
        .zip(vals(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && vals(a) == vals(b)
}

#[test]
fn plan_is_send_sync_clone() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<Plan>();
    assert_send_sync_clone::<Steps>();
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<Model>>();
    assert_send_sync::<StepOutput<Tensor>>();
}

fn requests(model: &Model) -> Plan {
    model
        .plan()
        .save("layers_output.0")
        .unwrap()
        .edit("mlps_output.1", |x| x.affine(0.5, 0.0))
        .unwrap()
        .save("attention_probabilities.1")
        .unwrap()
        .skip_layer(0)
        .unwrap()
        .build()
}

fn fresh(model: &Model, input: Input) -> TraceOutput {
    model
        .trace(input)
        .save("layers_output.0")
        .unwrap()
        .edit("mlps_output.1", |x| x.affine(0.5, 0.0))
        .unwrap()
        .save("attention_probabilities.1")
        .unwrap()
        .skip_layer(0)
        .unwrap()
        .run()
        .unwrap()
}

fn assert_outputs_equal(a: &TraceOutput, b: &TraceOutput) {
    assert!(same(a.logits.as_ref().unwrap(), b.logits.as_ref().unwrap()));
    assert_eq!(a.saved.len(), b.saved.len());
    for ((na, va), (nb, vb)) in a.saved.iter().zip(&b.saved) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            assert!(same(x, y), "{na} differs");
        }
    }
}

#[test]
fn a_plan_reused_equals_fresh_traces() {
    let model = load("llama");
    let plan = requests(&model);
    let inputs = [
        Input::prompts(&["The quick brown fox", "Free software"]),
        Input::prompts(&["Hello world, this is a longer prompt"]),
    ];
    for input in inputs {
        let reused = model.run_plan(&plan, &input).unwrap();
        let again = fresh(&model, input);
        assert_outputs_equal(&reused, &again);
        // The edit took effect: the plan does not equal a plain forward.
        let plain = model
            .forward(&Input::Ids {
                input_ids: reused.input_ids.clone(),
                attention_mask: reused.attention_mask.clone(),
                position_ids: None,
            })
            .unwrap();
        assert!(max_diff(reused.logits.as_ref().unwrap(), &plain) > 1e-4);
    }
}

#[test]
fn steps_limit_requests() {
    let model = load("gpt2");
    let input = Input::prompts(&["Hello world"]);
    let plain = model.forward(&input).unwrap();
    let plan = model
        .plan()
        .save("layers_output.0")
        .unwrap()
        .save("logits")
        .unwrap()
        .steps(1, 2)
        .unwrap()
        .edit("mlps_output.0", |x| x.zeros_like())
        .unwrap()
        .steps(1, 2)
        .unwrap()
        .build();
    assert!(
        plan.is_active(0) && plan.is_active(2),
        "the first save applies to every step"
    );
    let s0 = plan.run(0, || model.forward(&input)).unwrap();
    let names: Vec<&str> = s0.saved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["layers_output.0"]);
    assert!(
        same(s0.output.as_ref().unwrap(), &plain),
        "no edit at step 0"
    );
    let s1 = plan.run(1, || model.forward(&input)).unwrap();
    let names: Vec<&str> = s1.saved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["layers_output.0", "logits"]);
    assert!(
        max_diff(s1.output.as_ref().unwrap(), &plain) > 1e-4,
        "the edit fires at step 1"
    );
    assert!(same(&s1.saved[1].1[0], s1.output.as_ref().unwrap()));
    let s2 = plan.run(2, || model.forward(&input)).unwrap();
    assert!(same(s2.output.as_ref().unwrap(), &plain));
    assert_eq!(s2.saved.len(), 1);

    // A plan none of whose requests applies to a step runs that step untraced.
    let later = model
        .plan()
        .save("logits")
        .unwrap()
        .steps_from(3)
        .unwrap()
        .build();
    assert!(!later.is_active(0) && !later.is_active(2) && later.is_active(3));
    let s = later.run(0, || model.forward(&input)).unwrap();
    assert!(s.saved.is_empty() && same(s.output.as_ref().unwrap(), &plain));

    // steps apply to every request of the last call (steer over two layers).
    let v = Tensor::ones(model.hidden_size().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let steer = model
        .plan()
        .steer(&[0, 1], &v, 4.0, None)
        .unwrap()
        .at_steps(Steps::only(1))
        .unwrap()
        .build();
    assert!(steer.requests().iter().all(|r| r.steps == Steps::only(1)));
    let s0 = steer.run(0, || model.forward(&input)).unwrap();
    assert!(same(s0.output.as_ref().unwrap(), &plain));

    // Bad uses are errors.
    assert!(model.plan().steps(0, 1).is_err(), "no request to limit");
    assert!(model.plan().save("logits").unwrap().steps(2, 2).is_err());
}

#[test]
fn rows_limit_requests() {
    let model = load("gpt2");
    let input = Input::prompts(&["Hello world, this is a longer prompt here", "Hi there"]);
    let full = model
        .trace(input.clone())
        .save("layers_output.0")
        .unwrap()
        .run()
        .unwrap();
    let row1 = model
        .trace(input.clone())
        .save("layers_output.0")
        .unwrap()
        .rows(&[1])
        .unwrap()
        .run()
        .unwrap();
    let h = full.get("layers_output.0").unwrap();
    let r = row1.get("layers_output.0").unwrap();
    assert_eq!(r.dims()[0], 1);
    assert!(same(r, &h.narrow(0, 1, 1).unwrap()));
    let plain = full.logits.as_ref().unwrap();

    // An edit of row 0 leaves row 1 exactly as it was.
    let edited = model
        .trace(input.clone())
        .edit("layers_output.0", |x| x.affine(3.0, 1.0))
        .unwrap()
        .rows(&[0])
        .unwrap()
        .run()
        .unwrap();
    let e = edited.logits.as_ref().unwrap();
    assert!(same(
        &e.narrow(0, 1, 1).unwrap(),
        &plain.narrow(0, 1, 1).unwrap()
    ));
    assert!(max_diff(&e.narrow(0, 0, 1).unwrap(), &plain.narrow(0, 0, 1).unwrap()) > 1e-3);

    // A replacement of row 1 takes a tensor of one row, and leaves row 0 alone.
    let (_, t, d) = h.dims3().unwrap();
    let zeros = Tensor::zeros((1, t, d), DType::F32, &Device::Cpu).unwrap();
    let set = model
        .trace(input.clone())
        .set("layers_output.0", zeros)
        .unwrap()
        .rows(&[1])
        .unwrap()
        .save("layers_output.0")
        .unwrap()
        .run()
        .unwrap();
    let s = set.get("layers_output.0").unwrap();
    assert!(same(
        &s.narrow(0, 0, 1).unwrap(),
        &h.narrow(0, 0, 1).unwrap()
    ));
    assert!(vals(&s.narrow(0, 1, 1).unwrap()).iter().all(|x| *x == 0.0));
    let l = set.logits.as_ref().unwrap();
    assert!(same(
        &l.narrow(0, 0, 1).unwrap(),
        &plain.narrow(0, 0, 1).unwrap()
    ));

    // skip_layer on one row: the other row is untouched.
    let skipped = model
        .trace(input.clone())
        .skip_layer(0)
        .unwrap()
        .rows(&[1])
        .unwrap()
        .run()
        .unwrap();
    let k = skipped.logits.as_ref().unwrap();
    assert!(same(
        &k.narrow(0, 0, 1).unwrap(),
        &plain.narrow(0, 0, 1).unwrap()
    ));
    assert!(max_diff(&k.narrow(0, 1, 1).unwrap(), &plain.narrow(0, 1, 1).unwrap()) > 1e-4);

    // A row past the batch is an error naming the hookpoint; no rows, or rows on a stop, too.
    let e = model
        .trace(input.clone())
        .save("layers_output.0")
        .unwrap()
        .rows(&[2])
        .unwrap()
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers_output.0") && e.contains("row 2"), "{e}");
    assert!(model
        .trace(input.clone())
        .save("logits")
        .unwrap()
        .rows(&[])
        .is_err());
    assert!(model
        .trace(input)
        .stop_after("layers_output.0")
        .unwrap()
        .rows(&[0])
        .is_err());
}

#[test]
fn an_arc_model_and_one_plan_from_two_threads() {
    let model = Arc::new(load("llama"));
    let plan = requests(&model);
    let prompts = [["The quick brown fox"], ["Free software is good"]];
    let expected: Vec<TraceOutput> = prompts
        .iter()
        .map(|p| model.run_plan(&plan, &Input::prompts(p)).unwrap())
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let model = Arc::clone(&model);
            let plan = plan.clone();
            let input = Input::prompts(p);
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| model.run_plan(&plan, &input).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&expected) {
        for got in h.join().unwrap() {
            assert_outputs_equal(&got, want);
        }
    }
    // Fresh traces from threads too.
    let m2 = Arc::clone(&model);
    let t = std::thread::spawn(move || fresh(&m2, Input::prompts(&["The quick brown fox"])));
    assert_outputs_equal(&t.join().unwrap(), &expected[0]);
}
