//! OLMo 2: `Olmo2ForCausalLM`.
//!
//! Ports transformers' `modeling_olmo2.py`: LLaMA's layout with the norms moved after the attention
//! and after the MLP (no input norm), and an RMS norm of the queries and keys over the whole
//! projection (all heads at once, before the heads are split). Its RMS norm ([`Olmo2RmsNorm`])
//! scales in float32 before casting back.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, Linear, Olmo2RmsNorm,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of an OLMo 2 model, as `Olmo2Config` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct Olmo2Config {
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
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl Olmo2Config {
    /// Reads the keys `Olmo2Config` reads, with its defaults.
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
        Ok(Olmo2Config {
            hidden_size,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers: cfg.usize(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: cfg.usize_or("head_dim", hidden_size / num_attention_heads)?,
            hidden_act,
            attention_bias: cfg.bool_or("attention_bias", false)?,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-5)?,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            rope,
        })
    }
}

/// `Olmo2MLP`: down(act(gate(x)) * up(x)).
pub struct Olmo2MLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl Olmo2MLP {
    fn new(cfg: &Olmo2Config, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Olmo2MLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Olmo2MLP {
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
    module: &Olmo2Attention,
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

/// `Olmo2Attention`.
pub struct Olmo2Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Olmo2RmsNorm,
    k_norm: Olmo2RmsNorm,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl Olmo2Attention {
    fn new(cfg: &Olmo2Config, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Olmo2Attention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            q_norm: Olmo2RmsNorm::new(nh * hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: Olmo2RmsNorm::new(nkv * hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
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
impl Olmo2Attention {
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
        let query_states = self.q_norm.forward(&self.q_proj.forward(hidden_states)?)?;
        let key_states = self.k_norm.forward(&self.k_proj.forward(hidden_states)?)?;
        let value_states = self.v_proj.forward(hidden_states)?;
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

/// `Olmo2DecoderLayer`.
pub struct Olmo2DecoderLayer {
    self_attn: Olmo2Attention,
    mlp: Olmo2MLP,
    post_attention_layernorm: Olmo2RmsNorm,
    post_feedforward_layernorm: Olmo2RmsNorm,
    scope: Scope,
}

#[hooked]
impl Olmo2DecoderLayer {
    /// Attention and MLP, each normed after, each with a residual connection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.self_attn.forward(
            hidden_states,
            position_embeddings,
            attention_mask,
            past_key_values,
        )?;
        let hidden_states = self.post_attention_layernorm.forward(&hidden_states)?;
        let hidden_states = (residual + hidden_states)?;

        let residual = &hidden_states;
        let hidden_states = self.mlp.forward(&hidden_states)?;
        let hidden_states = self.post_feedforward_layernorm.forward(&hidden_states)?;
        residual + hidden_states
    }
}

/// `Olmo2Model`: embeddings, layers and the final norm.
pub struct Olmo2Model {
    embed_tokens: Embedding,
    layers: Vec<Olmo2DecoderLayer>,
    norm: Olmo2RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl Olmo2Model {
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

/// `Olmo2ForCausalLM`: the model and its output head.
pub struct Olmo2ForCausalLM {
    model: Olmo2Model,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Olmo2ForCausalLM {
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

impl CausalLM for Olmo2ForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Olmo2ForCausalLM::forward(
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

/// Builds an OLMo 2 model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Olmo2Config::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        layers.push(Olmo2DecoderLayer {
            self_attn: Olmo2Attention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp: Olmo2MLP::new(&cfg, vb_l.pp("mlp"))?,
            post_attention_layernorm: Olmo2RmsNorm::new(
                h,
                eps,
                vb_l.pp("post_attention_layernorm"),
            )?,
            post_feedforward_layernorm: Olmo2RmsNorm::new(
                h,
                eps,
                vb_l.pp("post_feedforward_layernorm"),
            )?,
            scope: vb_l.scope::<Olmo2DecoderLayer>(),
        });
    }
    let norm = Olmo2RmsNorm::new(h, eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Olmo2Model {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        scope: vb_m.scope::<Olmo2Model>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Olmo2ForCausalLM {
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
        scope: root.scope::<Olmo2ForCausalLM>(),
    }))
}
