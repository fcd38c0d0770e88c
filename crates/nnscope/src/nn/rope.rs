//! Rotary position embeddings: every `rope_type` transformers' `ROPE_INIT_FUNCTIONS` knows for the
//! supported models (`default`, `linear`, `dynamic`, `yarn`, `llama3`, `longrope`), read from either
//! config layout (transformers 5's `rope_parameters`, or 4's `rope_theta` / `rope_scaling` /
//! `partial_rotary_factor` at the top level).

use super::ops;
use crate::config::Config;
use crate::trace::hooked;
use candle_core::{DType, Device, Result, Tensor, D};

/// The RoPE parameters of a model, after transformers' `standardize_rope_params`.
#[derive(Debug, Clone)]
pub struct RopeParams {
    /// `default`, `linear`, `dynamic`, `yarn`, `llama3` or `longrope`.
    pub rope_type: String,
    /// Base wavelength.
    pub theta: f64,
    /// Fraction of the head dimension that is rotated.
    pub partial_rotary_factor: f64,
    /// The full dictionary, for type-specific keys.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// `max_position_embeddings` of the model.
    pub max_position_embeddings: usize,
}

impl RopeParams {
    /// Reads RoPE parameters from a config in either layout. `default_theta` is the model config
    /// class's default (10000 for most).
    pub fn from_config(
        cfg: &Config,
        default_theta: f64,
        default_max_pos: usize,
    ) -> crate::Result<Self> {
        // transformers' `convert_rope_params_to_dict`: `rope_scaling or rope_parameters`, so a
        // non-empty legacy `rope_scaling` wins when a config has both.
        let mut params = match (cfg.raw.get("rope_scaling"), cfg.raw.get("rope_parameters")) {
            (Some(serde_json::Value::Object(m)), _) if !m.is_empty() => m.clone(),
            (_, Some(serde_json::Value::Object(m))) => m.clone(),
            _ => serde_json::Map::new(),
        };
        let top_theta = cfg.opt_f64("rope_theta")?;
        let top_prf = cfg.opt_f64("partial_rotary_factor")?;
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let theta = params
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .or(top_theta)
            .unwrap_or(default_theta);
        let partial_rotary_factor = params
            .get("partial_rotary_factor")
            .and_then(|v| v.as_f64())
            .or(top_prf)
            .unwrap_or(1.0);
        let max_position_embeddings = cfg
            .opt_usize("max_position_embeddings")?
            .unwrap_or(default_max_pos);
        if matches!(rope_type.as_str(), "llama3" | "yarn" | "longrope") {
            let omp = cfg
                .opt_usize("original_max_position_embeddings")?
                .map(serde_json::Value::from);
            match omp {
                Some(v) => {
                    params.insert("original_max_position_embeddings".into(), v);
                }
                None => {
                    params
                        .entry("original_max_position_embeddings")
                        .or_insert(serde_json::Value::from(max_position_embeddings));
                }
            }
        }
        const KNOWN: &[&str] = &["default", "linear", "dynamic", "yarn", "llama3", "longrope"];
        if !KNOWN.contains(&rope_type.as_str()) {
            return Err(crate::Error::Config {
                path: cfg.path.clone(),
                msg: format!(
                    "rope_type `{rope_type}` is not supported; supported: {}",
                    KNOWN.join(", ")
                ),
            });
        }
        Ok(RopeParams {
            rope_type,
            theta,
            partial_rotary_factor,
            params,
            max_position_embeddings,
        })
    }

    fn f(&self, key: &str) -> Option<f64> {
        self.params.get(key).and_then(|v| v.as_f64())
    }

    fn need(&self, key: &str) -> Result<f64> {
        self.f(key).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "rope_parameters of type `{}` needs `{key}`",
                self.rope_type
            ))
        })
    }
}

/// Rotary embedding tables: `inv_freq` and the cos/sin scaling, as in `XRotaryEmbedding`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    params: RopeParams,
    /// Rotated dimensions (head_dim * partial_rotary_factor).
    pub dim: usize,
    inv_freq: Vec<f32>,
    attention_scaling: f64,
}

/// torch: `base ** (torch.arange(0, dim, 2).float() / dim)`, in float32.
fn base_freqs(base: f64, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| (base as f32).powf(i as f32 / dim as f32))
        .collect()
}

impl RotaryEmbedding {
    /// Tables for heads of `head_dim` (only `partial_rotary_factor` of it is rotated).
    pub fn new(params: RopeParams, head_dim: usize) -> Result<Self> {
        let dim = (head_dim as f64 * params.partial_rotary_factor) as usize;
        let (inv_freq, attention_scaling) = compute(&params, dim, None)?;
        Ok(RotaryEmbedding {
            params,
            dim,
            inv_freq,
            attention_scaling,
        })
    }

    /// cos and sin at `position_ids` [B, T] (integers), shape [B, T, dim], in `dtype`.
    pub fn cos_sin(
        &self,
        position_ids: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = position_ids.dims2()?;
        let pos: Vec<i64> = position_ids
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        // Dynamic NTK and LongRoPE pick their frequencies from the sequence length, which
        // transformers takes as max(position_ids) + 1.
        let seq_len = pos.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
        let (inv_freq, scaling) = match self.params.rope_type.as_str() {
            "dynamic" if seq_len > self.params.max_position_embeddings => {
                compute(&self.params, self.dim, Some(seq_len))?
            }
            "longrope" => compute(&self.params, self.dim, Some(seq_len))?,
            _ => (self.inv_freq.clone(), self.attention_scaling),
        };
        let half = inv_freq.len();
        let mut freqs = Vec::with_capacity(b * t * half * 2);
        for p in pos {
            let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let emb = Tensor::from_vec(freqs, (b, t, half * 2), device)?;
        let cos = (emb.cos()? * scaling)?.to_dtype(dtype)?;
        let sin = (emb.sin()? * scaling)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// The frequencies of the first `dim / 2` rotated pairs (for rotate-every-two layouts).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
}

fn compute(p: &RopeParams, dim: usize, seq_len: Option<usize>) -> Result<(Vec<f32>, f64)> {
    let base = p.theta;
    Ok(match p.rope_type.as_str() {
        "default" => (base_freqs(base, dim).iter().map(|x| 1.0 / x).collect(), 1.0),
        "linear" => {
            let factor = p.need("factor")? as f32;
            (
                base_freqs(base, dim)
                    .iter()
                    .map(|x| (1.0 / x) / factor)
                    .collect(),
                1.0,
            )
        }
        "dynamic" => {
            let factor = p.need("factor")?;
            let mp = p.max_position_embeddings as f64;
            let seq = seq_len.map(|s| s as f64).unwrap_or(mp).max(mp);
            let d = dim as f64;
            let base = base * ((factor * seq / mp) - (factor - 1.0)).powf(d / (d - 2.0));
            (base_freqs(base, dim).iter().map(|x| 1.0 / x).collect(), 1.0)
        }
        "llama3" => {
            let factor = p.need("factor")? as f32;
            let low = p.need("low_freq_factor")? as f32;
            let high = p.need("high_freq_factor")? as f32;
            let old = p.need("original_max_position_embeddings")? as f32;
            let low_wl = old / low;
            let high_wl = old / high;
            let inv: Vec<f32> = base_freqs(base, dim)
                .iter()
                .map(|x| {
                    let f = 1.0 / x;
                    let wl = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wl > low_wl { f / factor } else { f };
                    // transformers: `~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)` (no NaN here).
                    let medium = wl >= high_wl && wl <= low_wl;
                    if medium {
                        let s = (old / wl - low) / (high - low);
                        (1.0 - s) * scaled / factor + s * scaled
                    } else {
                        scaled
                    }
                })
                .collect();
            (inv, 1.0)
        }
        "yarn" => {
            let omp = p.need("original_max_position_embeddings")?;
            let factor = p
                .f("factor")
                .unwrap_or(p.max_position_embeddings as f64 / omp);
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match p.f("attention_factor") {
                Some(a) => a,
                None => match (p.f("mscale"), p.f("mscale_all_dim")) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        get_mscale(factor, m) / get_mscale(factor, ma)
                    }
                    _ => get_mscale(factor, 1.0),
                },
            };
            let beta_fast = p.f("beta_fast").filter(|v| *v != 0.0).unwrap_or(32.0);
            let beta_slow = p.f("beta_slow").filter(|v| *v != 0.0).unwrap_or(1.0);
            let truncate = p
                .params
                .get("truncate")
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            let d = dim as f64;
            let corr = |rot: f64| {
                (d * (omp / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let high = high.min(d - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let pos = base_freqs(base, dim);
            let inv: Vec<f32> = pos
                .iter()
                .enumerate()
                .map(|(i, pf)| {
                    let extrap = 1.0 / pf;
                    let interp = 1.0 / (factor as f32 * pf);
                    let ramp =
                        ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                    let ef = 1.0 - ramp;
                    interp * (1.0 - ef) + extrap * ef
                })
                .collect();
            (inv, attention_factor)
        }
        "longrope" => {
            let omp = p.need("original_max_position_embeddings")?;
            let factor = p
                .f("factor")
                .unwrap_or(p.max_position_embeddings as f64 / omp);
            let attention_factor = match p.f("attention_factor") {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / omp.ln()).sqrt(),
            };
            let key = match seq_len {
                Some(s) if s as f64 > omp => "long_factor",
                _ => "short_factor",
            };
            let ext: Vec<f32> = p
                .params
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64())
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_default();
            if ext.len() != dim / 2 {
                candle_core::bail!(
                    "rope_parameters.{key} has {} entries, expected {}",
                    ext.len(),
                    dim / 2
                );
            }
            let inv = base_freqs(base, dim)
                .iter()
                .zip(ext.iter())
                .map(|(b, e)| 1.0 / (e * b))
                .collect();
            (inv, attention_factor)
        }
        other => candle_core::bail!("unsupported rope_type `{other}`"),
    })
}

/// Rotates half the hidden dims of the input: cat(-x2, x1).
#[hooked]
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies rotary embeddings to q and k ([B, H, T, D]); cos/sin are [B, T, D].
#[hooked]
pub fn apply_rotary_pos_emb(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let q_embed = ops::add(&ops::mul(q, &cos)?, &ops::mul(&rotate_half(q)?, &sin)?)?;
    let k_embed = ops::add(&ops::mul(k, &cos)?, &ops::mul(&rotate_half(k)?, &sin)?)?;
    Ok((q_embed, k_embed))
}
