//! Per-head standard names (`heads.L`, `queries.L`, `keys.L`, `values.L`), save patterns and
//! `save_all`, on every fixture in tests/fixtures.
//!
//! What is checked against what (no golden from transformers is used here):
//! - shapes: heads [B, T, H, D], queries [B, H, T, D], keys and values [B, KV, T, D];
//! - values and heads against the attention probabilities the registry's hookpoint gives (checked
//!   against transformers' goldens in `standard.rs`): heads[b, t, h] = sum_k probs[b, h, t, k] *
//!   values[b, h / group, k] (the first K columns with a sink column);
//! - queries and keys against the probabilities (not against transformers' q/k directly): in every
//!   row with 3 or more keys, log probs = s * (q . k) + a_h * k + c_row, with one scale s > 0 per
//!   layer (and, for BLOOM only, one ALiBi slope a_h per head), fitted by least squares over all
//!   rows, and the residual near zero: softmax(queries . keys) reproduces the probabilities
//!   (Gemma 2: with its soft-capping of the scores applied to queries . keys first);
//! - writes: every head of `heads.L` written = the projection's input written with the same
//!   values; all heads of layer L patched from another prompt = `attentions_output.L` patched
//!   (logits equal; DBRX: its inner `attn` output; BLOOM, whose attention adds the residual: its
//!   output equal up to the residual); zero values make zero heads.
mod common;

use candle_core::{DType, IndexOp, Tensor};
use nnscope::{Input, Model};

/// Model types without per-head rows yet: their fixtures check the error instead.
const NOT_REGISTERED: &[&str] = &[];

fn fixture_type(fx: &str) -> String {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(fx).join("config.json")).unwrap(),
    )
    .unwrap();
    c["model_type"].as_str().unwrap().to_string()
}

/// Fixtures of model types with per-head rows; for the others, the clear error is checked here.
fn fixtures() -> Vec<String> {
    let mut v = Vec::new();
    for fx in all_fixtures() {
        let t = fixture_type(&fx);
        if NOT_REGISTERED.contains(&t.as_str()) {
            let model = common::load(&fx);
            let e = match model.trace(Input::prompts(&["a b"])).save("heads.0") {
                Ok(_) => panic!("{fx}: heads.0 resolved without a per-head row"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("per-head names are not registered for model_type"),
                "{fx}: {e}"
            );
            eprintln!("NOTE: {fx} ({t}): per-head names not registered; only the error is checked");
        } else {
            v.push(fx);
        }
    }
    v
}

fn all_fixtures() -> Vec<String> {
    let dir = common::fixture("");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path().join("config.json").is_file() && e.path().join("golden.safetensors").is_file()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    assert!(v.len() >= 8, "fixtures missing in {}", dir.display());
    v
}

fn f32v(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (f32v(a), f32v(b));
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The tolerance for a comparison in the model's own dtype.
fn tol(model: &Model, f32_tol: f32) -> f32 {
    let name = model.source.file_name().unwrap().to_string_lossy();
    if name.contains("bf16") || name.contains("f16") {
        2e-2
    } else {
        f32_tol
    }
}

#[test]
fn per_head_shapes_values_and_heads_match_probabilities() {
    for fx in fixtures() {
        let model = common::load(&fx);
        let d = model.dims();
        let ids = common::golden_path_ids(&model);
        let (b, t) = ids.dims2().unwrap();
        let mut tr = model.trace(Input::ids(ids.clone()));
        for name in [
            "heads",
            "queries",
            "keys",
            "values",
            "attention_probabilities",
        ] {
            tr = tr.save(&format!("{name}.*")).unwrap();
        }
        let out = tr.run().unwrap();
        let mut fitted = 0;
        // ALiBi adds a per-head slope times the key position (Falcon's `alibi: true` too).
        let alibi = model.arch.model_type == "bloom"
            || (model.arch.model_type == "falcon"
                && model
                    .config
                    .raw
                    .get("alibi")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false));
        for l in 0..d.layers {
            let g = |n: &str| {
                out.get(&format!("{n}.{l}"))
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let (heads, q, k, v, p) = (
                g("heads"),
                g("queries"),
                g("keys"),
                g("values"),
                g("attention_probabilities"),
            );
            assert_eq!(heads.dims(), [b, t, d.heads, d.head_dim], "{fx} heads.{l}");
            assert_eq!(q.dims(), [b, d.heads, t, d.head_dim], "{fx} queries.{l}");
            assert_eq!(k.dims(), [b, d.kv_heads, t, d.head_dim], "{fx} keys.{l}");
            assert_eq!(v.dims(), [b, d.kv_heads, t, d.head_dim], "{fx} values.{l}");
            // heads = probs . values (per key/value group).
            let p = p.narrow(3, 0, t).unwrap();
            let group = d.heads / d.kv_heads;
            let v_rep = v
                .unsqueeze(2)
                .unwrap()
                .expand((b, d.kv_heads, group, t, d.head_dim))
                .unwrap()
                .reshape((b, d.heads, t, d.head_dim))
                .unwrap();
            let want = p
                .matmul(&v_rep.contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let e = rel_diff(&heads, &want.contiguous().unwrap());
            assert!(
                e < tol(&model, 1e-4),
                "{fx} layer {l}: heads vs probs . values: {e}"
            );
            // log probs = s * q.k + a * k + c per row, with one s per layer.
            let k_rep = k
                .unsqueeze(2)
                .unwrap()
                .expand((b, d.kv_heads, group, t, d.head_dim))
                .unwrap()
                .reshape((b, d.heads, t, d.head_dim))
                .unwrap();
            let scores = q
                .matmul(&k_rep.transpose(2, 3).unwrap().contiguous().unwrap())
                .unwrap();
            let (mut sv, pv) = (f32v(&scores), f32v(&p));
            // Gemma 2 soft-caps the scaled scores: cap * tanh(s * q.k / cap), s =
            // query_pre_attn_scalar^-0.5 (defaults 50 and 256); the fit then finds scale 1.
            if model.arch.model_type == "gemma2" {
                let raw = &model.config.raw;
                let cap = match raw.get("attn_logit_softcapping") {
                    Some(serde_json::Value::Null) => None,
                    Some(v) => v.as_f64(),
                    None => Some(50.0),
                };
                if let Some(cap) = cap {
                    let q = raw
                        .get("query_pre_attn_scalar")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(256.0);
                    let sc = q.powf(-0.5);
                    for x in sv.iter_mut() {
                        *x = (cap * ((*x as f64) * sc / cap).tanh()) as f32;
                    }
                }
            }
            // Rows centred (their softmax normaliser cancels); one scale for the layer, and with
            // ALiBi one slope per head, fitted by least squares over every row.
            let ncol = if alibi { 1 + d.heads } else { 1 };
            let mut rows: Vec<(Vec<f64>, f64)> = Vec::new();
            for row in 0..b * d.heads * t {
                let head = (row / t) % d.heads;
                let base = row * t;
                let keys: Vec<usize> = (0..t).filter(|&kk| pv[base + kk] > 1e-12).collect();
                if keys.len() < 3 {
                    continue;
                }
                let n = keys.len() as f64;
                let mx = keys.iter().map(|&kk| sv[base + kk] as f64).sum::<f64>() / n;
                let mk = keys.iter().map(|&kk| kk as f64).sum::<f64>() / n;
                let mz = keys
                    .iter()
                    .map(|&kk| (pv[base + kk] as f64).ln())
                    .sum::<f64>()
                    / n;
                for &kk in &keys {
                    let mut r = vec![0f64; ncol];
                    r[0] = sv[base + kk] as f64 - mx;
                    if alibi {
                        r[1 + head] = kk as f64 - mk;
                    }
                    rows.push((r, (pv[base + kk] as f64).ln() - mz));
                }
            }
            if rows.is_empty() {
                continue; // a short sliding window: no row with 3 keys in this layer
            }
            fitted += 1;
            let sol = least_squares(&rows, ncol);
            let spread = rows.iter().fold(0f64, |m, (_, z)| m.max(z.abs()));
            let resid = rows
                .iter()
                .map(|(r, z)| (r.iter().zip(&sol).map(|(a, b)| a * b).sum::<f64>() - z).abs())
                .fold(0f64, f64::max);
            assert!(sol[0] > 0.0, "{fx} layer {l}: fitted scale {}", sol[0]);
            let allowed = tol(&model, 1e-4) as f64 * spread.max(1.0);
            assert!(
                resid < allowed,
                "{fx} layer {l}: softmax(q.k) vs probabilities: residual {resid} (scale {}, spread {spread})",
                sol[0]
            );
        }
        assert!(fitted > 0, "{fx}: no row with 3 keys to fit");
    }
}

#[allow(clippy::needless_range_loop)]
/// Least squares: the coefficients minimising sum (r . c - z)^2 (normal equations).
fn least_squares(rows: &[(Vec<f64>, f64)], n: usize) -> Vec<f64> {
    let mut m = vec![vec![0f64; n + 1]; n];
    for (r, z) in rows {
        for i in 0..n {
            for j in 0..n {
                m[i][j] += r[i] * r[j];
            }
            m[i][n] += r[i] * z;
        }
    }
    for c in 0..n {
        let piv = (c..n)
            .max_by(|a, b| m[*a][c].abs().total_cmp(&m[*b][c].abs()))
            .unwrap();
        m.swap(c, piv);
        if m[c][c] == 0.0 {
            continue;
        }
        for r in 0..n {
            if r != c {
                let f = m[r][c] / m[c][c];
                for j in c..=n {
                    m[r][j] -= f * m[c][j];
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if m[i][i] == 0.0 {
                0.0
            } else {
                m[i][n] / m[i][i]
            }
        })
        .collect()
}

/// A second input of the same length: the golden ids reversed.
fn other_ids(ids: &Tensor) -> Tensor {
    let v: Vec<Vec<u32>> = ids.to_dtype(DType::U32).unwrap().to_vec2().unwrap();
    let r: Vec<Vec<u32>> = v
        .into_iter()
        .map(|row| row.into_iter().rev().collect())
        .collect();
    Tensor::new(r, ids.device())
        .unwrap()
        .to_dtype(ids.dtype())
        .unwrap()
}

#[test]
fn per_head_writes() {
    for fx in fixtures() {
        let model = common::load(&fx);
        let d = model.dims();
        let a_ids = common::golden_path_ids(&model);
        let b_ids = other_ids(&a_ids);
        let bloom = model.arch.model_type == "bloom";
        let post_ln = model
            .config
            .raw
            .get("apply_residual_connection_post_layernorm")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let l = d.layers - 1;
        // DBRX's `attentions.L` (norm_attn_norm) adds the residual and norms it: its inner `attn`
        // is the attention output.
        let attn_out = if model.arch.model_type == "dbrx" {
            format!("{}.attn.output", model.names().attention_path(l))
        } else {
            format!("attentions_output.{l}")
        };
        let resid = if bloom && post_ln {
            format!("attentions_input.{l}")
        } else {
            format!("layers_input.{l}")
        };
        let a = model
            .trace(Input::ids(a_ids.clone()))
            .save(&format!("heads.{l}"))
            .unwrap()
            .save(&attn_out)
            .unwrap()
            .save(&resid)
            .unwrap()
            .run()
            .unwrap();
        let heads_a = a.get(&format!("heads.{l}")).unwrap().clone();
        let out_a = a.get(&attn_out).unwrap().clone();
        // All heads patched from A into B.
        let p1 = model
            .trace(Input::ids(b_ids.clone()))
            .set(&format!("heads.{l}"), heads_a.clone())
            .unwrap()
            .save(&attn_out)
            .unwrap()
            .save(&resid)
            .unwrap()
            .run()
            .unwrap();
        let out_p1 = p1.get(&attn_out).unwrap();
        if bloom {
            // The attention adds its residual: out = residual + dense(heads).
            let want =
                ((&out_a - a.get(&resid).unwrap()).unwrap() + p1.get(&resid).unwrap()).unwrap();
            let e = rel_diff(out_p1, &want);
            assert!(
                e < tol(&model, 1e-5),
                "{fx}: heads patched vs attention output: {e}"
            );
        } else {
            let p2 = model
                .trace(Input::ids(b_ids.clone()))
                .set(&attn_out, out_a.clone())
                .unwrap()
                .run()
                .unwrap();
            let e = rel_diff(out_p1, &out_a);
            assert!(
                e < tol(&model, 1e-5),
                "{fx}: heads patched vs attention output: {e}"
            );
            let e = rel_diff(p1.logits.as_ref().unwrap(), p2.logits.as_ref().unwrap());
            assert!(
                e < tol(&model, 1e-5),
                "{fx}: logits, heads vs attentions_output patched: {e}"
            );
        }
        // Writing heads.L = writing the projection's input (the registered hookpoint) viewed back.
        let row = nnscope::models::per_head(model.arch.model_type).unwrap();
        let under = format!("{}.{}", model.names().attention_path(l), row.heads[0]);
        let (bb, t, h, hd) = heads_a.dims4().unwrap();
        let r = Tensor::randn(0f32, 1f32, (bb, t, h, hd), &model.device).unwrap();
        let x = model
            .trace(Input::ids(b_ids.clone()))
            .set(&format!("heads.{l}"), r.clone())
            .unwrap()
            .run()
            .unwrap();
        let y = model
            .trace(Input::ids(b_ids.clone()))
            .set(&under, r.reshape((bb, t, h * hd)).unwrap())
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(
            rel_diff(x.logits.as_ref().unwrap(), y.logits.as_ref().unwrap()),
            0.0,
            "{fx}: heads.{l} write vs {under}"
        );
        // Edit one head through the view: only that head changes, rows scoped.
        let e = model
            .trace(Input::ids(b_ids.clone()))
            .edit(&format!("heads.{l}"), move |x| {
                let z = x.i((.., .., 0..1, ..))?.zeros_like()?;
                Tensor::cat(&[&z, &x.i((.., .., 1.., ..))?], 2)
            })
            .unwrap()
            .save(&format!("heads.{l}"))
            .unwrap()
            .run()
            .unwrap();
        let hz = e.get(&format!("heads.{l}")).unwrap();
        assert_eq!(
            f32v(&hz.i((.., .., 0, ..)).unwrap())
                .iter()
                .map(|x| x.abs())
                .sum::<f32>(),
            0.0
        );
        // Zero values make zero heads; zero queries change the probabilities.
        let z = model
            .trace(Input::ids(b_ids.clone()))
            .edit(&format!("values.{l}"), |v| v.zeros_like())
            .unwrap()
            .edit(&format!("queries.{l}"), |q| q.zeros_like())
            .unwrap()
            .edit(&format!("keys.{l}"), |k| k.affine(2.0, 0.0))
            .unwrap()
            .save(&format!("heads.{l}"))
            .unwrap()
            .run()
            .unwrap();
        let hsum: f32 = f32v(z.get(&format!("heads.{l}")).unwrap())
            .iter()
            .map(|x| x.abs())
            .sum();
        assert_eq!(hsum, 0.0, "{fx}: zero values.{l} gave nonzero heads");
    }
}

#[test]
fn per_head_names_unregistered_error() {
    // A model type without a per-head row: a clear error naming it.
    let mut types = nnscope::standard::per_head_model_types();
    types.sort();
    for a in nnscope::models::ARCHITECTURES {
        if NOT_REGISTERED.contains(&a.model_type) {
            assert!(!types.contains(&a.model_type));
            continue;
        }
        assert!(
            types.contains(&a.model_type),
            "per-head names missing for {}",
            a.model_type
        );
    }
}

#[test]
fn patterns_and_save_all() {
    let model = common::load("llama");
    let ids = common::golden_path_ids(&model);
    let all = model.hookpoints().unwrap();
    assert!(all.contains(&"model.layers.0.self_attn.source.attention_interface_0.source.nn_functional_dropout_0.output".to_string()));
    assert!(all.contains(&"model.layers.1.mlp.down_proj.input".to_string()));
    let out = model
        .trace(Input::ids(ids.clone()))
        .save("model.layers.*.self_attn.**")
        .unwrap()
        .run()
        .unwrap();
    let names: Vec<&str> = out.saved.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("model.layers.") && n.contains(".self_attn.")));
    assert!(names.contains(&"model.layers.1.self_attn.o_proj.input"));
    assert!(names.contains(&"model.layers.0.self_attn.source.apply_rotary_pos_emb_0.output.1"));
    // The pattern's value equals the standard name's.
    let p = model
        .trace(Input::ids(ids.clone()))
        .save("attention_probabilities.1")
        .unwrap()
        .run()
        .unwrap();
    let e = rel_diff(
        out.get("model.layers.1.self_attn.source.attention_interface_0.source.nn_functional_dropout_0.output").unwrap(),
        p.get("attention_probabilities.1").unwrap(),
    );
    assert_eq!(e, 0.0);
    // `**` alone: every hookpoint; `*` one segment.
    let one = model.expand_pattern("model.layers.*.output").unwrap();
    assert_eq!(one, vec!["model.layers.0.output", "model.layers.1.output"]);
    let err = model
        .expand_pattern("model.layerz.*.output")
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no hookpoint"), "{err}");
    // save_all: every module's output.
    let out = model
        .trace(Input::ids(ids.clone()))
        .save_all()
        .unwrap()
        .run()
        .unwrap();
    let outs = model.module_outputs().unwrap();
    assert_eq!(out.saved.len(), outs.len());
    assert!(out.get("lm_head.output").is_ok() && out.get("model.layers.1.mlp.output").is_ok());
    // The memory check runs before the forward.
    let err = model
        .trace(Input::ids(ids))
        .save_all()
        .unwrap()
        .memory_limit(1000)
        .run()
        .unwrap_err()
        .to_string();
    assert!(err.contains("memory") || err.contains("bytes"), "{err}");
}

#[test]
fn save_all_on_moe_skips_unrouted_experts() {
    for fx in ["qwen2_moe", "dbrx", "gpt_oss"] {
        let model = common::load(fx);
        let ids = common::golden_path_ids(&model);
        let out = model
            .trace(Input::ids(ids))
            .save_all()
            .unwrap()
            .run()
            .unwrap();
        assert!(out.get("lm_head.output").is_ok(), "{fx}");
        let seq = model.expand_pattern("**").unwrap();
        assert!(seq.len() > out.saved.len(), "{fx}");
    }
}
