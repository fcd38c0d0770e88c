//! Bad input gets a clear, typed error naming what is wrong (issue 6). Each test builds the bad
//! input in a temporary folder from the tiny fixtures and checks the error variant and message.

use candle_core::{DType, Device, Tensor};
use nnscope::{Error, Input, LoadOptions, Model, Trace};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch)
}

fn load_path(p: &Path) -> nnscope::Result<Model> {
    Model::load(p.to_str().unwrap(), &LoadOptions::default())
}

fn load(arch: &str) -> Model {
    load_path(&fixture(arch)).unwrap()
}

/// A temporary copy of a fixture folder (config, weights, tokenizer).
fn copy_fixture(arch: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture(arch).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(p: &Path) -> (Error, String) {
    let e = load_path(p).expect_err("loading should fail");
    let msg = e.to_string();
    (e, msg)
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn write_weights(dir: &Path, t: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(t, dir.join("model.safetensors")).unwrap();
}

fn trace_err(r: nnscope::Result<Trace<'_>>) -> (Error, String) {
    match r {
        Ok(_) => panic!("adding the request should fail"),
        Err(e) => {
            let m = e.to_string();
            (e, m)
        }
    }
}

fn run_err(r: nnscope::Result<Trace<'_>>) -> (Error, String) {
    let e = r.and_then(|t| t.run()).expect_err("the trace should fail");
    let m = e.to_string();
    (e, m)
}

fn ids(v: &[u32]) -> Input {
    Input::ids(Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap())
}

// ---------------------------------------------------------------- model folder, hub id

#[test]
fn missing_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (e, msg) = load_err(&dir.path().join("no-such-model"));
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e:?}");
    assert_has(&msg, &["no-such-model", "no such folder"]);
}

#[test]
fn model_path_is_a_file() {
    let dir = copy_fixture("llama");
    let (e, msg) = load_err(&dir.path().join("config.json"));
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e:?}");
    assert_has(&msg, &["it is a file", "folder that holds config.json"]);
}

#[test]
fn folder_without_config() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e:?}");
    assert_has(&msg, &["has no config.json"]);
}

#[test]
fn unreadable_config() {
    // A config.json that cannot be read as a file (a folder in its place).
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    std::fs::create_dir(dir.path().join("config.json")).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(
        matches!(e, Error::ModelNotFound { .. } | Error::Io { .. }),
        "{e:?}"
    );
    assert_has(&msg, &["config.json"]);
}

#[test]
fn hub_id_not_in_cache() {
    // The environment is left alone here (the CLI test points HF_HUB_CACHE at an empty folder);
    // no cache anywhere holds this id, and `offline` keeps the test off the network.
    let opts = LoadOptions {
        offline: true,
        ..Default::default()
    };
    let e = Model::load("nnscope-test-owner/no-such-model", &opts).unwrap_err();
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e:?}");
    assert_has(
        &e.to_string(),
        &[
            "not in the local Hugging Face cache (looked in",
            "models--nnscope-test-owner--no-such-model",
            "nothing is downloaded while HF_HUB_OFFLINE is set",
        ],
    );
}

// ---------------------------------------------------------------- config.json

#[test]
fn config_not_json() {
    let dir = copy_fixture("llama");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"llama\",",
    )
    .unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert_has(&msg, &["config.json", "not valid JSON"]);
}

#[test]
fn config_not_an_object() {
    let dir = copy_fixture("llama");
    std::fs::write(dir.path().join("config.json"), "[1, 2]").unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert_has(&msg, &["expected a JSON object"]);
}

#[test]
fn config_missing_key() {
    for (arch, key) in [
        ("llama", "hidden_size"),
        ("llama", "num_attention_heads"),
        ("gpt2", "n_embd"),
        ("llama", "model_type"),
    ] {
        let dir = copy_fixture(arch);
        edit_config(dir.path(), |c| {
            c.remove(key);
        });
        let (e, msg) = load_err(dir.path());
        assert!(matches!(e, Error::Config { .. }), "{arch} {key}: {e:?}");
        assert_has(&msg, &["config.json", &format!("missing key `{key}`")]);
    }
}

#[test]
fn config_wrong_type() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), "64".into());
    });
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert_has(
        &msg,
        &["key `hidden_size` should be a non-negative integer, found \"64\""],
    );
}

#[test]
fn config_zero_size() {
    for key in ["num_attention_heads", "vocab_size", "hidden_size"] {
        let dir = copy_fixture("llama");
        edit_config(dir.path(), |c| {
            c.insert(key.into(), 0.into());
        });
        let (e, msg) = load_err(dir.path());
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        assert_has(&msg, &[&format!("key `{key}` is 0; it must be at least 1")]);
    }
}

#[test]
fn config_absurd_sizes() {
    // Found by fuzzing (fuzz/regressions/config_edits): a huge rotary fraction made the loader
    // allocate a RoPE table of 1e300 entries before any weight was read.
    let cases: [(&str, serde_json::Value, &str); 3] = [
        (
            "partial_rotary_factor",
            1e300.into(),
            "key `partial_rotary_factor` is 1e300; it must be in (0, 1]",
        ),
        (
            "partial_rotary_factor",
            0.0.into(),
            "key `partial_rotary_factor` is 0.0; it must be in (0, 1]",
        ),
        (
            "head_dim",
            (1u64 << 40).into(),
            "key `head_dim` is 1099511627776, larger than any real model",
        ),
    ];
    for (key, value, expected) in cases {
        let dir = copy_fixture("llama");
        edit_config(dir.path(), |c| {
            c.insert(key.into(), value);
        });
        let (e, msg) = load_err(dir.path());
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        assert_has(&msg, &[expected]);
    }
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["partial_rotary_factor"] = (-0.5).into();
    });
    let (_, msg) = load_err(dir.path());
    assert_has(
        &msg,
        &["key `rope_parameters.partial_rotary_factor` is -0.5; it must be in (0, 1]"],
    );
}

#[test]
fn config_unknown_model_type() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "llamma".into());
    });
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert_has(
        &msg,
        &["unknown model_type `llamma`; supported:", "gpt2", "llama"],
    );
}

// ---------------------------------------------------------------- weights

#[test]
fn safetensors_truncated() {
    let dir = copy_fixture("llama");
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "model.safetensors",
            "not a valid safetensors file",
            "truncated or corrupt",
        ],
    );
}

#[test]
fn safetensors_corrupt_header() {
    let dir = copy_fixture("llama");
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    // Keep the length prefix, break the JSON header.
    for b in bytes.iter_mut().skip(8).take(16) {
        *b = b'#';
    }
    std::fs::write(&p, &bytes).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(&msg, &["model.safetensors", "not a valid safetensors file"]);

    // A header length past the end of the file.
    let mut bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(&msg, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn safetensors_empty_file() {
    let dir = copy_fixture("gpt2");
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(&msg, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("llama");
    let mut w = weights(dir.path());
    w.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    write_weights(dir.path(), &w);
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "missing tensor `model.layers.1.mlp.up_proj.weight`",
            "expected shape [128, 64]",
            "not in model.safetensors",
        ],
    );
}

#[test]
fn wrong_shape_tensor() {
    let dir = copy_fixture("gpt2");
    let mut w = weights(dir.path());
    let t = w["transformer.h.1.attn.c_attn.weight"]
        .narrow(1, 0, 100)
        .unwrap();
    w.insert("transformer.h.1.attn.c_attn.weight".into(), t);
    write_weights(dir.path(), &w);
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "tensor `transformer.h.1.attn.c_attn.weight` in model.safetensors",
            "has shape [64, 100]",
            "config implies [64, 192]",
        ],
    );
}

#[test]
fn integer_dtype_tensor_is_refused() {
    let dir = copy_fixture("llama");
    let mut w = weights(dir.path());
    let t = w["model.norm.weight"].to_dtype(DType::I64).unwrap();
    w.insert("model.norm.weight".into(), t);
    write_weights(dir.path(), &w);
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "tensor `model.norm.weight` in model.safetensors has dtype I64",
            "must be floating point",
        ],
    );
}

#[test]
fn float_dtypes_are_converted() {
    // F16 storage is a float type: converted to the compute dtype, not refused.
    let dir = copy_fixture("llama");
    let mut w = weights(dir.path());
    let t = w["model.norm.weight"].to_dtype(DType::F16).unwrap();
    w.insert("model.norm.weight".into(), t);
    write_weights(dir.path(), &w);
    load_path(dir.path()).unwrap();
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let wm: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let v = serde_json::json!({"metadata": {}, "weight_map": wm});
    std::fs::write(dir.join("model.safetensors.index.json"), v.to_string()).unwrap();
}

#[test]
fn sharded_index_missing_shard() {
    let dir = copy_fixture("llama");
    let w = weights(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let names: Vec<&String> = w.keys().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let shard1: HashMap<String, Tensor> =
        a.iter().map(|k| (k.to_string(), w[*k].clone())).collect();
    candle_core::safetensors::save(&shard1, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    let mut map: Vec<(&str, &str)> = a
        .iter()
        .map(|k| (k.as_str(), "model-00001-of-00002.safetensors"))
        .collect();
    map.extend(
        b.iter()
            .map(|k| (k.as_str(), "model-00002-of-00002.safetensors")),
    );
    write_index(dir.path(), &map);
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "model.safetensors.index.json",
            "lists shard `model-00002-of-00002.safetensors`, which is missing",
        ],
    );

    // With both shards present, the sharded checkpoint loads and computes what the single file does.
    let shard2: HashMap<String, Tensor> =
        b.iter().map(|k| (k.to_string(), w[*k].clone())).collect();
    candle_core::safetensors::save(&shard2, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let sharded = load_path(dir.path()).unwrap();
    let single = load("llama");
    let x = ids(&[1, 2, 3]);
    let d = (sharded.forward(&x).unwrap() - single.forward(&x).unwrap()).unwrap();
    assert_eq!(
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn sharded_index_bad_entries() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    write_index(
        dir.path(),
        &[("lm_head.weight", "../../etc/passwd.safetensors")],
    );
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(&msg, &["not a file inside the checkpoint folder"]);

    write_index(
        dir.path(),
        &[("lm_head.weight", "pytorch_model-00001-of-00002.bin")],
    );
    let (_, msg) = load_err(dir.path());
    assert_has(
        &msg,
        &[
            "not a .safetensors file",
            "pickle checkpoints are never loaded",
        ],
    );

    write_index(dir.path(), &[]);
    let (_, msg) = load_err(dir.path());
    assert_has(&msg, &["`weight_map` lists no tensors"]);

    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .unwrap();
    let (_, msg) = load_err(dir.path());
    assert_has(&msg, &["no `weight_map` object"]);

    std::fs::write(dir.path().join("model.safetensors.index.json"), "not json").unwrap();
    let (_, msg) = load_err(dir.path());
    assert_has(&msg, &["model.safetensors.index.json", "not valid JSON"]);
}

#[test]
fn pickle_checkpoints_are_never_loaded() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not loaded").unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Weights { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "no model.safetensors",
            "pickle checkpoints are never loaded",
        ],
    );
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_invalid() {
    let dir = copy_fixture("llama");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 42}").unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, Error::Tokenizer { .. }), "{e:?}");
    assert_has(&msg, &["tokenizer", "tokenizer.json"]);
}

#[test]
fn tokenizer_missing() {
    let dir = copy_fixture("gpt2");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let m = load_path(dir.path()).unwrap();
    let e = m.trace(Input::prompts(&["hello"])).run().unwrap_err();
    assert!(matches!(e, Error::Tokenizer { .. }), "{e:?}");
    assert_has(
        &e.to_string(),
        &[
            "tokenizer.json",
            "missing: prompts need a tokenizer.json (or pass token ids)",
        ],
    );
    // Token ids still work without a tokenizer.
    m.trace(ids(&[1, 2])).run().unwrap();
}

// ---------------------------------------------------------------- inputs

#[test]
fn token_id_outside_vocabulary() {
    let m = load("llama");
    let e = m.forward(&ids(&[1, 512, 3])).unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert_has(
        &e.to_string(),
        &["token id 512 at position 1 of sequence 0 is outside the vocabulary (size 512)"],
    );

    let neg = Tensor::new(&[[3i64, -1]], &Device::Cpu).unwrap();
    let e = m.forward(&Input::ids(neg)).unwrap_err();
    assert_has(
        &e.to_string(),
        &["token id -1 at position 1 of sequence 0 is outside the vocabulary"],
    );
}

#[test]
fn input_ids_must_be_integer_2d() {
    let m = load("llama");
    let f = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    let e = m.forward(&Input::ids(f)).unwrap_err();
    assert_has(&e.to_string(), &["input_ids must be integers, got F32"]);
    let one_d = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    let e = m.forward(&Input::ids(one_d)).unwrap_err();
    assert_has(
        &e.to_string(),
        &["input_ids must be 2-D [batch, tokens], got shape [2]"],
    );
}

#[test]
fn mask_shape_mismatch() {
    let m = load("llama");
    let input = Input::Ids {
        input_ids: Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
        attention_mask: Some(Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap()),
        position_ids: None,
    };
    let e = m.trace(input).run().unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert_has(
        &e.to_string(),
        &["attention_mask has shape [1, 2] but input_ids has shape [1, 3]"],
    );
}

#[test]
fn mask_values_must_be_zero_or_one() {
    let m = load("llama");
    let input = Input::Ids {
        input_ids: Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
        attention_mask: Some(Tensor::new(&[[1f32, 0.5, 1.0]], &Device::Cpu).unwrap()),
        position_ids: None,
    };
    let e = m.forward(&input).unwrap_err();
    assert_has(
        &e.to_string(),
        &["attention_mask must hold only 0 and 1, found 0.5 at position 1 of sequence 0"],
    );
}

#[test]
fn empty_input() {
    let m = load("gpt2");
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    let e = m.forward(&Input::ids(empty)).unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert_has(&e.to_string(), &["empty input: input_ids has shape [1, 0]"]);

    let no_batch = Tensor::zeros((0, 3), DType::U32, &Device::Cpu).unwrap();
    let e = m.forward(&Input::ids(no_batch)).unwrap_err();
    assert_has(&e.to_string(), &["empty input: input_ids has shape [0, 3]"]);

    let none: [&str; 0] = [];
    let e = m.forward(&Input::prompts(&none)).unwrap_err();
    assert_has(&e.to_string(), &["no prompts given"]);

    // GPT-2 adds no BOS token, so the empty prompt has no tokens at all.
    let e = m.forward(&Input::prompts(&[""])).unwrap_err();
    assert_has(&e.to_string(), &["prompt \"\" encodes to no tokens"]);
}

#[test]
fn sequence_longer_than_model_supports() {
    let m = load("gpt2");
    let n = m.config.usize(&["n_positions"]).unwrap();
    let long: Vec<u32> = (0..n as u32 + 1).map(|i| i % 500).collect();
    let e = m.trace(ids(&long)).run().unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert_has(
        &e.to_string(),
        &[&format!(
            "{} tokens is longer than the {n} positions this model supports (gpt2)",
            n + 1
        )],
    );
    // Exactly n positions is fine.
    m.forward(&ids(&long[..n])).unwrap();
}

// ---------------------------------------------------------------- hookpoints

#[test]
fn hookpoint_typos_suggest_nearest() {
    let m = load("llama");
    let x = || ids(&[1, 2, 3]);
    let (e, msg) = trace_err(m.trace(x()).save("layers_ouptut.0"));
    assert!(matches!(e, Error::Hookpoint { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "hookpoint `layers_ouptut.0`",
            "is neither a standard name nor a module",
            "did you mean",
            "`layers_output`",
        ],
    );

    let (_, msg) = trace_err(m.trace(x()).save("model.layers.0.self_atn.output"));
    assert_has(
        &msg,
        &[
            "unexpected `self_atn` after module `model.layers.0`",
            "did you mean",
            "`self_attn`",
        ],
    );

    let (_, msg) = trace_err(m.trace(x()).save("attentions.0.source.self_q_prj_0.output"));
    assert_has(
        &msg,
        &[
            "`self_q_prj_0` is not a hookpoint of LlamaAttention::forward",
            "`self_q_proj_0`",
        ],
    );

    let (_, msg) = trace_err(m.trace(x()).save("attentions.0.outptu"));
    assert_has(&msg, &["did you mean", "`output`"]);
}

#[test]
fn hookpoint_index_past_last_layer() {
    let m = load("llama");
    let (e, msg) = trace_err(m.trace(ids(&[1, 2])).save("layers_output.2"));
    assert!(matches!(e, Error::Hookpoint { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "layer 2 is past the last layer: the model has 2 layers (0..1)",
            "`layers_output.1`",
        ],
    );

    let (_, msg) = trace_err(m.trace(ids(&[1, 2])).save("model.layers.7.output"));
    assert_has(
        &msg,
        &[
            "hookpoint `model.layers.7.output`",
            "`model.layers` has 2 entries (0..1), so there is no `model.layers.7`",
            "`model.layers.1`",
        ],
    );
}

#[test]
fn hookpoint_output_of_non_tensor_call() {
    let m = load("llama");
    let (e, msg) = trace_err(
        m.trace(ids(&[1, 2]))
            .save("attentions.0.source.hidden_states_dims3_0.output"),
    );
    assert!(matches!(e, Error::Hookpoint { .. }), "{e:?}");
    assert_has(
        &msg,
        &["this call returns no tensor, so its `.output` cannot be saved or set"],
    );
}

#[test]
fn hookpoint_tuple_needs_index() {
    let m = load("llama");
    let (_, msg) = trace_err(
        m.trace(ids(&[1, 2]))
            .save("attentions.0.source.attention_interface_0.output"),
    );
    assert_has(
        &msg,
        &[
            "returns a tuple of 2 tensors: pick one",
            "attention_interface_0.output.0",
        ],
    );
    let (_, msg) = trace_err(
        m.trace(ids(&[1, 2]))
            .save("attentions.0.source.attention_interface_0.output.2"),
    );
    assert_has(&msg, &["index 2 is past the end of a tuple of 2 tensors"]);
}

#[test]
fn writing_a_module_accessor() {
    let m = load("llama");
    let t = Tensor::zeros((1, 2, 64), DType::F32, &Device::Cpu).unwrap();
    let (e, msg) = trace_err(m.trace(ids(&[1, 2])).set("layers.0", t));
    assert!(matches!(e, Error::Hookpoint { .. }), "{e:?}");
    assert_has(
        &msg,
        &[
            "hookpoint `layers.0`: is a module, not a value: add `.output`",
            "`layers.0.output`",
        ],
    );
    let (_, msg) = trace_err(
        m.trace(ids(&[1, 2]))
            .edit("attentions.1", |x| Ok(x.clone())),
    );
    assert_has(&msg, &["is a module, not a value", "`attentions.1.output`"]);
}

#[test]
fn replacement_of_wrong_shape() {
    let m = load("llama");
    let t = Tensor::zeros((1, 3, 64), DType::F32, &Device::Cpu).unwrap();
    let (e, msg) = run_err(m.trace(ids(&[1, 2])).set("layers_output.0", t));
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_has(
        &msg,
        &["hookpoint `layers_output.0`: new value has shape [1, 3, 64], expected [1, 2, 64]"],
    );

    let (e, msg) = run_err(
        m.trace(ids(&[1, 2]))
            .edit("attention_probabilities.1", |p| p.narrow(3, 0, 1)),
    );
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_has(&msg, &["hookpoint `attention_probabilities.1`: new value has shape [1, 4, 2, 1], expected [1, 4, 2, 2]"]);
}

#[test]
fn replacement_of_wrong_dtype() {
    let m = load("gpt2");
    let t = Tensor::zeros((1, 2, 64), DType::U32, &Device::Cpu).unwrap();
    let (e, msg) = run_err(m.trace(ids(&[1, 2])).set("mlps_output.0", t));
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e:?}");
    assert_has(
        &msg,
        &["hookpoint `mlps_output.0`: new value has dtype U32, expected F32"],
    );
}

#[test]
fn failing_edit_is_reported() {
    let m = load("gpt2");
    let (e, msg) = run_err(
        m.trace(ids(&[1, 2]))
            .edit("layers_output.0", |x| x.matmul(x)),
    );
    assert!(matches!(e, Error::Edit { .. }), "{e:?}");
    assert_has(&msg, &["hookpoint `layers_output.0`: the edit failed"]);
}

#[test]
fn non_finite_edit_detected_when_checking() {
    let m = load("llama");
    let nan = |x: &Tensor| x.affine(0.0, f64::NAN);
    let (e, msg) = run_err(
        m.trace(ids(&[1, 2]))
            .edit("mlps_output.0", nan)
            .map(|t| t.check_finite(true)),
    );
    assert!(matches!(e, Error::NonFinite { .. }), "{e:?}");
    assert_has(
        &msg,
        &["hookpoint `mlps_output.0`: the edit produced NaN or infinity"],
    );

    let inf = Tensor::full(f32::INFINITY, (1, 2, 64), &Device::Cpu).unwrap();
    let (e, _) = run_err(
        m.trace(ids(&[1, 2]))
            .set("layers_output.1", inf)
            .map(|t| t.check_finite(true)),
    );
    assert!(matches!(e, Error::NonFinite { .. }), "{e:?}");

    // Without checking, the edit is applied as asked.
    let out = m
        .trace(ids(&[1, 2]))
        .edit("mlps_output.0", nan)
        .unwrap()
        .run()
        .unwrap();
    let logits = out
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(logits.iter().all(|v| v.is_nan()));
}

#[test]
fn saves_too_large_for_memory() {
    let m = load("llama");
    // An explicit cap: logits of [1, 3, 512] in float32 are 6 KiB.
    let e = m
        .trace(ids(&[1, 2, 3]))
        .save("logits")
        .unwrap()
        .save("layers_output.0")
        .unwrap()
        .memory_limit(4096)
        .run()
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    let msg = e.to_string();
    assert_has(
        &msg,
        &[
            "the requested saves need about 7.5 KiB",
            "`logits` ~[1, 3, 512]",
            "`layers_output.0` ~[1, 3, 128]",
            "4.0 KiB",
            "Trace::memory_limit",
        ],
    );
    m.trace(ids(&[1, 2, 3]))
        .save("logits")
        .unwrap()
        .memory_limit(1 << 20)
        .run()
        .unwrap();

    // Against the machine's memory: the attention probabilities of 300,000 tokens (4 heads, float32)
    // are about 1.3 TiB. Refused before the forward starts (which would take hours).
    let long = Tensor::zeros((1, 300_000), DType::U32, &Device::Cpu).unwrap();
    let started = std::time::Instant::now();
    let e = m
        .trace(Input::ids(long))
        .save("attention_probabilities.0")
        .unwrap()
        .run()
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    assert_has(
        &e.to_string(),
        &[
            "TiB",
            "`attention_probabilities.0` ~[1, 4, 300000, 300000]",
            "MemAvailable",
        ],
    );
    assert!(started.elapsed().as_secs() < 30);
}

#[test]
fn unsaved_name_is_reported() {
    let m = load("llama");
    let out = m
        .trace(ids(&[1, 2]))
        .save("layers_output.0")
        .unwrap()
        .run()
        .unwrap();
    let e = out.get("layers_output.1").unwrap_err();
    assert_has(
        &e.to_string(),
        &["was not saved in this trace", "`layers_output.0`"],
    );
}
