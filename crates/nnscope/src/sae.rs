//! Sparse autoencoders and transcoders in SAELens' on-disk format: a folder with `cfg.json` and
//! `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `W_dec` [d_sae, d_out], `b_enc`, `b_dec`, and
//! per architecture `threshold`, `b_gate`, `r_mag`, `b_mag`, `W_skip`, `scaling_factor`).
//!
//! An [`Sae`] is attached to a trace at a hookpoint with `.sae(...)` (every builder): it adds the
//! hookpoints `H.sae.feature_acts` [B, T, d_sae], `H.sae.reconstruction` and `H.sae.error` under
//! its hook `H`, changes nothing downstream unless spliced ([`Attach::splice`]) or unless its
//! feature activations are written (then the hook's value becomes `x + decode(f') - decode(f)`,
//! the reconstruction error kept). A transcoder reads one hook and writes another.
//!
//! Inference follows SAELens (`sae_lens/saes/*.py`):
//! `sae_in = norm_in(x) - b_dec * apply_b_dec_to_input`, `pre = sae_in @ W_enc + b_enc`, then
//! `standard`: relu(pre); `jumprelu`: relu(pre) * (pre > threshold); `topk`: the k largest of
//! pre, through relu; `gated`: (sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) +
//! b_mag); decoding `norm_out(f @ W_dec + b_dec)` (transcoders: no norm_out, plus `x @ W_skip^T`
//! for `skip_transcoder`).
//!
//! ```no_run
//! use nnscope::{Attach, Input, Model, Sae};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let sae = Sae::load("tests/fixtures/llama/saes/res_post_0")?; // or "org/repo:folder"
//! let out = model
//!     .trace(Input::prompts(&["The quick brown fox"]))
//!     .sae(sae.clone())? // at cfg.json's hook_name
//!     .save("blocks.0.hook_resid_post.sae.feature_acts")?
//!     .clamp("blocks.0.hook_resid_post.sae.feature_acts", 12, 8.0)?
//!     .run()?;
//! let f = out.get("blocks.0.hook_resid_post.sae.feature_acts")?;
//! let (values, features) = Sae::top_k(f, 8)?; // top-8 features per token
//! let plan = model
//!     .plan()
//!     .sae(Attach::from(sae).at("layers_output.1").splice(true))?
//!     .build();
//! # let _ = (values, features, plan);
//! # Ok::<(), nnscope::Error>(())
//! ```

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The activation function of an SAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// ReLU (`standard`, `transcoder`); with `activation_fn_str: tanh-relu`, relu(tanh(.)).
    Standard {
        /// relu(tanh(pre)) instead of relu(pre) (old SAELens `activation_fn_str`).
        tanh: bool,
    },
    /// relu(pre) * (pre > threshold) (`jumprelu`, `jumprelu_transcoder`).
    JumpRelu,
    /// The k largest pre-activations of each token, through relu (`topk`).
    TopK(usize),
    /// Gated SAE (`gated`).
    Gated,
}

/// Run-time normalization of the SAE's input (SAELens `normalize_activations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// `none`.
    None,
    /// `expected_average_only_in`: at inference SAELens applies no run-time norm (the dataset's
    /// scaling factor is folded into the weights when a release ships one), so neither do we.
    ExpectedAverageOnlyIn,
    /// `constant_norm_rescale`: x * sqrt(d_in) / ||x|| in, the inverse out.
    ConstantNormRescale,
    /// `layer_norm`: (x - mean) / (std + 1e-5) in, `* std + mean` out.
    LayerNorm,
}

/// A sparse autoencoder (or transcoder), loaded.
#[derive(Debug, Clone)]
pub struct Sae {
    /// Where it was loaded from (a folder).
    pub dir: PathBuf,
    /// How it was named: the folder (absolute) or the hub spec `org/repo:folder` (what `collect`
    /// records in its manifest).
    pub spec: String,
    /// `cfg.json` as read.
    pub cfg: serde_json::Value,
    /// The activation function.
    pub architecture: Architecture,
    /// The architecture as `cfg.json` names it.
    pub architecture_name: String,
    /// Input size.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Output size (`d_in` for an SAE).
    pub d_out: usize,
    /// The hook it was trained on (TransformerLens name), if `cfg.json` says.
    pub hook_name: Option<String>,
    /// A transcoder's output hook.
    pub hook_name_out: Option<String>,
    /// Subtract `b_dec` from the input before encoding.
    pub apply_b_dec_to_input: bool,
    /// Run-time normalization.
    pub normalize: Normalize,
    /// Whether it is a transcoder (reads `hook_name`, writes `hook_name_out`).
    pub transcoder: bool,
    w_enc: Tensor,
    w_dec: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    threshold: Option<Tensor>,
    w_mag: Option<Tensor>,
    b_mag: Option<Tensor>,
    w_skip_t: Option<Tensor>,
    scaling_factor: Option<Tensor>,
}

/// What [`Sae::encode`] keeps for decoding (the run-time norm's statistics and the input).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Feature activations [N, d_sae] (float32).
    pub feature_acts: Tensor,
    /// The input [N, d_in] (float32), for `W_skip`.
    input: Tensor,
    /// constant_norm_rescale's coefficient, or layer_norm's (mean, std).
    norm: Option<(Tensor, Option<Tensor>)>,
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The known architectures, for error messages.
pub const ARCHITECTURES: &[&str] = &[
    "standard",
    "jumprelu",
    "topk",
    "gated",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
];

impl Sae {
    /// Loads an SAE: a folder with `cfg.json` and `sae_weights.safetensors`, or a hub id with a
    /// subfolder, `org/repo:folder` (downloaded through [`crate::hub`] into the Hugging Face
    /// cache, as SAELens releases are laid out).
    pub fn load(spec: &str) -> Result<Self> {
        Self::load_with(spec, &crate::hub::HubOptions::from_env())
    }

    /// [`Sae::load`] with explicit hub options.
    pub fn load_with(spec: &str, opts: &crate::hub::HubOptions) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_dir() {
            return Self::load_dir(p);
        }
        if let Some((repo, folder)) = spec.split_once(':') {
            if crate::hub::looks_like_id(repo) {
                let folder = folder.trim_matches('/');
                let files = [
                    format!("{folder}/cfg.json"),
                    format!("{folder}/sae_weights.safetensors"),
                ];
                let files: Vec<String> = files
                    .iter()
                    .map(|f| f.trim_start_matches('/').to_string())
                    .collect();
                let snap = crate::hub::download_files(repo, &files, opts)?;
                let mut sae = Self::load_dir(&snap.join(folder))?;
                sae.spec = spec.to_string();
                return Ok(sae);
            }
        }
        Err(Error::ModelNotFound {
            model: spec.into(),
            msg: "no such SAE folder (cfg.json + sae_weights.safetensors); a hub SAE is `org/repo:folder`"
                .into(),
        })
    }

    /// Loads an SAE from a folder.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("cfg.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io {
            path: cfg_path.clone(),
            source: e,
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| cfg_err(&cfg_path, format!("not valid JSON: {e}")))?;
        if !cfg.is_object() {
            return Err(cfg_err(&cfg_path, "not a JSON object"));
        }
        // Fields at the top level, or (newer SAELens) under `metadata` / `meta`.
        let field = |k: &str| -> Option<&serde_json::Value> {
            cfg.get(k)
                .filter(|v| !v.is_null())
                .or_else(|| cfg.get("metadata").and_then(|m| m.get(k)))
                .or_else(|| cfg.get("meta").and_then(|m| m.get(k)))
                .filter(|v| !v.is_null())
        };
        let usize_field = |k: &str| -> Result<Option<usize>> {
            match field(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| cfg_err(&cfg_path, format!("`{k}` is {v}, not a count"))),
            }
        };
        let str_field = |k: &str| field(k).and_then(|v| v.as_str()).map(str::to_string);
        let bool_field = |k: &str, default: bool| -> Result<bool> {
            match field(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| cfg_err(&cfg_path, format!("`{k}` is {v}, not true/false"))),
            }
        };
        let d_in = usize_field("d_in")?.ok_or_else(|| cfg_err(&cfg_path, "no `d_in`"))?;
        let d_sae = usize_field("d_sae")?.ok_or_else(|| cfg_err(&cfg_path, "no `d_sae`"))?;
        let arch_name = str_field("architecture").unwrap_or_else(|| "standard".into());
        let transcoder = arch_name.ends_with("transcoder");
        let d_out = if transcoder {
            usize_field("d_out")?.unwrap_or(d_in)
        } else {
            d_in
        };
        let act = str_field("activation_fn_str")
            .or_else(|| str_field("activation_fn"))
            .unwrap_or_else(|| "relu".into());
        let k = match cfg
            .get("activation_fn_kwargs")
            .and_then(|a| a.get("k"))
            .filter(|v| !v.is_null())
        {
            Some(v) => Some(v.as_u64().map(|n| n as usize).ok_or_else(|| {
                cfg_err(
                    &cfg_path,
                    format!("`activation_fn_kwargs.k` is {v}, not a count"),
                )
            })?),
            None => usize_field("k")?,
        };
        let architecture = match arch_name.as_str() {
            "standard" | "transcoder" | "skip_transcoder" => match act.as_str() {
                "relu" => Architecture::Standard { tanh: false },
                "tanh-relu" => Architecture::Standard { tanh: true },
                "topk" => Architecture::TopK(k.ok_or_else(|| {
                    cfg_err(&cfg_path, "activation `topk` needs `k` (in `activation_fn_kwargs` or at the top level)")
                })?),
                other => {
                    return Err(cfg_err(
                        &cfg_path,
                        format!("unknown activation function `{other}` (known: relu, tanh-relu, topk)"),
                    ))
                }
            },
            "jumprelu" | "jumprelu_transcoder" => Architecture::JumpRelu,
            "topk" => Architecture::TopK(k.ok_or_else(|| {
                cfg_err(
                    &cfg_path,
                    "architecture `topk` needs `k` (in `activation_fn_kwargs` or at the top level)",
                )
            })?),
            "gated" => Architecture::Gated,
            other => {
                return Err(cfg_err(
                    &cfg_path,
                    format!(
                        "unknown SAE architecture `{other}` (known: {})",
                        ARCHITECTURES.join(", ")
                    ),
                ))
            }
        };
        if let Architecture::TopK(0) = architecture {
            return Err(cfg_err(&cfg_path, "`k` is 0"));
        }
        let normalize = match str_field("normalize_activations").as_deref() {
            None | Some("none") => Normalize::None,
            Some("expected_average_only_in") => Normalize::ExpectedAverageOnlyIn,
            Some("constant_norm_rescale") => Normalize::ConstantNormRescale,
            Some("layer_norm") => Normalize::LayerNorm,
            Some(other) => {
                return Err(cfg_err(
                    &cfg_path,
                    format!("unknown `normalize_activations` `{other}` (known: none, expected_average_only_in, constant_norm_rescale, layer_norm)"),
                ))
            }
        };
        if let Some(h) = field("hook_head_index").and_then(|v| v.as_u64()) {
            return Err(cfg_err(
                &cfg_path,
                format!("`hook_head_index` {h}: SAEs on a single attention head are not supported"),
            ));
        }
        // SAELens never subtracts b_dec from a transcoder's input (b_dec has the output's size).
        let apply_b_dec_to_input = !transcoder && bool_field("apply_b_dec_to_input", true)?;
        let finetuning = bool_field("finetuning_scaling_factor", false)?;

        let wpath = dir.join("sae_weights.safetensors");
        if !wpath.is_file() {
            return Err(Error::Weights {
                path: wpath,
                msg: "no such file (an SAE folder holds cfg.json and sae_weights.safetensors)"
                    .into(),
            });
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&wpath, &Device::Cpu).map_err(|e| Error::Weights {
                path: wpath.clone(),
                msg: format!("not a readable safetensors file: {e}"),
            })?;
        let werr = |msg: String| Error::Weights {
            path: wpath.clone(),
            msg,
        };
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.remove(name).ok_or_else(|| {
                werr(format!(
                    "no tensor `{name}` (architecture `{arch_name}` needs it)"
                ))
            })?;
            if t.dims() != shape {
                return Err(werr(format!(
                    "tensor `{name}` has shape {:?}; cfg.json (d_in {d_in}, d_sae {d_sae}, d_out {d_out}) needs {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let w_enc = take("W_enc", &[d_in, d_sae])?;
        let w_dec = take("W_dec", &[d_sae, d_out])?;
        let b_dec = take("b_dec", &[d_out])?;
        let (b_enc, threshold, w_mag, b_mag) = match architecture {
            Architecture::Gated => {
                let b_gate = take("b_gate", &[d_sae])?;
                let r_mag = take("r_mag", &[d_sae])?;
                let b_mag = take("b_mag", &[d_sae])?;
                let w_mag = w_enc.broadcast_mul(&r_mag.exp()?.reshape((1, d_sae))?)?;
                (b_gate, None, Some(w_mag), Some(b_mag))
            }
            Architecture::JumpRelu => {
                let b_enc = take("b_enc", &[d_sae])?;
                let thr = take("threshold", &[d_sae])?;
                (b_enc, Some(thr), None, None)
            }
            _ => (take("b_enc", &[d_sae])?, None, None, None),
        };
        let w_skip_t = if arch_name == "skip_transcoder" {
            Some(take("W_skip", &[d_out, d_in])?.t()?.contiguous()?)
        } else {
            None
        };
        let scaling_factor = if finetuning {
            Some(take("scaling_factor", &[d_sae])?)
        } else {
            None
        };
        if apply_b_dec_to_input && d_out != d_in {
            return Err(cfg_err(
                &cfg_path,
                "apply_b_dec_to_input needs d_out == d_in",
            ));
        }
        let spec = std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
            .to_string();
        Ok(Sae {
            dir: dir.to_path_buf(),
            spec,
            architecture,
            architecture_name: arch_name,
            d_in,
            d_sae,
            d_out,
            hook_name: str_field("hook_name"),
            hook_name_out: str_field("hook_name_out"),
            apply_b_dec_to_input,
            normalize,
            transcoder,
            w_enc,
            w_dec,
            b_enc,
            b_dec,
            threshold,
            w_mag,
            b_mag,
            w_skip_t,
            scaling_factor,
            cfg,
        })
    }

    /// The same SAE with its weights on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        let mvo = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(Sae {
            w_enc: mv(&self.w_enc)?,
            w_dec: mv(&self.w_dec)?,
            b_enc: mv(&self.b_enc)?,
            b_dec: mv(&self.b_dec)?,
            threshold: mvo(&self.threshold)?,
            w_mag: mvo(&self.w_mag)?,
            b_mag: mvo(&self.b_mag)?,
            w_skip_t: mvo(&self.w_skip_t)?,
            scaling_factor: mvo(&self.scaling_factor)?,
            ..self.clone()
        })
    }

    /// The decoder [d_sae, d_out] (float32).
    pub fn w_dec(&self) -> &Tensor {
        &self.w_dec
    }

    /// The encoder [d_in, d_sae] (float32).
    pub fn w_enc(&self) -> &Tensor {
        &self.w_enc
    }

    /// Encodes `x` [N, d_in] (any float dtype) into feature activations [N, d_sae] (float32).
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Encoded> {
        let x = x.to_dtype(DType::F32)?;
        let (n, d) = x.dims2()?;
        if d != self.d_in {
            candle_core::bail!(
                "the SAE takes d_in {} but the value here has last dimension {d}",
                self.d_in
            );
        }
        let (xn, norm) = match self.normalize {
            Normalize::None | Normalize::ExpectedAverageOnlyIn => (x.clone(), None),
            Normalize::ConstantNormRescale => {
                let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
                let coeff = ((norm.recip()?) * (self.d_in as f64).sqrt())?;
                (x.broadcast_mul(&coeff)?, Some((coeff, None)))
            }
            Normalize::LayerNorm => {
                let mu = x.mean_keepdim(1)?;
                let c = x.broadcast_sub(&mu)?;
                // torch's std: the unbiased estimate.
                let var = (c.sqr()?.sum_keepdim(1)? / (d.max(2) - 1) as f64)?;
                let std = var.sqrt()?;
                (c.broadcast_div(&(&std + 1e-5)?)?, Some((mu, Some(std))))
            }
        };
        let sae_in = if self.apply_b_dec_to_input {
            xn.broadcast_sub(&self.b_dec)?
        } else {
            xn
        };
        let pre = sae_in.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)?;
        let f = match self.architecture {
            Architecture::Standard { tanh: false } => pre.relu()?,
            Architecture::Standard { tanh: true } => pre.tanh()?.relu()?,
            Architecture::JumpRelu => {
                let thr = self.threshold.as_ref().expect("jumprelu has a threshold");
                let mask = pre.broadcast_gt(thr)?.to_dtype(DType::F32)?;
                (pre.relu()? * mask)?
            }
            Architecture::TopK(k) => {
                let k = k.min(self.d_sae);
                let (sorted, _) = pre.sort_last_dim(false)?;
                let kth = sorted.narrow(1, k - 1, 1)?;
                let mask = pre.broadcast_ge(&kth)?.to_dtype(DType::F32)?;
                (pre.relu()? * mask)?
            }
            Architecture::Gated => {
                let gate = pre.gt(0.0)?.to_dtype(DType::F32)?;
                let (w_mag, b_mag) = (
                    self.w_mag.as_ref().expect("gated has W_mag"),
                    self.b_mag.as_ref().expect("gated has b_mag"),
                );
                let mag = sae_in.matmul(w_mag)?.broadcast_add(b_mag)?.relu()?;
                (gate * mag)?
            }
        };
        let _ = n;
        Ok(Encoded {
            feature_acts: f,
            input: x,
            norm,
        })
    }

    /// Decodes feature activations `f` [N, d_sae] (float32) with the statistics of `enc` (the
    /// encoding of the same input) into [N, d_out] (float32).
    pub fn decode(&self, f: &Tensor, enc: &Encoded) -> candle_core::Result<Tensor> {
        let f = match &self.scaling_factor {
            Some(s) => f.broadcast_mul(s)?,
            None => f.clone(),
        };
        let mut out = f.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?;
        if !self.transcoder {
            out = match &enc.norm {
                None => out,
                Some((coeff, None)) => out.broadcast_div(coeff)?,
                Some((mu, Some(std))) => out.broadcast_mul(std)?.broadcast_add(mu)?,
            };
        }
        if let Some(w) = &self.w_skip_t {
            out = (out + enc.input.matmul(w)?)?;
        }
        Ok(out)
    }

    /// Feature activations of `x` [..., d_in] (any float dtype), as [..., d_sae] float32.
    pub fn feature_acts(&self, x: &Tensor) -> Result<Tensor> {
        let (flat, lead) = flatten(x, self.d_in)?;
        let f = self.encode(&flat)?.feature_acts;
        Ok(unflatten(&f, &lead)?)
    }

    /// The `k` largest feature activations of each token of `feature_acts` [..., d_sae]: (values,
    /// feature indices), both [..., k] (what `collect --sae` stores to keep shards small).
    pub fn top_k(feature_acts: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        let n = feature_acts.dim(D::Minus1)?;
        if k == 0 || k > n {
            return Err(Error::Input(format!(
                "top-k of {n} features: k must be 1..={n}, got {k}"
            )));
        }
        let f = feature_acts.to_dtype(DType::F32)?.contiguous()?;
        let idx = f
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, k)?
            .contiguous()?;
        let vals = f.gather(&idx, D::Minus1)?;
        Ok((vals, idx))
    }
}

/// `x` [..., d] as [N, d] and its leading dimensions; a 4-D value [B, T, H, Dh] (per-head `z`)
/// is flattened to [B * T, H * Dh].
pub(crate) fn flatten(x: &Tensor, d_in: usize) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let Some(&last) = dims.last() else {
        candle_core::bail!("a scalar value cannot go through an SAE");
    };
    if dims.len() == 4 && last != d_in && dims[2] * dims[3] == d_in {
        let lead = dims[..2].to_vec();
        return Ok((x.reshape((dims[0] * dims[1], d_in))?, lead));
    }
    if last != d_in {
        candle_core::bail!(
            "the SAE takes d_in {d_in}, but the value here has shape {dims:?} (last dimension {last})"
        );
    }
    let lead = dims[..dims.len() - 1].to_vec();
    let n: usize = lead.iter().product();
    Ok((x.reshape((n, d_in))?, lead))
}

/// [N, d] back to [...lead, d].
pub(crate) fn unflatten(t: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut shape = lead.to_vec();
    shape.push(t.dim(1)?);
    t.reshape(shape)
}
