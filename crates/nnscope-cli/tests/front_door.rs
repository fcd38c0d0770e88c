//! What a new user meets: `--version`, completions, one line per saved tensor, usual file
//! permissions, `--out` never overwriting the model, one-line errors with `RUST_BACKTRACE=1`,
//! NaN warnings, and a hub id downloaded from a stand-in hub on 127.0.0.1 (HF_ENDPOINT,
//! HF_HOME's token file, --revision).

#[path = "../../nnscope/tests/hub_server/mod.rs"]
mod hub_server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(a: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(a)
}

const FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn copy_llama(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in FILES {
        std::fs::copy(fixture("llama").join(f), to.join(f)).unwrap();
    }
}

/// The binary with an empty, offline Hugging Face cache, backtraces on, umask 022.
fn nnscope(args: &[&str], home: &Path) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_nnscope"))
        .args(args)
        .env("HF_HOME", home.join("hf-home"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A clean one-line failure.
fn fails(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line expected: {e:?}");
    assert!(!e.contains("panicked") && !e.contains("backtrace"), "{e}");
    e.trim_end().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn version_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nnscope(&["--version"], tmp.path());
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("nnscope {}", env!("CARGO_PKG_VERSION"))
    );
    for (shell, marker) in [
        ("bash", "complete -F _nnscope"),
        ("zsh", "#compdef nnscope"),
        ("fish", "complete -c nnscope"),
    ] {
        let o = nnscope(&["completions", shell], tmp.path());
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("find-attn-probs") && text.contains("revision"),
            "{shell}"
        );
    }
}

#[test]
fn help_speaks_to_users() {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = String::new();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["find-attn-probs", "--help"],
        vec!["source", "--help"],
    ] {
        let o = nnscope(&args, tmp.path());
        assert!(o.status.success());
        all.push_str(&stdout(&o));
    }
    for word in ["seed", "shared/", "issue"] {
        assert!(
            !all.to_lowercase().contains(word),
            "`{word}` in help:\n{all}"
        );
    }
}

#[test]
fn run_prints_each_tensor_and_writes_a_normal_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = nnscope(
        &[
            "run",
            s(&fixture("llama")),
            "--prompt",
            "The quick brown fox",
            "--save",
            "layers_output.-1",
            "--save",
            "attention_probabilities.*",
            "--save",
            "logits",
            "--out",
            s(&out),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    let saved = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(lines.len(), saved.len(), "{lines:?}");
    let names = [
        "layers_output.-1",
        "attention_probabilities.0",
        "attention_probabilities.1",
        "logits",
    ];
    for (line, name) in lines.iter().zip(names) {
        assert_eq!(
            *line,
            format!("{name} {:?} float32", saved[name].dims()),
            "{lines:?}"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{mode:o}");
    }
}

#[test]
fn out_never_overwrites_a_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_llama(&model);
    let before: HashMap<&str, Vec<u8>> = FILES
        .iter()
        .map(|f| (*f, std::fs::read(model.join(f)).unwrap()))
        .collect();
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(model.join("model.safetensors"), &link).unwrap();
    let hard = tmp.path().join("hard.json");
    std::fs::hard_link(model.join("config.json"), &hard).unwrap();
    for out in [
        model.join("model.safetensors"),
        model.join("tokenizer.json"),
        link.clone(),
        hard.clone(),
    ] {
        let o = nnscope(
            &[
                "run",
                s(&model),
                "--prompt",
                "hi",
                "--save",
                "logits",
                "--out",
                s(&out),
            ],
            tmp.path(),
        );
        let msg = fails(&o);
        assert!(
            msg.contains("refusing to write") && msg.contains("would destroy"),
            "{msg}"
        );
    }
    for f in FILES {
        assert_eq!(
            std::fs::read(model.join(f)).unwrap(),
            before[f],
            "{f} changed"
        );
    }
    // A new file in the model's folder is fine.
    let o = nnscope(
        &[
            "run",
            s(&model),
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&model.join("acts.safetensors")),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn missing_tensor_is_one_line_with_rust_backtrace() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_llama(&model);
    // Drop one tensor from the checkpoint.
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
        .collect();
    let data = safetensors::serialize(kept, None).unwrap();
    std::fs::write(model.join("model.safetensors"), data).unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = nnscope(
        &[
            "run",
            s(&model),
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&out),
        ],
        tmp.path(),
    );
    let msg = fails(&o);
    assert!(
        msg.contains("missing tensor `model.layers.1.mlp.down_proj.weight`"),
        "{msg}"
    );
}

#[test]
fn non_finite_weights_and_values_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_llama(&model);
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    let mut data = view.data().to_vec();
    data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut all: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.dtype(), v.shape().to_vec()))
        .collect();
    for t in all.iter_mut() {
        if t.0 == name {
            t.1 = data.clone();
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = all
        .iter()
        .map(|(n, d, dt, sh)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        model.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = nnscope(
        &[
            "run",
            s(&model),
            "--prompt",
            "hi",
            "--save",
            "layers_input.0",
            "--save",
            "logits",
            "--out",
            s(&out),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("warning: weight `{name}`")) && e.contains("NaN or infinity"),
        "{e}"
    );
    assert!(e.contains("warning: saved value `logits` holds"), "{e}");
    // Values before the bad weight are finite: no warning for them.
    assert!(!e.contains("`layers_input.0`"), "{e}");
}

// ------------------------------------------------------------------ downloads through the CLI

fn hub_repo() -> hub_server::Repo {
    let commit_main = "3333333333333333333333333333333333333333";
    let commit_v2 = "4444444444444444444444444444444444444444";
    hub_server::Repo {
        files: FILES
            .iter()
            .map(|f| {
                (
                    f.to_string(),
                    std::fs::read(fixture("llama").join(f)).unwrap(),
                )
            })
            .collect(),
        revisions: [
            ("main", commit_main),
            (commit_main, commit_main),
            ("v2", commit_v2),
            (commit_v2, commit_v2),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        gated_token: Some("hf_cli_token".into()),
        corrupt: false,
    }
}

#[test]
fn run_downloads_a_hub_id_with_token_file_endpoint_and_revision() {
    let mut repos = HashMap::new();
    repos.insert("org/gated-llama".to_string(), hub_repo());
    let srv = hub_server::Server::start(repos);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("o.safetensors");
    let run = |token_file: bool, offline: bool| {
        if token_file {
            std::fs::create_dir_all(&home).unwrap();
            std::fs::write(home.join("token"), "hf_cli_token\n").unwrap();
        }
        let mut c = Command::new(env!("CARGO_BIN_EXE_nnscope"));
        c.args([
            "run",
            "org/gated-llama",
            "--revision",
            "v2",
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&out),
        ])
        .env("HF_ENDPOINT", &srv.url)
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env("HOME", tmp.path())
        .env("RUST_BACKTRACE", "1");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c.output().unwrap()
    };
    // Offline, nothing is fetched.
    let msg = fails(&run(false, true));
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(srv.log().is_empty());
    // Gated, no token: says how to get access.
    let msg = fails(&run(false, false));
    assert!(msg.contains("gated") && msg.contains("HF_TOKEN"), "{msg}");
    // With the token file in HF_HOME: downloaded at revision v2 into HF_HOME/hub.
    let o = run(true, false);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("logits [1, "), "{}", stdout(&o));
    let repo = home.join("hub/models--org--gated-llama");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v2")).unwrap(),
        "4444444444444444444444444444444444444444"
    );
    assert!(repo
        .join("snapshots/4444444444444444444444444444444444444444/model.safetensors")
        .is_file());
    // The output may not be a blob of the cache either.
    let blob = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 100_000)
        .unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_nnscope"));
    let o = c
        .args([
            "run",
            "org/gated-llama",
            "--revision",
            "v2",
            "--prompt",
            "hi",
            "--save",
            "logits",
            "--out",
            s(&blob),
        ])
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let msg = fails(&o);
    assert!(msg.contains("refusing to write"), "{msg}");
}
