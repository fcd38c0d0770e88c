//! `nnscope::viewer`: PNG heatmaps and the attention page (the browser test is in the CLI's
//! `tests/cli_view.rs`).

use candle_core::{Device, Tensor};
use nnscope::viewer::{attention_html, heatmap_png, LayerPattern};

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn heatmap_png_writes_a_labelled_picture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.png");
    let v = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.0, 1.5, -0.25]], &Device::Cpu).unwrap();
    let rows = vec!["layer 0".to_string(), "layer 1".to_string()];
    let cols = vec!["The".to_string(), " quick".to_string(), " ".to_string()];
    heatmap_png(&v, &rows, &cols, "a signed heatmap", &path).unwrap();
    let (w, h) = png_size(&std::fs::read(&path).unwrap());
    assert!(w >= 200 && h >= 120, "{w}x{h}");
    // Wrong label counts and shapes are errors, not panics.
    let e = heatmap_png(&v, &rows[..1], &cols, "x", &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row labels"), "{e}");
    let v3 = Tensor::zeros((2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = heatmap_png(&v3, &rows, &cols, "x", &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[rows, cols]"), "{e}");
    let e = heatmap_png(&v, &rows, &cols, "x", &dir.path().join("no/such/dir.png"));
    assert!(e.is_err());
}

#[test]
fn attention_html_is_self_contained_and_checks_shapes() {
    let p = Tensor::new(&[[[1f32, 0.0], [0.25, 0.75]]], &Device::Cpu).unwrap();
    let toks = vec!["a".to_string(), "</script><b>".to_string()];
    let page = attention_html(
        "t <i>",
        &toks,
        &[LayerPattern {
            layer: 0,
            probs: p.clone(),
        }],
        false,
    )
    .unwrap();
    assert!(
        !page.contains("</script><b>"),
        "a token can close the script block"
    );
    assert!(page.contains("t &lt;i&gt;"));
    let e = attention_html("t", &toks, &[LayerPattern { layer: 0, probs: p }], true).unwrap_err();
    assert!(e.to_string().contains("expected [heads, 2, 3]"), "{e}");
}
