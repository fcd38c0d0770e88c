//! Gemma 2: `Gemma2ForCausalLM`.
//!
//! Ports transformers' `modeling_gemma2.py`: Gemma's zero-centred RMS norm ([`GemmaRmsNorm`]) and
//! scaled embeddings ([`ScaledWordEmbedding`]), plus soft-capping of the attention scores
//! (`attn_logit_softcapping`) and of the final logits (`final_logit_softcapping`), the attention scale
//! `query_pre_attn_scalar ** -0.5`, norms before and after both the attention and the MLP, and
//! sliding-window layers (`layer_types`, alternating sliding / full when absent).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, GemmaRmsNorm, KvCache, Linear, ScaledWordEmbedding,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Gemma 2 model, as `Gemma2Config` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct Gemma2Config {
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
    /// tanh soft-capping of the attention scores (`None`: off).
    pub attn_logit_softcapping: Option<f64>,
    /// tanh soft-capping of the logits (`None`: off).
    pub final_logit_softcapping: Option<f64>,
    /// Sliding window of each layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
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

impl Gemma2Config {
    /// Reads the keys `Gemma2Config` reads, with its defaults.
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
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 8192)?;
        // `compute_default_rope_parameters` rotates the whole head (the scaled types read the factor).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        // An absent `sliding_window` is the class default 4096; `null` is no window.
        let window = match cfg.raw.get("sliding_window") {
            None => Some(4096),
            Some(_) => cfg.opt_usize("sliding_window")?,
        };
        let sliding_window = sliding_layers(cfg, num_hidden_layers, 2)?
            .into_iter()
            .map(|s| if s { window } else { None })
            .collect();
        Ok(Gemma2Config {
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
            attn_logit_softcapping: nullable_f64(cfg, "attn_logit_softcapping", Some(50.0))?,
            final_logit_softcapping: nullable_f64(cfg, "final_logit_softcapping", Some(30.0))?,
            sliding_window,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            rope,
        })
    }
}

/// `Gemma2MLP`: down(act(gate(x)) * up(x)).
pub struct Gemma2MLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl Gemma2MLP {
    fn new(cfg: &Gemma2Config, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Gemma2MLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_activation,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Gemma2MLP {
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
    module: &Gemma2Attention,
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

/// `Gemma2Attention`.
pub struct Gemma2Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    attn_logit_softcapping: Option<f64>,
    /// The layer's sliding window (`None`: full attention).
    pub sliding_window: Option<usize>,
    layer_idx: usize,
    scope: Scope,
}

impl Gemma2Attention {
    fn new(cfg: &Gemma2Config, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Gemma2Attention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
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
impl Gemma2Attention {
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
            self.attn_logit_softcapping,
        )?;
        let attn_output = attn_output.reshape((b, t, ()))?.contiguous()?;
        self.o_proj.forward(&attn_output)
    }
}

/// `Gemma2DecoderLayer`.
pub struct Gemma2DecoderLayer {
    self_attn: Gemma2Attention,
    mlp: Gemma2MLP,
    input_layernorm: GemmaRmsNorm,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    post_feedforward_layernorm: GemmaRmsNorm,
    scope: Scope,
}

#[hooked]
impl Gemma2DecoderLayer {
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

/// `Gemma2Model`: scaled embeddings, layers and the final norm.
pub struct Gemma2Model {
    embed_tokens: ScaledWordEmbedding,
    layers: Vec<Gemma2DecoderLayer>,
    norm: GemmaRmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Vec<Option<usize>>,
    scope: Scope,
}

#[hooked]
impl Gemma2Model {
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
        let causal_mask_mapping = mask::CausalMasks::new(
            attention_mask,
            batch,
            seq_len,
            past_seen_tokens,
            &self.sliding_window,
            dtype,
            device,
        )?;
        let position_embeddings = self.rotary_emb.cos_sin(position_ids, dtype, device)?;
        let mut hidden_states = inputs_embeds;
        for (decoder_layer, window) in self.layers.iter().zip(self.sliding_window.iter()) {
            hidden_states = decoder_layer.forward(
                &hidden_states,
                &position_embeddings,
                Some(causal_mask_mapping.for_layer(*window)),
                past_key_values,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `Gemma2ForCausalLM`: the model and its output head.
pub struct Gemma2ForCausalLM {
    model: Gemma2Model,
    lm_head: Linear,
    final_logit_softcapping: Option<f64>,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Gemma2ForCausalLM {
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

impl CausalLM for Gemma2ForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Gemma2ForCausalLM::forward(
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
    let cfg = Gemma2Config::read(config)?;
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
        layers.push(Gemma2DecoderLayer {
            self_attn: Gemma2Attention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp: Gemma2MLP::new(&cfg, vb_l.pp("mlp"))?,
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
            scope: vb_l.scope::<Gemma2DecoderLayer>(),
        });
    }
    let norm = GemmaRmsNorm::new(h, eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Gemma2Model {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        sliding_window: cfg.sliding_window.clone(),
        scope: vb_m.scope::<Gemma2Model>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Gemma2ForCausalLM {
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
        scope: root.scope::<Gemma2ForCausalLM>(),
    }))
}
