//! Direct logit attribution (TransformerLens' `decompose_resid` / `logit_attrs` /
//! `stack_head_results`): the final residual stream at the last position, split into the
//! embeddings, each attention's output (and each head's share of it) and each MLP's output, each
//! projected on a logit difference through the final norm with its scale frozen at the value of
//! the actual run. The parts plus the bias term (the final norm's bias and the output head's
//! bias) sum to the logit difference.
//!
//! Everything is measured on the model itself, without reading weights by name: the final norm's
//! weight, bias and kind (centering or not) from two probe rows written into `ln_final.input`,
//! the output head's direction as the gradient of the logit difference with respect to
//! `ln_final.output` (the last layer's output for a model without a final norm), and each head's
//! output by writing that head alone into the output projection's input. Architectures whose
//! final residual is not the sum of those parts are refused with a clear error: Bloom's attention
//! and MLP modules add the residual themselves, DBRX's attention module holds its norms and the
//! residual, post-norm OPT adds the residual before a norm.
//!
//! ```no_run
//! use nnscope::{experiments::attribution, Input, Model};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let dla = attribution::direct_logit_attribution(&model,
//!     &Input::prompts(&["The quick brown fox jumps over the lazy"]), " dog", " cat", true)?;
//! for (name, v) in &dla.parts { println!("{name}: {v:+.3}"); }
//! println!("sum {} = logit difference {}", dla.sum(), dla.logit_diff);
//! # Ok::<(), nnscope::Error>(())
//! ```

use super::patching::{head_outputs_path, logit_diff};
use super::{first_token, gradients, logits_of};
use crate::{Error, Input, Model, Result};
use candle_core::{DType, Tensor, D};

/// What [`direct_logit_attribution`] measured (row 0 of the input, last position).
#[derive(Debug, Clone)]
pub struct Attribution {
    /// (part, contribution): `embeddings`, then per layer `attention.L` (or `head.L.H` for each
    /// head and `attention_bias.L`) and `mlp.L`.
    pub parts: Vec<(String, f32)>,
    /// The final norm's bias and the output head's bias, projected.
    pub bias: f32,
    /// The model's logit difference `logits[last, answer] - logits[last, wrong]`.
    pub logit_diff: f32,
    /// The final norm's frozen scale.
    pub scale: f32,
    /// max |sum of parts - final residual| / max |final residual|: how exactly the parts
    /// decompose the residual.
    pub residual_error: f32,
}

impl Attribution {
    /// The sum of the parts and the bias: equals `logit_diff` (the identity the tests check).
    pub fn sum(&self) -> f32 {
        self.parts.iter().map(|(_, v)| *v as f64).sum::<f64>() as f32 + self.bias
    }
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The last position of row 0 of a [B, T, D] value.
fn last(t: &Tensor) -> Result<Vec<f32>> {
    let n = t.dim(1)?;
    vec1(&t.get(0)?.get(n - 1)?)
}

/// The final norm as measured on the model: (centering, weight, bias, frozen scale of this run),
/// from two probe rows written into `ln_final.input` and the run's own input `r` and output `y`.
fn final_norm(
    model: &Model,
    d: usize,
    r: &[f32],
    y: &[f32],
) -> Result<(bool, Vec<f32>, Vec<f32>, f32)> {
    // A constant row (a centering norm gives its bias, an RMS norm its weight) and an
    // alternating +-1 row.
    let mut probe = vec![1f32; d];
    let alt: Vec<f32> = (0..d)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    probe.extend(&alt);
    let probe = Tensor::from_vec(probe, (1, 2, d), &model.device)?.to_dtype(model.dtype)?;
    let ids = Tensor::zeros((1, 2), DType::U32, &model.device)?;
    let p = model
        .trace(Input::ids(ids))
        .set("ln_final.input", probe)?
        .save("ln_final.output")?
        .run()?;
    let py = p.get("ln_final.output")?.get(0)?;
    let y_const = vec1(&py.get(0)?)?;
    let y_alt = vec1(&py.get(1)?)?;
    let mean_alt = alt.iter().map(|x| *x as f64).sum::<f64>() / d as f64;
    // RMS: y_const = w / rms(1) and y_alt = alt * w / rms(alt), both rms 1 (up to eps).
    let w_rms: Vec<f32> = y_alt.iter().zip(&alt).map(|(y, s)| y * s).collect();
    let rms_like = y_const
        .iter()
        .zip(&w_rms)
        .all(|(c, w)| (c - w).abs() <= 1e-3 * (1.0 + w.abs()));
    let (center, w, bias): (bool, Vec<f32>, Vec<f32>) = if rms_like {
        (false, w_rms, vec![0.0; d])
    } else {
        // Centering norm: the constant row gives the bias; alt - mean has std sqrt(var).
        let c: Vec<f64> = alt.iter().map(|x| *x as f64 - mean_alt).collect();
        let std = (c.iter().map(|x| x * x).sum::<f64>() / d as f64).sqrt();
        let w = y_alt
            .iter()
            .zip(&y_const)
            .zip(&c)
            .map(|((ya, bc), ci)| ((*ya - *bc) as f64 * std / ci) as f32)
            .collect();
        (true, w, y_const.clone())
    };
    let rc: Vec<f32> = if center {
        let m = r.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
        r.iter().map(|v| (*v as f64 - m) as f32).collect()
    } else {
        r.to_vec()
    };
    // The frozen scale s: y - bias = centered(r) * w / s, by least squares.
    let aw: Vec<f32> = rc.iter().zip(&w).map(|(x, w)| x * w).collect();
    let yb: Vec<f32> = y.iter().zip(&bias).map(|(y, b)| y - b).collect();
    let scale = (dot(&aw, &aw) / dot(&aw, &yb)) as f32;
    if !scale.is_finite() || scale <= 0.0 {
        return Err(Error::Input(format!(
            "direct logit attribution: could not recover the final norm's scale (got {scale})"
        )));
    }
    Ok((center, w, bias, scale))
}

/// Direct logit attribution of `logits[last, answer] - logits[last, wrong]` on row 0 of `input`
/// (see the module docs); `heads` splits each attention into its heads.
pub fn direct_logit_attribution(
    model: &Model,
    input: &Input,
    answer: &str,
    wrong: &str,
    heads: bool,
) -> Result<Attribution> {
    let a = first_token(model, answer)?;
    let b = first_token(model, wrong)?;
    let n = model.num_layers();
    let d = model.hidden_size()?;
    let z_paths: Vec<String> = if heads {
        (0..n)
            .map(|l| head_outputs_path(model, l))
            .collect::<Result<_>>()?
    } else {
        vec![]
    };
    // Without a final norm (post-norm OPT), the last layer's output goes to the head directly.
    let has_norm = model.resolve("ln_final.output").is_ok();
    let (head_in, resid) = if has_norm {
        ("ln_final.output".to_string(), "ln_final.input".to_string())
    } else {
        let last = format!("layers_output.{}", n - 1);
        (last.clone(), last)
    };
    let mut names = vec!["layers_input.0".to_string()];
    if has_norm {
        names.push(resid.clone());
    }
    for l in 0..n {
        names.push(format!("attentions_output.{l}"));
        names.push(format!("mlps_output.{l}"));
    }
    names.extend(z_paths.iter().cloned());
    // One run with the head direction: d diff / d (the head's input); the head is linear.
    let g = gradients::gradients_with(
        model,
        input,
        &[head_in.as_str()],
        |mut tr| {
            for nm in &names {
                tr = tr.save(nm)?;
            }
            Ok(tr)
        },
        |out| Ok(logit_diff(logits_of(out)?, a, b)?.get(0)?),
    )?;
    let out = &g.output;
    let diff = g.value as f32;
    let u = last(g.get(&head_in)?)?;
    let y = last(g.value_at(&head_in)?)?;
    let head_const = diff as f64 - dot(&u, &y); // the output head's bias difference
    let r = if has_norm {
        last(out.get(&resid)?)?
    } else {
        y.clone()
    };

    let (center, w, bias, scale) = if has_norm {
        final_norm(model, d, &r, &y)?
    } else {
        (false, vec![1f32; d], vec![0f32; d], 1f32)
    };
    let centered = |x: &[f32]| -> Vec<f32> {
        if center {
            let m = x.iter().map(|v| *v as f64).sum::<f64>() / x.len() as f64;
            x.iter().map(|v| (*v as f64 - m) as f32).collect()
        } else {
            x.to_vec()
        }
    };
    let wu: Vec<f32> = w.iter().zip(&u).map(|(w, u)| w * u / scale).collect();
    let project = |x: &[f32]| -> f32 { dot(&centered(x), &wu) as f32 };

    let mut parts = Vec::new();
    let mut total = last(out.get("layers_input.0")?)?;
    parts.push(("embeddings".to_string(), project(&total)));
    // Each head's output alone through the output projection (plus a zero row for its bias): all
    // layers in one forward of H + 1 rows, the values set from this run.
    let head_out = if heads {
        let nh = model.num_heads()?;
        let t = out.input_ids.dim(1)?;
        let mut tr = model.trace(Input::ids(Tensor::zeros(
            (nh + 1, t),
            DType::U32,
            &model.device,
        )?));
        for zp in &z_paths {
            let z = out.get(zp)?.get(0)?; // [T, H * Dh]
            let wdt = z.dim(D::Minus1)?;
            let hd = wdt / nh;
            let mut m = vec![0f32; (nh + 1) * wdt];
            for h in 0..nh {
                for i in h * hd..(h + 1) * hd {
                    m[h * wdt + i] = 1.0;
                }
            }
            let m = Tensor::from_vec(m, (nh + 1, 1, wdt), &model.device)?.to_dtype(z.dtype())?;
            let zs = m.broadcast_mul(&z.unsqueeze(0)?)?;
            let proj_out = zp.trim_end_matches(".input").to_string() + ".output";
            tr = tr.set(zp, zs)?.save(&proj_out)?;
        }
        Some(tr.run()?)
    } else {
        None
    };
    for (l, zp) in z_paths
        .iter()
        .map(Some)
        .chain(std::iter::repeat(None))
        .take(n)
        .enumerate()
    {
        let attn = last(out.get(&format!("attentions_output.{l}"))?)?;
        match (&head_out, zp) {
            (Some(ho), Some(zp)) => {
                let nh = model.num_heads()?;
                let po = zp.trim_end_matches(".input").to_string() + ".output";
                let o = ho.get(&po)?; // [H + 1, T, D]
                let tl = o.dim(1)?;
                let rows = o
                    .narrow(1, tl - 1, 1)?
                    .squeeze(1)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                let bias_row = &rows[nh];
                let mut sum_heads = bias_row.clone();
                for (h, row) in rows.iter().take(nh).enumerate() {
                    let only: Vec<f32> = row.iter().zip(bias_row).map(|(x, b)| x - b).collect();
                    sum_heads.iter_mut().zip(&only).for_each(|(s, x)| *s += x);
                    parts.push((format!("head.{l}.{h}"), project(&only)));
                }
                // The bias and anything the attention adds after its output projection.
                let rest: Vec<f32> = attn
                    .iter()
                    .zip(&sum_heads)
                    .zip(bias_row)
                    .map(|((a, s), b)| a - s + b)
                    .collect();
                parts.push((format!("attention_bias.{l}"), project(&rest)));
            }
            _ => parts.push((format!("attention.{l}"), project(&attn))),
        }
        let mlp = last(out.get(&format!("mlps_output.{l}"))?)?;
        parts.push((format!("mlp.{l}"), project(&mlp)));
        total.iter_mut().zip(&attn).for_each(|(t, x)| *t += x);
        total.iter_mut().zip(&mlp).for_each(|(t, x)| *t += x);
    }
    let scale_r = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let residual_error = total
        .iter()
        .zip(&r)
        .fold(0f32, |m, (t, x)| m.max((t - x).abs()))
        / scale_r;
    if residual_error > 1e-3 {
        return Err(Error::Input(format!(
            "direct logit attribution: on `{}` the final residual is not the sum of the embeddings, \
             attention and MLP outputs (relative error {residual_error:.2e}), so it cannot be \
             decomposed this way",
            model.arch.model_type
        )));
    }
    let bias_term = (dot(&bias, &u) + head_const) as f32;
    Ok(Attribution {
        parts,
        bias: bias_term,
        logit_diff: diff,
        scale,
        residual_error,
    })
}
