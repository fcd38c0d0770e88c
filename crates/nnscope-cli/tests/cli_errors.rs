//! The `nnscope` binary on bad input: a one-line message on stderr, a non-zero exit, no panic or
//! backtrace, and no partial output file (issue 6).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch)
}

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

/// Runs the binary with an empty Hugging Face cache (set for the child only) and backtraces on,
/// so that a panic would show.
fn nnscope(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nnscope"))
        .args(args)
        .env("HF_HUB_CACHE", cache.join("hub-cache"))
        .env("HF_HOME", cache.join("hf-home"))
        .env("HOME", cache.join("home"))
        .env("RUST_BACKTRACE", "1")
        // Hub ids stay in the (empty) local cache: no test touches the internet.
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

/// Asserts a clean failure and returns the message.
fn fails(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should fail; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "panic: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr:?}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr.trim_end().to_string()
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Files in a folder (to check that nothing partial was left behind).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let missing = tmp.path().join("nope");
    let msg = fails(&nnscope(
        &[
            "run",
            s(&missing),
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["model", "nope", "no such folder"]);
    assert!(!out.exists());
}

#[test]
fn hub_id_not_in_cache_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = fails(&nnscope(
        &["source", "someone/tiny-model", "attentions.0"],
        tmp.path(),
    ));
    let looked = tmp
        .path()
        .join("hub-cache")
        .join("models--someone--tiny-model");
    assert_has(
        &msg,
        &[
            "model `someone/tiny-model` not found",
            "not in the local Hugging Face cache",
            s(&looked),
            "nothing is downloaded while HF_HUB_OFFLINE is set",
        ],
    );
}

#[test]
fn bad_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = fails(&nnscope(
        &["source", s(dir.path()), "attentions.0"],
        tmp.path(),
    ));
    assert_has(&msg, &["config.json", "not valid JSON"]);

    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"mamba9\"}",
    )
    .unwrap();
    let msg = fails(&nnscope(
        &["source", s(dir.path()), "attentions.0"],
        tmp.path(),
    ));
    assert_has(
        &msg,
        &["unknown model_type `mamba9`; supported:", "gpt2", "llama"],
    );
}

#[test]
fn truncated_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("gpt2");
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..1000]).unwrap();
    let msg = fails(&nnscope(
        &["source", s(dir.path()), "attentions.0"],
        tmp.path(),
    ));
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
fn hookpoint_typo_suggests() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let llama = fixture("llama");
    let msg = fails(&nnscope(
        &[
            "run",
            s(&llama),
            "--prompt",
            "hi",
            "--save",
            "attention_probabilites.0",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(
        &msg,
        &[
            "hookpoint `attention_probabilites.0`",
            "did you mean",
            "`attention_probabilities`",
        ],
    );
    let msg = fails(&nnscope(
        &[
            "run",
            s(&llama),
            "--prompt",
            "hi",
            "--save",
            "layers_output.9",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["layer 9 is past the last layer"]);
    let msg = fails(&nnscope(
        &[
            "source",
            s(&llama),
            "attentions.0.source.attention_interfce_0",
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["did you mean", "`attention_interface_0`"]);
    assert!(!out.exists());
}

fn write_inputs(path: &Path, ids: &[i64], t: usize, mask: Option<&[i64]>) {
    let dev = candle_core::Device::Cpu;
    let mut m = HashMap::new();
    m.insert(
        "input_ids".to_string(),
        candle_core::Tensor::from_vec(ids.to_vec(), (ids.len() / t, t), &dev).unwrap(),
    );
    if let Some(mask) = mask {
        let tm = mask.len();
        m.insert(
            "attention_mask".to_string(),
            candle_core::Tensor::from_vec(mask.to_vec(), (1, tm), &dev).unwrap(),
        );
    }
    candle_core::safetensors::save(&m, path).unwrap();
}

#[test]
fn bad_inputs_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let inputs = tmp.path().join("ids.safetensors");
    let gpt2 = fixture("gpt2");
    let run = |inputs: &Path| {
        fails(&nnscope(
            &[
                "run",
                s(&gpt2),
                "--inputs",
                s(inputs),
                "--save",
                "logits",
                "--out",
                s(&out),
            ],
            tmp.path(),
        ))
    };

    write_inputs(&inputs, &[1, 2, 9999], 3, None);
    assert_has(
        &run(&inputs),
        &["token id 9999 at position 2 of sequence 0 is outside the vocabulary (size 512)"],
    );

    write_inputs(&inputs, &[1, 2, 3], 3, Some(&[1, 1]));
    assert_has(
        &run(&inputs),
        &["attention_mask has shape [1, 2] but input_ids has shape [1, 3]"],
    );

    write_inputs(&inputs, &[], 1, None);
    assert_has(&run(&inputs), &["empty input"]);

    let long: Vec<i64> = (0..129).collect();
    write_inputs(&inputs, &long, 129, None);
    assert_has(
        &run(&inputs),
        &["129 tokens is longer than the 128 positions this model supports"],
    );

    assert_has(
        &run(&tmp.path().join("missing.safetensors")),
        &["missing.safetensors"],
    );
    std::fs::write(&inputs, b"garbage").unwrap();
    assert_has(&run(&inputs), &["ids.safetensors"]);
    assert!(!out.exists());
}

#[test]
fn no_tokenizer_for_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let out = tmp.path().join("o.safetensors");
    let msg = fails(&nnscope(
        &[
            "run",
            s(dir.path()),
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["tokenizer.json", "prompts need a tokenizer.json"]);
}

#[test]
fn output_that_cannot_be_written_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixture("llama");
    let run = |out: &Path, save: &str| {
        nnscope(
            &[
                "run",
                s(&llama),
                "--prompt",
                "hi",
                "--save",
                save,
                "--out",
                s(out),
            ],
            tmp.path(),
        )
    };

    // A folder that does not exist.
    let out = tmp.path().join("no-such-folder").join("o.safetensors");
    assert_has(
        &fails(&run(&out, "logits")),
        &["the output folder", "no-such-folder", "does not exist"],
    );
    assert!(!tmp.path().join("no-such-folder").exists());

    // A directory as --out: refused, and the directory is left as it was.
    let out_dir = tmp.path().join("outdir");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::write(out_dir.join("keep.txt"), "x").unwrap();
    assert_has(
        &fails(&run(&out_dir, "logits")),
        &["outdir", "is a directory"],
    );
    assert_eq!(listing(&out_dir), vec!["keep.txt"]);

    // A folder where files cannot be created (even as root).
    assert_has(
        &fails(&run(
            Path::new("/proc/nnscope-test-out.safetensors"),
            "logits",
        )),
        &["nnscope-test-out.safetensors"],
    );
    assert!(!Path::new("/proc/nnscope-test-out.safetensors").exists());

    // A run that fails after loading leaves an existing output untouched, and no temporary file.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = work.join("o.safetensors");
    std::fs::write(&out, "previous result").unwrap();
    fails(&run(&out, "layers_output.99"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous result");
    assert_eq!(listing(&work), vec!["o.safetensors"]);

    // A good run replaces it, leaving only the output.
    let ok = run(&out, "logits");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(listing(&work), vec!["o.safetensors"]);
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["logits"].dims()[2], 512);
}

#[test]
fn bad_dtype_and_missing_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let llama = fixture("llama");
    let msg = fails(&nnscope(
        &[
            "run",
            s(&llama),
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&out),
            "--dtype",
            "fp8",
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["unknown --dtype `fp8`"]);
    let msg = fails(&nnscope(
        &["run", s(&llama), "--save", "logits", "--out", s(&out)],
        tmp.path(),
    ));
    assert_has(&msg, &["give --prompt TEXT or --inputs IDS.safetensors"]);
}

#[test]
fn writing_a_module_or_non_tensor_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let llama = fixture("llama");
    let msg = fails(&nnscope(
        &[
            "run",
            s(&llama),
            "--prompt",
            "hi",
            "--save",
            "layers.0",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["is a module, not a value", "`layers.0.output`"]);
    let msg = fails(&nnscope(
        &[
            "run",
            s(&llama),
            "--prompt",
            "hi",
            "--save",
            "attentions.0.source.hidden_states_dims3_0.output",
            "--out",
            s(&out),
        ],
        tmp.path(),
    ));
    assert_has(&msg, &["returns no tensor"]);
}

#[test]
fn hub_id_with_no_cache_configured() {
    let out = Command::new(env!("CARGO_BIN_EXE_nnscope"))
        .args(["source", "someone/tiny-model", "attentions.0"])
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env_remove("HOME")
        .env_remove("XDG_CACHE_HOME")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let msg = fails(&out);
    assert_has(&msg, &["no Hugging Face cache folder is known"]);
}
