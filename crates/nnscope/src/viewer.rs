//! Pictures of what a model does: a self-contained HTML page of attention patterns (in the spirit
//! of CircuitsVis) and PNG heatmaps with token labels on the axes.
//!
//! - [`attention_html`]: one page, script and style inline, no network: the tokens, a grid of
//!   every head's pattern per layer, a head selector, and hovering a token shows where it attends
//!   and from where. A sink column (GPT-OSS) is drawn apart from the key columns.
//! - [`heatmap_png`] / [`heatmaps_png`]: a [rows, cols] heatmap (or several side by side) with
//!   row and column labels, drawn with `plotters` and a bundled font (DejaVu Sans Mono,
//!   `assets/`), so it renders on a bare machine. Signed values get a diverging blue-white-red
//!   scale centred on zero; non-negative values a white-to-blue scale.

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// The font bundled for PNGs (DejaVu Sans Mono; license in `assets/DejaVuSansMono.LICENSE`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FONT_NAME: &str = "nnscope-mono";

/// One layer's attention pattern for the page.
#[derive(Debug, Clone)]
pub struct LayerPattern {
    /// The layer index.
    pub layer: usize,
    /// Probabilities [heads, queries, keys] (keys + 1 with a sink column, last).
    pub probs: Tensor,
}

fn rows2(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Escapes text for HTML and for a `<script>` block holding JSON (no `</script>` can appear).
fn json_for_script(v: &serde_json::Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page of attention patterns: `tokens` (one label per position), and per
/// layer the probabilities [heads, T, T] (or [heads, T, T + 1] when `sink` is set: the last
/// column is the sink, drawn apart). `title` heads the page. The page writes `ok: N patterns` into
/// its `#status` element once drawn (or the error), and holds one `canvas.pattern` per head and
/// layer, for tests and scripts.
pub fn attention_html(
    title: &str,
    tokens: &[String],
    layers: &[LayerPattern],
    sink: bool,
) -> Result<String> {
    let t = tokens.len();
    let mut jl = Vec::new();
    for lp in layers {
        let dims = lp.probs.dims().to_vec();
        let want_k = if sink { t + 1 } else { t };
        if dims.len() != 3 || dims[1] != t || dims[2] != want_k {
            return Err(Error::Input(format!(
                "layer {}: attention pattern has shape {dims:?}, expected [heads, {t}, {want_k}] for {t} tokens",
                lp.layer
            )));
        }
        let mut heads = Vec::new();
        for h in 0..dims[0] {
            let m = rows2(&lp.probs.get(h)?)?;
            // Rounded to 4 digits: the page stays small.
            let m: Vec<Vec<f64>> = m
                .iter()
                .map(|r| r.iter().map(|x| (*x as f64 * 1e4).round() / 1e4).collect())
                .collect();
            heads.push(m);
        }
        jl.push(serde_json::json!({"layer": lp.layer, "heads": heads}));
    }
    let data = serde_json::json!({"title": title, "tokens": tokens, "sink": sink, "layers": jl});
    Ok(PAGE
        .replace("{{TITLE}}", &html_escape(title))
        .replace("{{DATA}}", &json_for_script(&data)))
}

const PAGE: &str = r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px 0; }
#controls { margin: 8px 0; font-size: 14px; }
#tokens { margin: 8px 0 14px 0; line-height: 2.0; font-family: monospace; font-size: 14px; }
.tok { padding: 2px 3px; margin: 0 1px; border: 1px solid #ddd; border-radius: 3px; cursor: default; white-space: pre; }
.tok.hover { outline: 2px solid #222; }
.legend { font-size: 12px; color: #555; }
.layer { margin: 6px 0 12px 0; }
.layer h2 { font-size: 14px; margin: 4px 0; }
.heads { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; text-align: center; font-size: 11px; cursor: pointer; }
figure.selected canvas { outline: 3px solid #e4572e; }
canvas.pattern { border: 1px solid #bbb; image-rendering: pixelated; }
#status { font-size: 11px; color: #888; margin-top: 12px; }
</style></head><body>
<h1>{{TITLE}}</h1>
<div id="controls">layer <select id="layer"></select> head <select id="head"></select>
<span class="legend">hover a token: <span style="background:#fdae61">orange</span> = where it attends, <span style="background:#abd9e9">blue</span> = what attends to it (selected layer and head)</span></div>
<div id="tokens"></div>
<div id="grid"></div>
<div id="status">loading</div>
<script id="data" type="application/json">{{DATA}}</script>
<script>
(function () {
  var status = document.getElementById('status');
  window.onerror = function (m) { status.textContent = 'error: ' + m; };
  try {
    var D = JSON.parse(document.getElementById('data').textContent);
    var T = D.tokens.length, sink = D.sink;
    var layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
    var cur = { l: 0, h: 0 };
    D.layers.forEach(function (L, i) { var o = document.createElement('option'); o.value = i; o.textContent = L.layer; layerSel.appendChild(o); });
    var nh = D.layers.length ? D.layers[0].heads.length : 0;
    var avg = document.createElement('option'); avg.value = -1; avg.textContent = 'mean of heads'; headSel.appendChild(avg);
    for (var h = 0; h < nh; h++) { var o = document.createElement('option'); o.value = h; o.textContent = h; headSel.appendChild(o); }
    headSel.value = 0;
    function pattern(li, h) {
      var L = D.layers[li];
      if (h >= 0) return L.heads[h];
      var m = [];
      for (var q = 0; q < T; q++) { var r = []; for (var k = 0; k < L.heads[0][q].length; k++) { var s = 0; for (var j = 0; j < L.heads.length; j++) s += L.heads[j][q][k]; r.push(s / L.heads.length); } m.push(r); }
      return m;
    }
    var toks = document.getElementById('tokens'), spans = [];
    D.tokens.forEach(function (t, i) {
      var s = document.createElement('span'); s.className = 'tok'; s.textContent = t; s.title = 'position ' + i;
      s.onmouseenter = function () { hover(i); }; s.onmouseleave = function () { hover(-1); };
      toks.appendChild(s); spans.push(s);
    });
    function hover(i) {
      var p = pattern(cur.l, cur.h);
      spans.forEach(function (s, k) {
        s.classList.toggle('hover', k === i);
        if (i < 0) { s.style.background = ''; return; }
        var to = p[i][k], from = p[k][i], a = Math.max(to, from);
        s.style.background = to >= from ? 'rgba(253,174,97,' + Math.min(1, to * 1.5) + ')' : 'rgba(116,173,209,' + Math.min(1, from * 1.5) + ')';
        s.title = 'position ' + k + ': attends ' + (i >= k ? to.toFixed(3) : '-') + ' / attended ' + (k >= i ? from.toFixed(3) : '-');
      });
    }
    var cell = Math.max(3, Math.min(12, Math.floor(240 / Math.max(1, T))));
    function draw(c, m) {
      var gap = sink ? cell : 0, w = T * cell + (sink ? gap + cell : 0);
      c.width = w; c.height = T * cell;
      var g = c.getContext('2d');
      g.fillStyle = '#fff'; g.fillRect(0, 0, w, T * cell);
      for (var q = 0; q < T; q++) for (var k = 0; k < m[q].length; k++) {
        var v = m[q][k], x = k < T ? k * cell : T * cell + gap;
        g.fillStyle = 'rgba(33,102,172,' + Math.min(1, v) + ')';
        g.fillRect(x, q * cell, cell, cell);
      }
      if (sink) { g.fillStyle = '#eee'; g.fillRect(T * cell, 0, gap, T * cell); }
    }
    var grid = document.getElementById('grid'), figs = [], count = 0;
    D.layers.forEach(function (L, li) {
      var div = document.createElement('div'); div.className = 'layer';
      var h2 = document.createElement('h2'); h2.textContent = 'layer ' + L.layer + (sink ? '  (sink column at the right of each pattern)' : ''); div.appendChild(h2);
      var row = document.createElement('div'); row.className = 'heads';
      L.heads.forEach(function (m, h) {
        var f = document.createElement('figure'), c = document.createElement('canvas');
        c.className = 'pattern'; c.dataset.layer = L.layer; c.dataset.head = h;
        draw(c, m);
        var cap = document.createElement('figcaption'); cap.textContent = 'L' + L.layer + ' H' + h;
        f.appendChild(c); f.appendChild(cap);
        f.onclick = function () { cur.l = li; cur.h = h; layerSel.value = li; headSel.value = h; select(); };
        row.appendChild(f); figs.push({ f: f, l: li, h: h }); count++;
      });
      div.appendChild(row); grid.appendChild(div);
    });
    function select() {
      figs.forEach(function (x) { x.f.classList.toggle('selected', x.l === cur.l && (cur.h < 0 || x.h === cur.h)); });
    }
    layerSel.onchange = function () { cur.l = +layerSel.value; select(); };
    headSel.onchange = function () { cur.h = +headSel.value; select(); };
    select();
    status.textContent = 'ok: ' + count + ' patterns';
  } catch (e) { status.textContent = 'error: ' + e; }
})();
</script></body></html>
"#;

/// A heatmap PNG of `values` [rows, cols] with `row_labels` on the left, `col_labels` below
/// (rotated), a title and a colour bar. Signed values get a diverging scale centred on zero,
/// non-negative ones a white-to-blue scale. For `lens --png`, `patch --png` and `view --png`.
pub fn heatmap_png(
    values: &Tensor,
    row_labels: &[String],
    col_labels: &[String],
    title: &str,
    path: &Path,
) -> Result<()> {
    heatmaps_png(
        &[(String::new(), values.clone())],
        row_labels,
        col_labels,
        title,
        path,
    )
}

/// Several heatmaps of the same shape side by side (one per head, say), each with its own caption,
/// sharing the labels, one colour scale and a title.
pub fn heatmaps_png(
    panels: &[(String, Tensor)],
    row_labels: &[String],
    col_labels: &[String],
    title: &str,
    path: &Path,
) -> Result<()> {
    let Some((_, first)) = panels.first() else {
        return Err(Error::Input("a heatmap needs at least one panel".into()));
    };
    let (rows, cols) = first.dims2().map_err(|_| {
        Error::Input(format!(
            "a heatmap takes [rows, cols] values; got shape {:?}",
            first.dims()
        ))
    })?;
    let mut data = Vec::new();
    for (name, t) in panels {
        if t.dims() != [rows, cols] {
            return Err(Error::Input(format!(
                "heatmap panel `{name}` has shape {:?}, expected [{rows}, {cols}]",
                t.dims()
            )));
        }
        data.push(rows2(t)?);
    }
    if row_labels.len() != rows || col_labels.len() != cols {
        return Err(Error::Input(format!(
            "heatmap of [{rows}, {cols}] values got {} row labels and {} column labels",
            row_labels.len(),
            col_labels.len()
        )));
    }
    if rows == 0 || cols == 0 {
        return Err(Error::Input(
            "a heatmap needs at least one row and one column".into(),
        ));
    }
    let finite = data.iter().flatten().flatten().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
    let signed = lo < 0.0;
    let span = if signed { lo.abs().max(hi.abs()) } else { hi };
    let span = if span > 0.0 { span } else { 1.0 };
    let color = |v: f32| -> RGBColor {
        if !v.is_finite() {
            return RGBColor(160, 160, 160);
        }
        let mix = |a: (f32, f32, f32), b: (f32, f32, f32), t: f32| {
            let t = t.clamp(0.0, 1.0);
            RGBColor(
                (a.0 + (b.0 - a.0) * t) as u8,
                (a.1 + (b.1 - a.1) * t) as u8,
                (a.2 + (b.2 - a.2) * t) as u8,
            )
        };
        let white = (255.0, 255.0, 255.0);
        if signed {
            if v >= 0.0 {
                mix(white, (178.0, 24.0, 43.0), v / span)
            } else {
                mix(white, (33.0, 102.0, 172.0), -v / span)
            }
        } else {
            mix(white, (33.0, 102.0, 172.0), v / span)
        }
    };

    plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT)
        .map_err(|_| Error::Input("the bundled font cannot be read".into()))?;
    let font_px = 12.0;
    let char_w = 7.3f64;
    let trunc = |s: &str| -> String {
        let s: String = s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        // A token of spaces stays visible.
        let s = if s.trim().is_empty() {
            "␣".repeat(s.chars().count().max(1))
        } else {
            s
        };
        if s.chars().count() > 16 {
            s.chars().take(15).collect::<String>() + "…"
        } else {
            s
        }
    };
    let rl: Vec<String> = row_labels.iter().map(|s| trunc(s)).collect();
    let cl: Vec<String> = col_labels.iter().map(|s| trunc(s)).collect();
    let cell = (480 / rows.max(cols)).clamp(6, 36) as i32;
    let left =
        (rl.iter().map(|s| s.chars().count()).max().unwrap_or(1) as f64 * char_w) as i32 + 14;
    let bottom =
        (cl.iter().map(|s| s.chars().count()).max().unwrap_or(1) as f64 * char_w) as i32 + 14;
    let top = 44;
    let gap = 16;
    let panel_w = cols as i32 * cell;
    let n = panels.len() as i32;
    let bar = 70;
    let width = left + n * panel_w + (n - 1) * gap + bar + 10;
    let height = top + rows as i32 * cell + bottom;
    let (width, height) = (width.max(200) as u32, height.max(120) as u32);
    let area = BitMapBackend::new(path, (width, height)).into_drawing_area();
    let draw_err = |e: String| Error::Output {
        path: path.to_path_buf(),
        msg: format!("cannot draw the heatmap: {e}"),
    };
    area.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
    let text = |size: f64| TextStyle::from((FONT_NAME, size).into_font()).color(&BLACK);
    area.draw(&Text::new(title.to_string(), (10, 8), text(15.0)))
        .map_err(|e| draw_err(e.to_string()))?;
    for (p, ((name, _), m)) in panels.iter().zip(&data).enumerate() {
        let x0 = left + p as i32 * (panel_w + gap);
        if !name.is_empty() {
            area.draw(&Text::new(name.clone(), (x0, top - 16), text(font_px)))
                .map_err(|e| draw_err(e.to_string()))?;
        }
        for (r, row) in m.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let (x, y) = (x0 + c as i32 * cell, top + r as i32 * cell);
                area.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    color(*v).filled(),
                ))
                .map_err(|e| draw_err(e.to_string()))?;
            }
        }
        area.draw(&Rectangle::new(
            [(x0, top), (x0 + panel_w, top + rows as i32 * cell)],
            RGBColor(150, 150, 150).stroke_width(1),
        ))
        .map_err(|e| draw_err(e.to_string()))?;
        // Column labels, rotated, under each panel.
        let small = (cell as f64 * 0.9).clamp(7.0, font_px);
        for (c, l) in cl.iter().enumerate() {
            let x = x0 + c as i32 * cell + cell / 2;
            let style = text(small)
                .transform(FontTransform::Rotate90)
                .pos(Pos::new(HPos::Left, VPos::Center));
            area.draw(&Text::new(
                l.clone(),
                (x, top + rows as i32 * cell + 4),
                style,
            ))
            .map_err(|e| draw_err(e.to_string()))?;
        }
    }
    // Row labels, right-aligned against the first panel.
    let small = (cell as f64 * 0.9).clamp(7.0, font_px);
    for (r, l) in rl.iter().enumerate() {
        let y = top + r as i32 * cell + cell / 2;
        let style = text(small).pos(Pos::new(HPos::Right, VPos::Center));
        area.draw(&Text::new(l.clone(), (left - 6, y), style))
            .map_err(|e| draw_err(e.to_string()))?;
    }
    // Colour bar.
    let bx = left + n * panel_w + (n - 1) * gap + 14;
    let bh = (rows as i32 * cell).max(60);
    let steps = 50;
    for i in 0..steps {
        let f = 1.0 - i as f32 / (steps - 1) as f32;
        let v = if signed {
            -span + 2.0 * span * f
        } else {
            span * f
        };
        let y = top + i * bh / steps;
        area.draw(&Rectangle::new(
            [(bx, y), (bx + 12, top + (i + 1) * bh / steps)],
            color(v).filled(),
        ))
        .map_err(|e| draw_err(e.to_string()))?;
    }
    let fmt = |v: f32| format!("{v:.3}");
    let top_label = fmt(span);
    let bottom_label = if signed { fmt(-span) } else { fmt(0.0) };
    area.draw(&Text::new(top_label, (bx + 15, top), text(10.0)))
        .map_err(|e| draw_err(e.to_string()))?;
    area.draw(&Text::new(
        bottom_label,
        (bx + 15, top + bh - 10),
        text(10.0),
    ))
    .map_err(|e| draw_err(e.to_string()))?;
    area.present().map_err(|e| draw_err(e.to_string()))?;
    Ok(())
}
