//! Gemma: `GemmaForCausalLM`.
//!
//! Ports transformers' `modeling_gemma.py`: LLaMA's layout with a zero-centred RMS norm scaled by
//! `1 + weight` in float32 ([`GemmaRmsNorm`]), token embeddings multiplied by sqrt(hidden) in the
//! weights' dtype ([`ScaledWordEmbedding`]), a GeGLU MLP (`hidden_act`, where the legacy `gelu` means
//! the tanh approximation) and an explicit `head_dim` (256 when absent, as `GemmaConfig`).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, GemmaRmsNorm, KvCache, Linear, ScaledWordEmbedding,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Gemma model, as `GemmaConfig` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct GemmaConfig {
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
    /// MLP activation (`hidden_act`; `gelu` is read as `gelu_pytorch_tanh`).
    pub hidden_act: Activation,
    /// Bias on q, k, v and o projections.
    pub attention_bias: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

/// `hidden_act`, where the legacy `gelu` of the published Gemma configs means the tanh
/// approximation (`GemmaConfig.__post_init__` rewrites it to `gelu_pytorch_tanh`).
fn hidden_act(cfg: &Config) -> crate::Result<Activation> {
    if cfg.str_or("hidden_act", "gelu_pytorch_tanh")? == "gelu" {
        return Ok(Activation::GeluTanh);
    }
    Activation::from_config(cfg, "hidden_act", "gelu_pytorch_tanh")
}

/// Checks that the query heads are a positive multiple of the key/value heads.
fn check_heads(cfg: &Config, heads: usize, kv_heads: usize) -> crate::Result<()> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(cfg.error(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
    }
    Ok(())
}

impl GemmaConfig {
    /// Reads the keys `GemmaConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let num_attention_heads = cfg.usize(&["num_attention_heads"])?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 16)?;
        check_heads(cfg, num_attention_heads, num_key_value_heads)?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 8192)?;
        // `compute_default_rope_parameters` rotates the whole head (the scaled types read the factor).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        Ok(GemmaConfig {
            hidden_size: cfg.usize(&["hidden_size"])?,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers: cfg.usize(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: cfg.usize_or("head_dim", 256)?,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
            hidden_act: hidden_act(cfg)?,
            attention_bias: cfg.bool_or("attention_bias", false)?,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            rope,
        })
    }
}

/// `GemmaMLP`: down(act(gate(x)) * up(x)).
pub struct GemmaMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl GemmaMLP {
    fn new(cfg: &GemmaConfig, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(GemmaMLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GemmaMLP {
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
pub fn eager_attention_forward(
    module: &GemmaAttention,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attention_mask: Option<&Tensor>,
    scaling: f64,
    dropout: f64,
) -> Result<(Tensor, Tensor)> {
    let key_states = repeat_kv(key, module.num_key_value_groups)?;
    let value_states = repeat_kv(value, module.num_key_value_groups)?;
    let mut attn_weights = nn::ops::scale(&query.matmul(&key_states.transpose(2, 3)?)?, scaling)?;
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

/// `GemmaAttention`.
pub struct GemmaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl GemmaAttention {
    fn new(cfg: &GemmaConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(GemmaAttention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            scaling: (hd as f64).powf(-0.5),
            attention_dropout: 0.0,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GemmaAttention {
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
            self.scaling,
            self.attention_dropout,
        )?;
        let attn_output = attn_output.reshape((b, t, ()))?.contiguous()?;
        self.o_proj.forward(&attn_output)
    }
}

/// `GemmaDecoderLayer`.
pub struct GemmaDecoderLayer {
    self_attn: GemmaAttention,
    mlp: GemmaMLP,
    input_layernorm: GemmaRmsNorm,
    post_attention_layernorm: GemmaRmsNorm,
    scope: Scope,
}

#[hooked]
impl GemmaDecoderLayer {
    /// Pre-norm attention and MLP, each with a residual connection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
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
        let hidden_states = (residual + hidden_states)?;

        let residual = &hidden_states;
        let mlp_input = self.post_attention_layernorm.forward(&hidden_states)?;
        let mlp_output = self.mlp.forward(&mlp_input)?;
        residual + mlp_output
    }
}

/// `GemmaModel`: scaled embeddings, layers and the final norm.
pub struct GemmaModel {
    embed_tokens: ScaledWordEmbedding,
    layers: Vec<GemmaDecoderLayer>,
    norm: GemmaRmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl GemmaModel {
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
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            past_seen_tokens,
            None,
            dtype,
            device,
        )?;
        let position_embeddings = self.rotary_emb.cos_sin(position_ids, dtype, device)?;
        let mut hidden_states = inputs_embeds;
        for decoder_layer in &self.layers {
            hidden_states = decoder_layer.forward(
                &hidden_states,
                Some(&causal_mask),
                &position_embeddings,
                past_key_values,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `GemmaForCausalLM`: the model and its output head.
pub struct GemmaForCausalLM {
    model: GemmaModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GemmaForCausalLM {
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
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for GemmaForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GemmaForCausalLM::forward(
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

/// Builds a Gemma model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GemmaConfig::read(config)?;
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
        layers.push(GemmaDecoderLayer {
            self_attn: GemmaAttention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp: GemmaMLP::new(&cfg, vb_l.pp("mlp"))?,
            input_layernorm: GemmaRmsNorm::new(h, eps, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: GemmaRmsNorm::new(
                h,
                eps,
                vb_l.pp("post_attention_layernorm"),
            )?,
            scope: vb_l.scope::<GemmaDecoderLayer>(),
        });
    }
    let norm = GemmaRmsNorm::new(h, eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = GemmaModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        scope: vb_m.scope::<GemmaModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(GemmaForCausalLM {
        model,
        lm_head,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            hidden: h,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<GemmaForCausalLM>(),
    }))
}
