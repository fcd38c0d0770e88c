//! Gemma 3 (text): `Gemma3ForCausalLM`, `model_type` `gemma3_text`.
//!
//! Ports transformers' `modeling_gemma3.py` (the text model): Gemma 2's layout (zero-centred RMS norm
//! [`GemmaRmsNorm`], scaled embeddings [`ScaledWordEmbedding`], norms before and after the attention
//! and the MLP, `query_pre_attn_scalar`, final logit soft-capping; the attention's soft-capping is read
//! but, as in transformers, not applied) with a per-head RMS norm of the queries and keys, one RoPE per
//! layer type (transformers 5's `rope_parameters` keyed by `sliding_attention` / `full_attention`; the
//! published layout's `rope_theta`, `rope_local_base_freq` and `rope_scaling`, which scales only the
//! full-attention layers), `layer_types` (or the published `sliding_window_pattern`, default 6) and
//! `use_bidirectional_attention` (full layers see every token, sliding layers the tokens within
//! `sliding_window / 2` on either side).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, GemmaRmsNorm, KvCache, Linear, ScaledWordEmbedding,
};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Device, Result, Tensor, D};

/// The configuration of a Gemma 2 model, as `Gemma3Config` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct Gemma3TextConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA / MQA).
    pub num_key_value_heads: usize,
    /// Head size (`head_dim`, default 256).
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// MLP activation (`hidden_activation`).
    pub hidden_activation: Activation,
    /// Bias on q, k, v and o projections.
    pub attention_bias: bool,
    /// The attention scores are scaled by `query_pre_attn_scalar ** -0.5`.
    pub query_pre_attn_scalar: f64,
    /// `attn_logit_softcapping`: read, but Gemma 3's attention does not apply it.
    pub attn_logit_softcapping: Option<f64>,
    /// tanh soft-capping of the logits (`None`: off).
    pub final_logit_softcapping: Option<f64>,
    /// Whether each layer is a `sliding_attention` layer.
    pub is_sliding: Vec<bool>,
    /// Sliding window of each layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters of the full-attention layers.
    pub rope_full: rope::RopeParams,
    /// RoPE parameters of the sliding-window layers.
    pub rope_sliding: rope::RopeParams,
    /// Bidirectional attention (`use_bidirectional_attention`).
    pub use_bidirectional_attention: bool,
}

/// A number that may be `null` (off): `default` when the key is absent.
fn nullable_f64(cfg: &Config, key: &str, default: Option<f64>) -> crate::Result<Option<f64>> {
    match cfg.raw.get(key) {
        None => Ok(default),
        Some(_) => cfg.opt_f64(key),
    }
}

/// Per-layer sliding flags from `layer_types` (`sliding_attention` / `full_attention`), or the
/// config class's default pattern: layer i slides unless (i + 1) is a multiple of `pattern`.
fn sliding_layers(cfg: &Config, n_layers: usize, pattern: usize) -> crate::Result<Vec<bool>> {
    match cfg.opt_str_list("layer_types")? {
        Some(types) => {
            if types.len() < n_layers {
                return Err(cfg.error(format!(
                    "`layer_types` has {} entries for {n_layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .take(n_layers)
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(cfg.error(format!(
                            "`layer_types` entry `{other}` is not supported; supported: sliding_attention, full_attention"
                        ))),
                })
                .collect()
        }
        None => Ok((0..n_layers)
            .map(|i| pattern == 0 || (i + 1) % pattern != 0)
            .collect()),
    }
}

/// The RoPE parameters of each layer type, as `Gemma3TextConfig.convert_rope_params_to_dict` and
/// `standardize_rope_params` build them: `rope_parameters` keyed by layer type (default: both
/// `default`), a legacy `rope_scaling` merged into the full-attention entry, `rope_theta` (default
/// 1e6) and `rope_local_base_freq` (default 1e4) as the full and sliding thetas when an entry has none.
fn rope_per_layer_type(cfg: &Config) -> crate::Result<(rope::RopeParams, rope::RopeParams)> {
    use serde_json::{Map, Value};
    let bad = |key: &str, want: &str| cfg.error(format!("key `{key}` should be {want}"));
    let by_type = match cfg.raw.get("rope_parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("rope_parameters", "an object")),
    };
    let entry = |by_type: &Map<String, Value>, key: &str| -> crate::Result<Map<String, Value>> {
        match by_type.get(key) {
            None | Some(Value::Null) => Ok(Map::new()),
            Some(Value::Object(m)) => Ok(m.clone()),
            Some(_) => Err(bad(&format!("rope_parameters.{key}"), "an object")),
        }
    };
    let mut full = entry(&by_type, "full_attention")?;
    let sliding = entry(&by_type, "sliding_attention")?;
    match cfg.raw.get("rope_scaling") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => full.extend(m.clone()),
        Some(_) => return Err(bad("rope_scaling", "an object")),
    }
    let top_prf = cfg.opt_f64("partial_rotary_factor")?;
    let max_pos = cfg.usize_or("max_position_embeddings", 131_072)?;
    let make = |mut p: Map<String, Value>, theta_key: &str, theta: f64, name: &str| {
        let rope_type = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let theta = match p.get("rope_theta") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(&format!("rope_parameters.{name}.rope_theta"), "a number"))?,
            None => cfg.f64_or(theta_key, theta)?,
        };
        let partial_rotary_factor = match rope_type.as_str() {
            // `compute_default_rope_parameters` rotates the whole head.
            "default" => 1.0,
            _ => p
                .get("partial_rotary_factor")
                .and_then(|v| v.as_f64())
                .or(top_prf)
                .unwrap_or(1.0),
        };
        if matches!(rope_type.as_str(), "llama3" | "yarn" | "longrope") {
            p.entry("original_max_position_embeddings")
                .or_insert(Value::from(max_pos));
        }
        const KNOWN: &[&str] = &["default", "linear", "dynamic", "yarn", "llama3", "longrope"];
        if !KNOWN.contains(&rope_type.as_str()) {
            return Err(cfg.error(format!(
                "rope_parameters.{name}: rope_type `{rope_type}` is not supported; supported: {}",
                KNOWN.join(", ")
            )));
        }
        Ok(rope::RopeParams {
            rope_type,
            theta,
            partial_rotary_factor,
            params: p,
            max_position_embeddings: max_pos,
        })
    };
    let full = make(full, "rope_theta", 1_000_000.0, "full_attention")?;
    let sliding = make(
        sliding,
        "rope_local_base_freq",
        10_000.0,
        "sliding_attention",
    )?;
    Ok((full, sliding))
}

impl Gemma3TextConfig {
    /// Reads the keys `Gemma3TextConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let num_hidden_layers = cfg.usize(&["num_hidden_layers"])?;
        let num_attention_heads = cfg.usize(&["num_attention_heads"])?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 4)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                )));
        }
        let (rope_full, rope_sliding) = rope_per_layer_type(cfg)?;
        let use_bidirectional_attention = cfg.bool_or("use_bidirectional_attention", false)?;
        // An absent `sliding_window` is the class default 4096; `null` is no window. With
        // bidirectional attention the config halves it (`sliding_window // 2 + 1`, an exclusive bound).
        let window = match cfg.raw.get("sliding_window") {
            None => Some(4096),
            Some(_) => cfg.opt_usize("sliding_window")?,
        };
        let window = match window {
            Some(w) if use_bidirectional_attention => Some(w / 2 + 1),
            w => w,
        };
        let pattern = cfg.usize_or("sliding_window_pattern", 6)?;
        let is_sliding = sliding_layers(cfg, num_hidden_layers, pattern)?;
        let sliding_window = is_sliding
            .iter()
            .map(|s| if *s { window } else { None })
            .collect();
        Ok(Gemma3TextConfig {
            hidden_size: cfg.usize(&["hidden_size"])?,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: cfg.usize_or("head_dim", 256)?,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
            hidden_activation: Activation::from_config(
                cfg,
                "hidden_activation",
                "gelu_pytorch_tanh",
            )?,
            attention_bias: cfg.bool_or("attention_bias", false)?,
            query_pre_attn_scalar: cfg.f64_or("query_pre_attn_scalar", 256.0)?,
            attn_logit_softcapping: nullable_f64(cfg, "attn_logit_softcapping", None)?,
            final_logit_softcapping: nullable_f64(cfg, "final_logit_softcapping", None)?,
            is_sliding,
            sliding_window,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            rope_full,
            rope_sliding,
            use_bidirectional_attention,
        })
    }
}

/// `Gemma3MLP`: down(act(gate(x)) * up(x)).
pub struct Gemma3MLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl Gemma3MLP {
    fn new(cfg: &Gemma3TextConfig, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Gemma3MLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_activation,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Gemma3MLP {
    /// down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let down_proj = self.down_proj.forward(&nn::ops::mul(
            &self.act_fn.forward(&self.gate_proj.forward(x)?)?,
            &self.up_proj.forward(x)?,
        )?)?;
        Ok(down_proj)
    }
}

/// transformers' `eager_attention_forward`: returns the attention output [B, T, H, D] and the
/// probabilities [B, H, T, K] (the output of `nn_functional_dropout_0`).
#[hooked]
#[allow(clippy::too_many_arguments)]
pub fn eager_attention_forward(
    module: &Gemma3Attention,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attention_mask: Option<&Tensor>,
    dropout: f64,
    scaling: f64,
    softcap: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let key_states = repeat_kv(key, module.num_key_value_groups)?;
    let value_states = repeat_kv(value, module.num_key_value_groups)?;
    let mut attn_weights = nn::ops::scale(&query.matmul(&key_states.transpose(2, 3)?)?, scaling)?;
    if let Some(softcap) = softcap {
        attn_weights = nn::ops::div_scalar(&attn_weights, softcap)?;
        attn_weights = attn_weights.tanh()?;
        attn_weights = nn::ops::scale(&attn_weights, softcap)?;
    }
    if let Some(mask) = attention_mask {
        attn_weights = nn::ops::add(&attn_weights, mask)?;
    }
    let attn_weights =
        nn::functional::softmax(&attn_weights, D::Minus1)?.to_dtype(query.dtype())?;
    let attn_weights = nn::functional::dropout(&attn_weights, dropout)?;
    let attn_output = attn_weights.matmul(&value_states.contiguous()?)?;
    let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
    Ok((attn_output, attn_weights))
}

/// `Gemma3Attention`.
pub struct Gemma3Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: GemmaRmsNorm,
    k_norm: GemmaRmsNorm,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    /// `attn_logit_softcapping`: kept, but (as in transformers) not passed to the attention.
    pub attn_logit_softcapping: Option<f64>,
    /// The layer's sliding window (`None`: full attention).
    pub sliding_window: Option<usize>,
    layer_idx: usize,
    scope: Scope,
}

impl Gemma3Attention {
    fn new(cfg: &Gemma3TextConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Gemma3Attention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            q_norm: GemmaRmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: GemmaRmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            attention_dropout: 0.0,
            attn_logit_softcapping: cfg.attn_logit_softcapping,
            sliding_window: cfg.sliding_window[layer_idx],
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Gemma3Attention {
    /// Self-attention over `hidden_states` [B, T, hidden].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = hidden_states.dims3()?;
        let hidden_shape = (b, t, (), self.head_dim);
        let query_states = self
            .q_proj
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;
        let key_states = self
            .k_proj
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;
        let value_states = self
            .v_proj
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;

        let query_states = self.q_norm.forward(&query_states)?;
        let key_states = self.k_norm.forward(&key_states)?;

        let (cos, sin) = position_embeddings;
        let (query_states, key_states) =
            apply_rotary_pos_emb(&query_states, &key_states, cos, sin)?;
        let (key_states, value_states) = match past_key_values {
            Some(past_key_values) => {
                past_key_values.update(&key_states, &value_states, self.layer_idx)?
            }
            None => (key_states, value_states),
        };

        let attention_interface = eager_attention_forward;
        let (attn_output, _attn_weights) = attention_interface(
            self,
            &query_states,
            &key_states,
            &value_states,
            attention_mask,
            self.attention_dropout,
            self.scaling,
            None,
        )?;
        let attn_output = attn_output.reshape((b, t, ()))?.contiguous()?;
        self.o_proj.forward(&attn_output)
    }
}

/// `Gemma3DecoderLayer`.
pub struct Gemma3DecoderLayer {
    self_attn: Gemma3Attention,
    mlp: Gemma3MLP,
    input_layernorm: GemmaRmsNorm,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    post_feedforward_layernorm: GemmaRmsNorm,
    scope: Scope,
}

#[hooked]
impl Gemma3DecoderLayer {
    /// Attention and MLP, each normed before and after, each with a residual connection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.input_layernorm.forward(hidden_states)?;
        let hidden_states = self.self_attn.forward(
            &hidden_states,
            position_embeddings,
            attention_mask,
            past_key_values,
        )?;
        let hidden_states = self.post_attention_layernorm.forward(&hidden_states)?;
        let hidden_states = (residual + hidden_states)?;

        let residual = &hidden_states;
        let hidden_states = self.pre_feedforward_layernorm.forward(&hidden_states)?;
        let hidden_states = self.mlp.forward(&hidden_states)?;
        let hidden_states = self.post_feedforward_layernorm.forward(&hidden_states)?;
        residual + hidden_states
    }
}

/// The additive mask of `use_bidirectional_attention` [B, 1, Q, past + Q]: a query (absolute
/// position past + q) sees every key that is not padding, or with a window w only the keys k with
/// |past + q - k| < w (transformers: the causal mask or'ed with `lambda: True` on full layers, with
/// `_bidirectional_window_overlay` on sliding ones).
fn bidirectional_mask(
    attention_mask: Option<&Tensor>,
    batch: usize,
    q_len: usize,
    past: usize,
    sliding_window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keys = past + q_len;
    let pad = match attention_mask {
        Some(m) => {
            let (b, k) = m.dims2()?;
            if b != batch || k != keys {
                candle_core::bail!(
                    "attention mask has shape [{b}, {k}], expected [{batch}, {keys}] (batch, past + new tokens)"
                );
            }
            Some(m.to_dtype(DType::I64)?.to_vec2::<i64>()?)
        }
        None => None,
    };
    let min = mask::min_value(dtype) as f32;
    let mut data = vec![0f32; batch * q_len * keys];
    for b in 0..batch {
        for q in 0..q_len {
            let qa = (past + q) as i64;
            for k in 0..keys {
                let mut ok = match sliding_window {
                    Some(w) => (qa - k as i64).abs() < w as i64,
                    None => true,
                };
                if let Some(p) = &pad {
                    ok &= p[b][k] != 0;
                }
                if !ok {
                    data[(b * q_len + q) * keys + k] = min;
                }
            }
        }
    }
    Tensor::from_vec(data, (batch, 1, q_len, keys), device)?.to_dtype(dtype)
}

/// `Gemma3TextModel`: scaled embeddings, layers and the final norm.
pub struct Gemma3TextModel {
    embed_tokens: ScaledWordEmbedding,
    layers: Vec<Gemma3DecoderLayer>,
    norm: GemmaRmsNorm,
    rotary_emb_full: rope::RotaryEmbedding,
    rotary_emb_sliding: rope::RotaryEmbedding,
    is_sliding: Vec<bool>,
    sliding_window: Vec<Option<usize>>,
    use_bidirectional_attention: bool,
    scope: Scope,
}

#[hooked]
impl Gemma3TextModel {
    /// Hidden states after the final norm [B, T, hidden].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.embed_tokens.forward(input_ids)?;
        let (batch, seq_len) = input_ids.dims2()?;
        let (dtype, device) = (inputs_embeds.dtype(), inputs_embeds.device());
        let past_seen_tokens = nn::past_len(past_key_values);
        let windows: &[Option<usize>] = &self.sliding_window;
        let (full_mask, sliding_mask) = if self.use_bidirectional_attention {
            let window = windows.iter().flatten().next().copied();
            let full = bidirectional_mask(
                attention_mask,
                batch,
                seq_len,
                past_seen_tokens,
                None,
                dtype,
                device,
            )?;
            let sliding = match window {
                Some(w) => bidirectional_mask(
                    attention_mask,
                    batch,
                    seq_len,
                    past_seen_tokens,
                    Some(w),
                    dtype,
                    device,
                )?,
                None => full.clone(),
            };
            (full, sliding)
        } else {
            let masks = mask::CausalMasks::new(
                attention_mask,
                batch,
                seq_len,
                past_seen_tokens,
                windows,
                dtype,
                device,
            )?;
            let window = windows.iter().flatten().next().copied();
            (
                masks.for_layer(None).clone(),
                masks.for_layer(window).clone(),
            )
        };
        let position_embeddings_full = if self.is_sliding.iter().any(|s| !s) {
            Some(self.rotary_emb_full.cos_sin(position_ids, dtype, device)?)
        } else {
            None
        };
        let position_embeddings_sliding = if self.is_sliding.iter().any(|s| *s) {
            Some(
                self.rotary_emb_sliding
                    .cos_sin(position_ids, dtype, device)?,
            )
        } else {
            None
        };
        let mut hidden_states = inputs_embeds;
        for (decoder_layer, sliding) in self.layers.iter().zip(self.is_sliding.iter()) {
            let (layer_mask, position_embeddings) = if *sliding {
                (&sliding_mask, &position_embeddings_sliding)
            } else {
                (&full_mask, &position_embeddings_full)
            };
            let Some(position_embeddings) = position_embeddings else {
                candle_core::bail!("no rotary embedding for a layer type in use");
            };
            hidden_states = decoder_layer.forward(
                &hidden_states,
                position_embeddings,
                Some(layer_mask),
                past_key_values,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `Gemma3ForCausalLM`: the model and its output head.
pub struct Gemma3ForCausalLM {
    model: Gemma3TextModel,
    lm_head: Linear,
    final_logit_softcapping: Option<f64>,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Gemma3ForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let hidden_states =
            self.model
                .forward(input_ids, attention_mask, position_ids, past_key_values)?;
        let mut logits = self.lm_head.forward(&hidden_states)?;
        if let Some(softcap) = self.final_logit_softcapping {
            logits = nn::ops::div_scalar(&logits, softcap)?;
            logits = logits.tanh()?;
            logits = nn::ops::scale(&logits, softcap)?;
        }
        Ok(logits)
    }
}

impl CausalLM for Gemma3ForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Gemma3ForCausalLM::forward(
            self,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
        )
    }

    fn dims(&self) -> Dims {
        self.dims
    }
}

/// Builds a Gemma 2 model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Gemma3TextConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed_tokens = ScaledWordEmbedding::new(
        cfg.vocab_size,
        h,
        (h as f64).sqrt(),
        vb_m.pp("embed_tokens"),
    )?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        layers.push(Gemma3DecoderLayer {
            self_attn: Gemma3Attention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp: Gemma3MLP::new(&cfg, vb_l.pp("mlp"))?,
            input_layernorm: GemmaRmsNorm::new(h, eps, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: GemmaRmsNorm::new(
                h,
                eps,
                vb_l.pp("post_attention_layernorm"),
            )?,
            pre_feedforward_layernorm: GemmaRmsNorm::new(
                h,
                eps,
                vb_l.pp("pre_feedforward_layernorm"),
            )?,
            post_feedforward_layernorm: GemmaRmsNorm::new(
                h,
                eps,
                vb_l.pp("post_feedforward_layernorm"),
            )?,
            scope: vb_l.scope::<Gemma3DecoderLayer>(),
        });
    }
    let norm = GemmaRmsNorm::new(h, eps, vb_m.pp("norm"))?;
    let rotary_emb_full = rope::RotaryEmbedding::new(cfg.rope_full.clone(), cfg.head_dim)?;
    let rotary_emb_sliding = rope::RotaryEmbedding::new(cfg.rope_sliding.clone(), cfg.head_dim)?;
    let model = Gemma3TextModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb_full,
        rotary_emb_sliding,
        is_sliding: cfg.is_sliding.clone(),
        sliding_window: cfg.sliding_window.clone(),
        use_bidirectional_attention: cfg.use_bidirectional_attention,
        scope: vb_m.scope::<Gemma3TextModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Gemma3ForCausalLM {
        model,
        lm_head,
        final_logit_softcapping: cfg.final_logit_softcapping,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            hidden: h,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<Gemma3ForCausalLM>(),
    }))
}
