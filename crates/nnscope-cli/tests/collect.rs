//! `nnscope collect` as a process: a real SIGKILL mid-run leaves only complete shards and the rerun
//! resumes to the same result as an uninterrupted run; N processes with `--shard I/N` and
//! `--merge` equal one unsplit run; refusals are one line.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(a: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(a)
        .display()
        .to_string()
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nnscope"));
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "1");
    c
}

fn run(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A JSON Lines corpus of `n` documents of 20-80 tokens.
fn corpus(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "Free",
        "software",
        "runs",
        "everywhere",
        "today",
    ];
    let mut s = String::new();
    for i in 0..n {
        let len = 20 + (i * 37) % 60;
        let text: Vec<&str> = (0..len)
            .map(|k| words[(i * 7 + k * 11) % words.len()])
            .collect();
        s.push_str(&serde_json::json!({"id": i, "text": text.join(" ")}).to_string());
        s.push('\n');
    }
    let p = dir.join("corpus.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn parts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("part-") && n.ends_with(".safetensors")
        })
        .collect();
    v.sort();
    v
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Every part of a folder (in manifest order), concatenated per tensor (offsets left out).
fn read_all(dir: &Path) -> HashMap<String, Tensor> {
    let m = manifest(dir);
    assert_eq!(m["finished"], true, "{}", dir.display());
    let mut acc: HashMap<String, Vec<Tensor>> = HashMap::new();
    for p in m["parts"].as_array().unwrap() {
        let f = dir.join(p["file"].as_str().unwrap());
        for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu).unwrap() {
            if k != "document_offsets" {
                acc.entry(k).or_default().push(v);
            }
        }
    }
    acc.into_iter()
        .map(|(k, v)| (k, Tensor::cat(&v, 0).unwrap()))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let m = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (m(&(&a - &b).unwrap()), m(&b))
}

/// Waits until `path` exists (or the child exits), then SIGKILLs the child.
fn kill_when(child: &mut std::process::Child, path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the run ended ({st}) before {} appeared", path.display());
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let st = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9), "{st}");
    }
}

/// After a kill: every part file present is complete and readable, the manifest parses and lists
/// only existing parts, and the run is not marked finished.
fn only_complete_parts(dir: &Path, shard_docs: usize) -> usize {
    let m = manifest(dir);
    assert_eq!(m["finished"], false);
    for p in m["parts"].as_array().unwrap() {
        assert!(dir.join(p["file"].as_str().unwrap()).is_file());
    }
    let files = parts(dir);
    assert!(!files.is_empty());
    for f in &files {
        let t = candle_core::safetensors::load(f, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(t["document_index"].dims(), &[shard_docs], "{}", f.display());
        let offs: Vec<i64> = t["document_offsets"].to_vec1().unwrap();
        assert_eq!(t["layers_output.1"].dims()[0] as i64, *offs.last().unwrap());
    }
    m["parts"].as_array().unwrap().len()
}

#[test]
fn sigkill_mid_run_then_resume_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path(), 500);
    let data = data.to_str().unwrap();
    let llama = fixture("llama");
    let args = |out: &str| -> Vec<String> {
        [
            "collect",
            &llama,
            "--dataset",
            data,
            "--save",
            "layers_output.*",
            "--save",
            "logits",
            "--positions",
            "all",
            "--batch-size",
            "2",
            "--shard-docs",
            "4",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let killed = tmp.path().join("killed");
    let k = killed.to_str().unwrap();
    let a = args(k);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();

    // Kill as soon as the first shard appears.
    let mut child = cmd(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_when(&mut child, &killed.join("part-00000.safetensors"));
    only_complete_parts(&killed, 4);

    // Resume, and kill again further on.
    let mut child = cmd(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_when(&mut child, &killed.join("part-00020.safetensors"));
    let listed = only_complete_parts(&killed, 4);
    assert!(listed >= 20, "{listed}");

    // Resume to the end.
    let s = ok(&a);
    assert!(s.contains("500 documents"), "{s}");
    assert!(s.contains("shards were already complete"), "{s}");

    let whole = tmp.path().join("whole");
    let b = args(whole.to_str().unwrap());
    let b: Vec<&str> = b.iter().map(|s| s.as_str()).collect();
    ok(&b);
    let (x, y) = (read_all(&killed), read_all(&whole));
    assert_eq!(x.len(), y.len());
    for (k, v) in &y {
        // Same batches, same order: bit for bit.
        assert_eq!(max_diff(&x[k], v).0, 0.0, "{k}");
    }
    assert_eq!(parts(&killed).len(), 125);
    // Nothing but the parts and the manifest.
    assert_eq!(std::fs::read_dir(&killed).unwrap().count(), 126);
}

#[test]
fn shards_in_separate_processes_merge_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path(), 60);
    let data = data.to_str().unwrap();
    let gpt2 = fixture("gpt2");
    let base = [
        "collect",
        &gpt2,
        "--dataset",
        data,
        "--save",
        "layers_output.-1",
        "--save",
        "logits",
        "--positions",
        "last",
        "--batch-size",
        "4",
        "--shard-docs",
        "7",
    ];
    let whole = tmp.path().join("whole");
    let mut a = base.to_vec();
    a.extend(["--out", whole.to_str().unwrap()]);
    ok(&a);

    let n = 3;
    let dirs: Vec<String> = (0..n)
        .map(|i| tmp.path().join(format!("shard{i}")).display().to_string())
        .collect();
    let specs: Vec<String> = (0..n).map(|i| format!("{i}/{n}")).collect();
    let children: Vec<_> = (0..n)
        .map(|i| {
            let mut a = base.to_vec();
            a.extend(["--shard", &specs[i], "--out", &dirs[i]]);
            cmd(&a)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let merged = tmp.path().join("merged");
    let mut a = vec!["collect", "--merge"];
    a.extend(dirs.iter().rev().map(|s| s.as_str()));
    a.extend(["--out", merged.to_str().unwrap()]);
    let s = ok(&a);
    assert!(s.contains("60 documents"), "{s}");
    let m = manifest(&merged);
    assert_eq!(m["shard"], serde_json::Value::Null);
    assert_eq!(m["documents"], 60);

    let (x, y) = (read_all(&merged), read_all(&whole));
    assert_eq!(x.len(), y.len());
    for (k, v) in &y {
        assert_eq!(x[k].dims(), v.dims(), "{k}");
        let (d, scale) = max_diff(&x[k], v);
        assert!(d <= 1e-4 * scale.max(1.0), "{k}: {d}");
    }

    // Merging into a folder that holds a collection, or a set of different jobs: refused.
    let mut a = vec!["collect", "--merge"];
    a.extend(dirs.iter().map(|s| s.as_str()));
    a.extend(["--out", merged.to_str().unwrap()]);
    let o = run(&a);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("already holds a collection"), "{e}");
}

#[test]
fn refusals_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path(), 5);
    let data = data.to_str().unwrap();
    let llama = fixture("llama");
    let out = tmp.path().join("o");
    let out = out.to_str().unwrap();
    ok(&[
        "collect",
        &llama,
        "--dataset",
        data,
        "--save",
        "layers_output.0",
        "--out",
        out,
    ]);
    let in_model = format!("{llama}/acts");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "layers_output.1",
                "--out",
                out,
            ],
            "different saves",
        ),
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "layers_output.0",
                "--out",
                out,
                "--positions",
                "mean",
            ],
            "different positions",
        ),
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "layers_outptu.0",
                "--out",
                "x",
            ],
            "did you mean `layers_output`",
        ),
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "layers_output.0",
                "--out",
                &in_model,
            ],
            "model's folder",
        ),
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "logits",
                "--shard",
                "3/3",
                "--out",
                "x",
            ],
            "I/N",
        ),
        (
            vec![
                "collect",
                &llama,
                "--dataset",
                data,
                "--save",
                "logits",
                "--positions",
                "first",
                "--out",
                "x",
            ],
            "all, last or mean",
        ),
    ];
    for (a, want) in cases {
        let o = run(&a);
        assert!(!o.status.success(), "{a:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.trim_end().lines().count(), 1, "{a:?}: {e}");
        assert!(e.contains(want), "{a:?}: {e}");
    }
    assert!(!Path::new(&format!("{llama}/acts")).exists());
    assert!(!Path::new("x").exists());
}
