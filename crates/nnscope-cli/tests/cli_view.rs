//! `nnscope view`: the attention page in a real headless browser (Chromium), and the PNG.
//!
//! Without a `chromium` (or `chromium-browser`) on PATH the browser checks fail when
//! `NNSCOPE_REQUIRE_BROWSER` or `CI` is set (`.ci/run` installs Chromium and sets it); elsewhere
//! they are skipped with a loud message on stderr.

use std::path::{Path, PathBuf};
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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nnscope-view-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn browser() -> Option<String> {
    for b in ["chromium", "chromium-browser"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
            .unwrap_or(false);
        if found {
            return Some(b.to_string());
        }
    }
    if std::env::var_os("NNSCOPE_REQUIRE_BROWSER").is_some() || std::env::var_os("CI").is_some() {
        panic!("chromium is not on PATH: the attention page cannot be tested (apt-get install chromium)");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: chromium is not on PATH, the attention page was NOT tested in a browser \
         (apt-get install chromium; CI sets NNSCOPE_REQUIRE_BROWSER=1 and fails instead) !!!!!!!!\n"
    );
    None
}

fn chromium(b: &str, args: &[&str], page: &Path) -> std::process::Output {
    // One profile per run: tests run in parallel, and Chromium locks its profile.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let profile = tmp(&format!("profile-{n}"));
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    Command::new(b)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}

/// Layers and heads of a fixture, from its config.
fn layers_heads(fx: &str) -> (usize, usize) {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&fixture(fx)).join("config.json")).unwrap(),
    )
    .unwrap();
    let get = |ks: &[&str]| ks.iter().find_map(|k| c[*k].as_u64()).unwrap() as usize;
    (
        get(&["num_hidden_layers", "n_layer"]),
        get(&["num_attention_heads", "n_head"]),
    )
}

fn check_page(fx: &str) {
    let d = tmp(fx);
    let page = d.join("attention.html");
    let png = d.join("heads.png");
    let o = nnscope(&[
        "view",
        &fixture(fx),
        "--prompt",
        "The quick brown fox jumps over the lazy dog",
        "--out",
        page.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: no external script, style, image or font.
    for bad in [
        "<script src",
        "<link",
        "http://",
        "https://",
        "@import",
        "url(",
    ] {
        assert!(
            !html.contains(bad),
            "{fx}: the page refers outside itself: {bad}"
        );
    }
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{fx}: not a PNG");
    let (layers, heads) = layers_heads(fx);
    let Some(b) = browser() else { return };
    let o = chromium(&b, &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&o.stdout);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{fx}: chromium failed: {log}");
    let want = format!("<div id=\"status\">ok: {} patterns</div>", layers * heads);
    assert!(
        dom.contains(&want),
        "{fx}: the page did not draw (want {want}); status: {:?}; log: {log}",
        dom.split("id=\"status\"")
            .nth(1)
            .map(|s| &s[..s.len().min(200)])
    );
    assert_eq!(
        dom.matches("class=\"pattern\"").count(),
        layers * heads,
        "{fx}: one canvas per head and layer"
    );
    for l in 0..layers {
        for h in 0..heads {
            assert!(
                dom.contains(&format!("data-layer=\"{l}\" data-head=\"{h}\"")),
                "{fx}: L{l} H{h}"
            );
        }
    }
    for bad in ["Uncaught", "SyntaxError", "TypeError", "ReferenceError"] {
        assert!(
            !log.contains(bad),
            "{fx}: script error in the console: {log}"
        );
    }
    let shot = d.join("screenshot.png");
    let o = chromium(
        &b,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,900",
            "--hide-scrollbars",
        ],
        &page,
    );
    assert!(
        o.status.success(),
        "{fx}: screenshot failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = std::fs::read(&shot).unwrap();
    assert!(
        s.len() > 5000 && &s[..8] == b"\x89PNG\r\n\x1a\n",
        "{fx}: empty screenshot"
    );
    eprintln!(
        "{fx}: page {}, screenshot {}, png {}",
        page.display(),
        shot.display(),
        png.display()
    );
}

#[test]
fn view_page_renders_in_a_browser_llama() {
    check_page("llama");
}

#[test]
fn view_page_renders_in_a_browser_gpt_oss_sink() {
    check_page("gpt_oss");
    let d = tmp("gpt_oss");
    let html = std::fs::read_to_string(d.join("attention.html")).unwrap();
    assert!(html.contains("\"sink\":true"));
}

#[test]
fn view_page_renders_in_a_browser_gpt2() {
    check_page("gpt2");
}

#[test]
fn view_errors() {
    let o = nnscope(&["view", &fixture("llama"), "--prompt", "x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out"));
    let out = tmp("err").join("a.html");
    let o = nnscope(&[
        "view",
        &fixture("llama"),
        "--prompt",
        "x",
        "--layers",
        "7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("layer 7 does not exist"));
    let o = nnscope(&[
        "view",
        &fixture("llama"),
        "--prompt",
        "x",
        "--layers",
        "-1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
