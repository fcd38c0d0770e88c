//! OLMo: `OlmoForCausalLM`.
//!
//! Ports transformers' `modeling_olmo.py`: LLaMA's layout with parameter-free layer norms
//! ([`OlmoLayerNorm`]) and `clip_qkv`, which clamps the query, key and value projections to
//! [-clip_qkv, clip_qkv] before the heads are split.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, Linear, OlmoLayerNorm,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of an OLMo model, as `OlmoConfig` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct OlmoConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (default: `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Head size (`head_dim`, else hidden / heads).
    pub head_dim: usize,
    /// MLP activation (`hidden_act`).
    pub hidden_act: Activation,
    /// Bias on q, k, v and o projections.
    pub attention_bias: bool,
    /// Clamp of the q, k, v projections (`None`: no clamp).
    pub clip_qkv: Option<f64>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl OlmoConfig {
    /// Reads the keys `OlmoConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize(&["hidden_size"])?;
        let num_attention_heads = cfg.usize(&["num_attention_heads"])?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                )));
        }
        let hidden_act = Activation::from_config(cfg, "hidden_act", "silu")?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 2048)?;
        // `compute_default_rope_parameters` rotates the whole head (the scaled types read the factor).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        Ok(OlmoConfig {
            hidden_size,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers: cfg.usize(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: cfg.usize_or("head_dim", hidden_size / num_attention_heads)?,
            hidden_act,
            attention_bias: cfg.bool_or("attention_bias", false)?,
            clip_qkv: cfg.opt_f64("clip_qkv")?,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            rope,
        })
    }
}

/// `OlmoMLP`: down(act(gate(x)) * up(x)).
pub struct OlmoMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl OlmoMLP {
    fn new(cfg: &OlmoConfig, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(OlmoMLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl OlmoMLP {
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
    module: &OlmoAttention,
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

/// `OlmoAttention`.
pub struct OlmoAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    clip_qkv: Option<f64>,
    layer_idx: usize,
    scope: Scope,
}

impl OlmoAttention {
    fn new(cfg: &OlmoConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(OlmoAttention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            scaling: (hd as f64).powf(-0.5),
            attention_dropout: 0.0,
            clip_qkv: cfg.clip_qkv,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl OlmoAttention {
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
        let mut query_states = self.q_proj.forward(hidden_states)?;
        let mut key_states = self.k_proj.forward(hidden_states)?;
        let mut value_states = self.v_proj.forward(hidden_states)?;
        if let Some(clip_qkv) = self.clip_qkv {
            query_states = query_states.clamp(-clip_qkv, clip_qkv)?;
            key_states = key_states.clamp(-clip_qkv, clip_qkv)?;
            value_states = value_states.clamp(-clip_qkv, clip_qkv)?;
        }
        let query_states = query_states.reshape(hidden_shape)?.transpose(1, 2)?;
        let key_states = key_states.reshape(hidden_shape)?.transpose(1, 2)?;
        let value_states = value_states.reshape(hidden_shape)?.transpose(1, 2)?;

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

/// `OlmoDecoderLayer`.
pub struct OlmoDecoderLayer {
    self_attn: OlmoAttention,
    mlp: OlmoMLP,
    input_layernorm: OlmoLayerNorm,
    post_attention_layernorm: OlmoLayerNorm,
    scope: Scope,
}

#[hooked]
impl OlmoDecoderLayer {
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

/// `OlmoModel`: embeddings, layers and the final norm.
pub struct OlmoModel {
    embed_tokens: Embedding,
    layers: Vec<OlmoDecoderLayer>,
    norm: OlmoLayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl OlmoModel {
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

/// `OlmoForCausalLM`: the model and its output head.
pub struct OlmoForCausalLM {
    model: OlmoModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl OlmoForCausalLM {
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

impl CausalLM for OlmoForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        OlmoForCausalLM::forward(
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

/// Builds an OLMo model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = OlmoConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let h = cfg.hidden_size;
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        layers.push(OlmoDecoderLayer {
            self_attn: OlmoAttention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp: OlmoMLP::new(&cfg, vb_l.pp("mlp"))?,
            input_layernorm: OlmoLayerNorm::new(h, vb_l.pp("input_layernorm")),
            post_attention_layernorm: OlmoLayerNorm::new(h, vb_l.pp("post_attention_layernorm")),
            scope: vb_l.scope::<OlmoDecoderLayer>(),
        });
    }
    let norm = OlmoLayerNorm::new(h, vb_m.pp("norm"));
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = OlmoModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        scope: vb_m.scope::<OlmoModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(OlmoForCausalLM {
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
        scope: root.scope::<OlmoForCausalLM>(),
    }))
}
