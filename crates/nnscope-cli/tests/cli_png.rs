//! `--png` on `lens` and `patch`: real PNG files with the expected panels.
use std::path::PathBuf;
use std::process::Command;

fn fixture(a: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(a)
        .to_string_lossy()
        .into_owned()
}

fn nnscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nnscope"))
        .args(args)
        .output()
        .expect("run nnscope")
}

fn assert_png(p: &std::path::Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        p.display()
    );
    // A picture with axes, labels and a colour bar, not an empty canvas.
    assert!(
        bytes.len() > 4000,
        "{}: only {} bytes",
        p.display(),
        bytes.len()
    );
}

#[test]
fn lens_and_patch_draw_heatmaps() {
    let d = std::env::temp_dir().join(format!("nnscope-cli-png-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let lens = d.join("lens.png");
    let o = nnscope(&[
        "lens",
        &fixture("gpt2"),
        "--prompt",
        "The quick brown fox jumps over the lazy",
        "--png",
        lens.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_png(&lens);
    let patch = d.join("patch.png");
    let o = nnscope(&[
        "patch",
        &fixture("llama"),
        "--clean",
        "The quick brown fox jumps over the lazy",
        "--corrupt",
        "The quick brown box jumps over the lazy",
        "--answer",
        " dog",
        "--wrong",
        " cat",
        "--heads",
        "--png",
        patch.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_png(&patch);
    assert_png(&d.join("patch_heads.png"));
    // A picture in a folder that does not exist fails before the model runs, in one line.
    let o = nnscope(&[
        "lens",
        &fixture("gpt2"),
        "--prompt",
        "Hi",
        "--png",
        d.join("missing/x.png").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(&d);
}
