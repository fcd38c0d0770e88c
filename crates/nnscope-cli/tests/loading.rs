//! Loading through the CLI: a hub id from a local Hugging Face cache, and bfloat16 weights with
//! `--dtype bfloat16` (moved here from the library's tests to use the binary cargo builds for them).
#[path = "../../nnscope/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device};
use common::*;
use nnscope::{LoadOptions, Model};
use std::path::PathBuf;
use std::process::Command;

fn cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nnscope"))
}

// MODEL as a hub id, found offline in a local cache laid out like huggingface_hub's
// (models--org--name/snapshots/<rev>, refs/main). HF_HUB_CACHE is set for the child process only:
// other tests of this process run concurrently.
#[test]
fn hub_id_from_local_cache() {
    let g = common::golden("llama");
    let tmp = TempDir::new("hub");
    let cache = tmp.0.join("hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--tiny-org--tiny-llama");
    copy_files(
        &common::fixture("llama"),
        &repo.join("snapshots").join(rev),
        LLAMA_FILES,
    );
    // A stale snapshot that refs/main does not point at: it must not be picked.
    std::fs::create_dir_all(repo.join("snapshots/ffffffffffffffffffffffffffffffffffffffff"))
        .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let inputs = tmp.0.join("ids.safetensors");
    write_inputs(&g, &inputs);
    let out = tmp.0.join("out.safetensors");
    let run = |model: &str| {
        Command::new(cli())
            .args(["run", model, "--inputs"])
            .arg(&inputs)
            .args(["--save", "logits", "--out"])
            .arg(&out)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HOME")
            .env("HOME", &tmp.0)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = run("tiny-org/tiny-llama");
    assert!(
        o.status.success(),
        "nnscope run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let saved = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mask = g.t["single.attention_mask"].clone();
    common::assert_hidden("hub.logits", &saved["logits"], &g.t["single.logits"], &mask);
    // An id that is not in the cache is a one-line error (offline: no download).
    let o = run("tiny-org/absent");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tiny-org/absent"), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");
}

// Weights converted to bfloat16 in a temp dir and loaded with float32 compute. They round exactly as
// torch's conversion did for tests/fixtures/llama_bf16, so the float32 tolerances of that golden apply
// (1e-4 * max |ref| for logits): the weights are the same numbers, only the file differs. Against the
// float32 golden of the unrounded weights the logits move by about 0.15 (of |logit| <= 7), which is
// bfloat16's 8-bit mantissa (2^-9 relative per weight) amplified by the sharp attention of these
// random weights; transformers moves by the same amount on the same rounded weights.
#[test]
fn bfloat16_weights() {
    let tmp = TempDir::new("bf16");
    let dir = bf16_copy(&tmp);
    let ours_w =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let torch_w = candle_core::safetensors::load(
        common::fixture("llama_bf16").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours_w.len(), torch_w.len());
    for (k, v) in &ours_w {
        assert_eq!(v.dtype(), DType::BF16);
        assert_eq!(
            max_diff(v, &torch_w[k]),
            0.0,
            "{k}: bf16 rounding differs from torch's"
        );
    }
    let g = common::golden("llama_bf16");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(model.dtype, DType::F32);
    let ours = logits(&model, &g);
    assert_eq!(ours.dtype(), DType::F32);
    let mask = g.t["single.attention_mask"].clone();
    common::assert_hidden(
        "bf16 weights, f32 compute: logits",
        &ours,
        &g.t["single.logits"],
        &mask,
    );

    // bfloat16 compute through the CLI: runs, writes float32, finite and near the golden. Activations
    // round to 8 bits at every op through 2 layers (measured: max |diff| ~0.5 for |logit| <= 7), so
    // this is a sanity bound (15% of the logit scale), not parity.
    let reference = &g.t["single.logits"];
    let inputs = tmp.0.join("ids.safetensors");
    write_inputs(&g, &inputs);
    let out = tmp.0.join("out.safetensors");
    let o = Command::new(cli())
        .args([
            "run",
            dir.to_str().unwrap(),
            "--dtype",
            "bfloat16",
            "--inputs",
        ])
        .arg(&inputs)
        .args(["--save", "logits", "--save", "layers_output.*", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nnscope run --dtype bfloat16 failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let saved = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let l = &saved["logits"];
    assert_eq!(l.dtype(), DType::F32);
    assert_eq!(l.dims(), reference.dims());
    assert!(saved.contains_key("layers_output.1"));
    let d = max_diff(l, reference);
    eprintln!("bf16 compute: max |logit - golden| = {d}");
    let tol = 0.15 * max_abs(reference).max(1.0);
    assert!(
        d.is_finite() && d <= tol,
        "bf16 compute: max logit diff {d} > {tol}"
    );
}
