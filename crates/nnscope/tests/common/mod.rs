//! Parity against Hugging Face goldens (`tests/fixtures/<arch>/golden.safetensors`, written by
//! transformers 5.24, eager attention, float32). Tolerances from the fixtures' README: attention
//! probabilities within 1e-5 absolute; hidden states and logits within 1e-4 * max(1, max |ref|).
#![allow(dead_code)]

use candle_core::{DType, Device, IndexOp, Tensor};
use nnscope::models::ProbShape;
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch)
}

pub fn load(arch: &str) -> Model {
    Model::load(fixture(arch).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

pub struct Golden {
    pub t: HashMap<String, Tensor>,
    pub prompt: String,
    pub batch: Vec<String>,
}

pub fn golden(arch: &str) -> Golden {
    let path = fixture(arch).join("golden.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    Golden {
        t,
        prompt: md["prompt"].clone(),
        batch: md["batch"].lines().map(String::from).collect(),
    }
}

/// Max |a - b| over positions where `keep` is 1 (same shape as a, b, broadcastable).
fn masked_max_diff(a: &Tensor, b: &Tensor, keep: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    let d = d
        .broadcast_mul(&keep.to_dtype(DType::F32).unwrap())
        .unwrap();
    d.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
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

/// [B, T] mask -> [B, T, 1] for hidden states.
fn row_keep(mask: &Tensor) -> Tensor {
    mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap()
}

/// [B, T] mask -> [B, 1, T, T] keeping real query rows and key columns.
fn prob_keep(mask: &Tensor) -> Tensor {
    let m = mask.to_dtype(DType::F32).unwrap();
    let q = m.unsqueeze(2).unwrap();
    let k = m.unsqueeze(1).unwrap();
    q.broadcast_mul(&k).unwrap().unsqueeze(1).unwrap()
}

pub fn assert_hidden(name: &str, ours: &Tensor, reference: &Tensor, mask: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let tol = 1e-4 * max_abs(reference).max(1.0);
    let d = masked_max_diff(ours, reference, &row_keep(mask));
    assert!(d <= tol, "{name}: max diff {d} > tolerance {tol}");
}

pub fn assert_probs(name: &str, ours: &Tensor, reference: &Tensor, mask: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let d = masked_max_diff(ours, reference, &prob_keep(mask));
    assert!(d <= 1e-5, "{name}: max diff {d} > 1e-5");
}

/// Checks one input (`single` or `batch`) of a fixture: token ids, embeddings, every layer's input
/// and output, attention probabilities, final norm and logits.
///
/// `batch.*` was made with positions 0..T-1 on every row (transformers' raw forward), so it runs
/// with those explicit position ids; `single` and `batchpos` run with the default positions
/// (`cumsum(mask) - 1`, as `generate()`), so every row of `batchpos` equals its prompt alone.
pub fn check_input(model: &Model, g: &Golden, prefix: &str) {
    let ids = &g.t[&format!("{prefix}.input_ids")];
    let mask = &g.t[&format!("{prefix}.attention_mask")];
    // Tokenization must reproduce the golden ids.
    let prompts: Vec<String> = if prefix == "single" {
        vec![g.prompt.clone()]
    } else {
        g.batch.clone()
    };
    let (tok_ids, tok_mask) = model.tokenize(&prompts).unwrap();
    assert_eq!(
        tok_ids
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap(),
        ids.to_vec2::<i64>().unwrap(),
        "{prefix}: tokenization"
    );
    assert_eq!(
        tok_mask
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2::<i64>()
            .unwrap(),
        mask.to_vec2::<i64>().unwrap(),
        "{prefix}: attention mask"
    );
    let n = model.num_layers();
    // transformers' raw forward passes no positions (0..T-1 on every row), except OPT, which
    // computes them from the mask itself: its `batch.*` golden is a prompt batch like ours.
    let input = if prefix == "batch" && model.arch.model_type != "opt" {
        let (b, t) = ids.dims2().unwrap();
        let positions = Tensor::arange(0i64, t as i64, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((b, t))
            .unwrap()
            .contiguous()
            .unwrap();
        Input::Ids {
            input_ids: ids.clone(),
            attention_mask: Some(mask.clone()),
            position_ids: Some(positions),
        }
    } else {
        Input::Prompts(prompts)
    };
    // Post-norm OPT has no final norm (and its golden no `ln_final`).
    let has_ln_final = model.names().ln_final.is_some();
    assert_eq!(
        has_ln_final,
        g.t.contains_key(&format!("{prefix}.ln_final")),
        "{prefix}: final norm in the model and in the golden"
    );
    let mut tr = model.trace(input).save("token_embeddings").unwrap();
    if has_ln_final {
        tr = tr.save("ln_final.output").unwrap();
    }
    for l in 0..n {
        for what in ["layers_input", "layers_output", "attention_probabilities"] {
            tr = tr.save(&format!("{what}.{l}")).unwrap();
        }
    }
    let out = tr.run().unwrap();
    assert_hidden(
        &format!("{prefix}.embed_tokens"),
        out.get("token_embeddings").unwrap(),
        &g.t[&format!("{prefix}.embed_tokens")],
        mask,
    );
    for l in 0..n {
        for what in ["layers_input", "layers_output"] {
            let name = format!("{what}.{l}");
            assert_hidden(
                &format!("{prefix}.{name}"),
                out.get(&name).unwrap(),
                &g.t[&format!("{prefix}.{name}")],
                mask,
            );
        }
        let name = format!("attention_probabilities.{l}");
        let mut ours = out.get(&name).unwrap().clone();
        let reference = &g.t[&format!("{prefix}.{name}")];
        if model.arch.prob_shape == ProbShape::SinkColumn {
            let k = reference.dim(3).unwrap();
            assert_eq!(ours.dim(3).unwrap(), k + 1, "sink column");
            ours = ours.narrow(3, 0, k).unwrap();
        }
        assert_probs(&format!("{prefix}.{name}"), &ours, reference, mask);
    }
    if has_ln_final {
        assert_hidden(
            &format!("{prefix}.ln_final"),
            out.get("ln_final.output").unwrap(),
            &g.t[&format!("{prefix}.ln_final")],
            mask,
        );
    }
    assert_hidden(
        &format!("{prefix}.logits"),
        out.logits.as_ref().unwrap(),
        &g.t[&format!("{prefix}.logits")],
        mask,
    );
}

/// Uniform causal attention [1, H, T, T] (row q: 1/(q+1) on keys 0..q), shaped like `like`.
pub fn uniform_like(like: &Tensor) -> Tensor {
    let dims = like.dims4().unwrap();
    let (b, h, q, k) = dims;
    let mut v = vec![0f32; q * k];
    for i in 0..q {
        for j in 0..=i.min(k - 1) {
            v[i * k + j] = 1.0 / (i as f32 + 1.0);
        }
    }
    Tensor::from_vec(v, (1, 1, q, k), &Device::Cpu)
        .unwrap()
        .broadcast_as((b, h, q, k))
        .unwrap()
        .contiguous()
        .unwrap()
}

/// Writes uniform causal attention at `path_of(layer)` in every layer and compares the logits with
/// `uniform_attention.logits`.
pub fn check_uniform(model: &Model, g: &Golden, path_of: impl Fn(usize) -> String) {
    let ids = g.t["single.input_ids"].clone();
    let mut tr = model.trace(Input::ids(ids));
    for l in 0..model.num_layers() {
        tr = tr.edit(&path_of(l), |p| Ok(uniform_like(p))).unwrap();
    }
    let out = tr.run().unwrap();
    let reference = &g.t["uniform_attention.logits"];
    let mask = g.t["single.attention_mask"].clone();
    assert_hidden(
        "uniform_attention.logits",
        out.logits.as_ref().unwrap(),
        reference,
        &mask,
    );
    // And the edit must have changed something.
    let plain = &g.t["single.logits"];
    let moved = (reference - plain)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-3, "uniform attention should change the logits");
    let _ = reference.i(0).unwrap();
}

/// Greedy generation with the cache against `gen.<prefix>.sequences` (token for token) and
/// `gen.<prefix>.logits` (the logits each token was picked from, 1e-4 relative).
pub fn check_generation(model: &Model, g: &Golden, prefix: &str) {
    let prompts: Vec<String> = if prefix == "single" {
        vec![g.prompt.clone()]
    } else {
        g.batch.clone()
    };
    let reference = &g.t[&format!("gen.{prefix}.sequences")];
    let ref_logits = &g.t[&format!("gen.{prefix}.logits")];
    let steps = ref_logits.dim(0).unwrap();
    let out = model
        .generate(Input::Prompts(prompts))
        .max_new_tokens(steps)
        .ignore_eos(true)
        .run()
        .unwrap();
    assert_eq!(
        out.output_ids.to_vec2::<i64>().unwrap(),
        reference.to_vec2::<i64>().unwrap(),
        "gen.{prefix}.sequences"
    );
    let ours = out.scores.unwrap();
    assert_eq!(ours.dims(), ref_logits.dims(), "gen.{prefix}.logits: shape");
    let tol = 1e-4 * max_abs(ref_logits).max(1.0);
    let d = max_diff(&ours, ref_logits);
    assert!(
        d <= tol,
        "gen.{prefix}.logits: max diff {d} > tolerance {tol}"
    );
}

/// The whole fixture check for an architecture: `single`, `batch` (positions 0..T-1), `batchpos`
/// (positions from the mask), uniform attention, and greedy generation where the golden has them.
pub fn parity(arch: &str) {
    let model = load(arch);
    let g = golden(arch);
    check_input(&model, &g, "single");
    check_input(&model, &g, "batch");
    // Bloom's goldens have no `batchpos`: its ALiBi is built from the mask, so `batch` already
    // equals each prompt alone.
    if model.arch.model_type != "bloom" {
        check_input(&model, &g, "batchpos");
    }
    for prefix in ["single", "batch"] {
        check_generation(&model, &g, prefix);
    }
    if model.arch.prob_shape == ProbShape::Standard {
        check_uniform(&model, &g, |l| format!("attention_probabilities.{l}"));
    }
}

/// The `single` input ids of a model's fixture golden.
pub fn golden_path_ids(model: &Model) -> Tensor {
    let name = model
        .source
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    golden(&name).t["single.input_ids"].clone()
}

// Helpers for tests that copy or rewrite checkpoints.

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nnscope-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn copy_files(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

/// Logits for the golden `single` input.
pub fn logits(model: &Model, g: &Golden) -> Tensor {
    let ids = g.t["single.input_ids"].clone();
    model.trace(Input::ids(ids)).run().unwrap().logits.unwrap()
}

/// Writes the golden `single` ids as an `--inputs` file.
pub fn write_inputs(g: &Golden, path: &Path) {
    let ids = g.t["single.input_ids"].clone();
    let mut m = HashMap::new();
    m.insert("input_ids".to_string(), ids);
    candle_core::safetensors::save(&m, path).unwrap();
}

pub const LLAMA_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A copy of the llama fixture with its weights converted to bfloat16 here (candle rounds to nearest
/// even, as torch does).
pub fn bf16_copy(tmp: &TempDir) -> PathBuf {
    let src = fixture("llama");
    let dir = tmp.0.join("llama-bf16");
    copy_files(
        &src,
        &dir,
        &["config.json", "tokenizer.json", "tokenizer_config.json"],
    );
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    dir
}
