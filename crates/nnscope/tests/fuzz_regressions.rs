//! Replays the fuzz harnesses (fuzz/src/lib.rs) on the seed inputs (fuzz/seeds/<target>/) and on
//! every crash input the fuzzers found (fuzz/regressions/<target>/), so that a fixed crash stays
//! fixed without nightly or cargo-fuzz. A panic in a harness fails the test.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for p in files {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{target}: {} panics", p.display());
            n += 1;
        }
    }
    eprintln!("{target}: replayed {n} inputs");
}

#[test]
fn config() {
    replay("config", harness::config);
}

#[test]
fn safetensors() {
    replay("safetensors", harness::safetensors);
    // The fixtures' own weights are the safetensors seeds.
    for arch in ["llama", "gpt2"] {
        harness::safetensors(
            &std::fs::read(harness::fixtures().join(arch).join("model.safetensors")).unwrap(),
        );
    }
}

#[test]
fn index() {
    replay("index", harness::index);
}

#[test]
fn hookpoint() {
    replay("hookpoint", harness::hookpoint);
}

#[test]
fn prompt() {
    replay("prompt", harness::prompt);
}

#[test]
fn config_edits() {
    replay("config_edits", harness::config_edits);
}
