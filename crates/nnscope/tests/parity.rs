//! Every architecture against its Hugging Face golden outputs.
mod common;

#[test]
fn gpt2() {
    common::parity("gpt2");
}

#[test]
fn llama() {
    common::parity("llama");
}

#[test]
fn qwen2_moe() {
    common::parity("qwen2_moe");
}

#[test]
fn dbrx() {
    common::parity("dbrx");
}

#[test]
fn gpt_oss() {
    common::parity("gpt_oss");
}

/// GPT-OSS's attention sinks: the seed's hookpoint (`F_softmax_0`) has the sink column, rows summing
/// to 1; uniform attention is written at the tensor that multiplies V (after the sink is dropped).
#[test]
fn gpt_oss_sinks_and_uniform_attention() {
    use candle_core::{DType, D};
    let model = common::load("gpt_oss");
    let g = common::golden("gpt_oss");
    let ids = g.t["single.input_ids"].clone();
    let t = ids.dim(1).unwrap();
    let mut tr = model.trace(nnscope::Input::ids(ids));
    for l in 0..model.num_layers() {
        tr = tr
            .save(&format!("attentions.{l}.source.attention_interface_0.source.F_softmax_0.output"))
            .unwrap();
    }
    let out = tr.run().unwrap();
    for l in 0..model.num_layers() {
        let p = out
            .get(&format!("attentions.{l}.source.attention_interface_0.source.F_softmax_0.output"))
            .unwrap();
        assert_eq!(p.dim(3).unwrap(), t + 1, "layer {l}: K + 1 columns");
        let sums = p.to_dtype(DType::F32).unwrap().sum(D::Minus1).unwrap();
        let worst = (sums - 1.0).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let worst = worst.to_scalar::<f32>().unwrap();
        assert!(worst < 1e-5, "layer {l}: rows sum to 1 within {worst}");
    }
    common::check_uniform(&model, &g, |l| {
        format!("attentions.{l}.source.attention_interface_0.source.nn_functional_dropout_0.output")
    });
}
