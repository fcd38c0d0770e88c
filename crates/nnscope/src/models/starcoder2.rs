//! Starcoder2, porting transformers' `modeling_starcoder2.py`.
//!
//! A LLaMA-like attention (GQA, RoPE over the whole head) with biases everywhere (`use_bias`), layer
//! norms with bias instead of RMS norms, a `c_fc` / `c_proj` MLP, and an optional sliding window on
//! every layer (`sliding_window`).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, LayerNorm, Linear,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Starcoder2 model, as `Starcoder2Config` reads it.
#[derive(Debug, Clone)]
pub struct Starcoder2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head size (`head_dim` if config.json has one, else hidden / heads).
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub norm_epsilon: f64,
    /// Keys each query sees on every layer (`None`: all earlier ones).
    pub sliding_window: Option<usize>,
    /// Dropout probabilities (unused at inference).
    pub attention_dropout: f64,
    /// Residual dropout.
    pub residual_dropout: f64,
    /// Embedding dropout.
    pub embedding_dropout: f64,
    /// Biases on every projection.
    pub use_bias: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl Starcoder2Config {
    /// Reads the keys `Starcoder2Config` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 3072)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 24)?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 2)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = cfg
            .opt_usize("head_dim")?
            .filter(|d| *d > 0)
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 {
            return Err(cfg.error(format!(
                    "hidden_size ({hidden_size}) is smaller than num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let hidden_act = Activation::from_config(cfg, "hidden_act", "gelu_pytorch_tanh")?;
        let max_position_embeddings = cfg.usize_or("max_position_embeddings", 4096)?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, max_position_embeddings)?;
        // `compute_default_rope_parameters` rotates the whole head (the scaled types read
        // `partial_rotary_factor` themselves).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        let sliding_window = cfg.opt_usize("sliding_window")?;
        if sliding_window == Some(0) {
            return Err(cfg.error("sliding_window must be at least 1 (or null for full attention)"));
        }
        Ok(Starcoder2Config {
            vocab_size: cfg.usize_or("vocab_size", 49152)?,
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 12288)?,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 30)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            norm_epsilon: cfg.f64_or("norm_epsilon", 1e-5)?,
            sliding_window,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            residual_dropout: cfg.f64_or("residual_dropout", 0.0)?,
            embedding_dropout: cfg.f64_or("embedding_dropout", 0.0)?,
            use_bias: cfg.bool_or("use_bias", true)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            rope,
        })
    }
}

/// `Starcoder2MLP`: dropout(c_proj(act(c_fc(x)))).
pub struct Starcoder2MLP {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
    residual_dropout: f64,
    scope: Scope,
}

#[hooked]
impl Starcoder2MLP {
    /// The feed-forward block.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.c_fc.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        let hidden_states = self.c_proj.forward(&hidden_states)?;
        nn::functional::dropout(&hidden_states, self.residual_dropout)
    }
}

/// transformers' `eager_attention_forward`: the attention output [B, T, H, D] and the probabilities
/// [B, H, T, K] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &Starcoder2Attention,
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

/// `Starcoder2Attention`.
pub struct Starcoder2Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    residual_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl Starcoder2Attention {
    fn new(cfg: &Starcoder2Config, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.use_bias;
        Ok(Starcoder2Attention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            scaling: (hd as f64).powf(-0.5),
            attention_dropout: cfg.attention_dropout,
            residual_dropout: cfg.residual_dropout,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Starcoder2Attention {
    /// Self-attention over `hidden_states` [B, T, hidden].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
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

        let (key_states, value_states) = match cache {
            Some(cache) => cache.update(&key_states, &value_states, self.layer_idx)?,
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
        let attn_output = attn_output.reshape((b, t, ()))?;
        let attn_output = self.o_proj.forward(&attn_output)?;
        nn::functional::dropout(&attn_output, self.residual_dropout)
    }
}

/// `Starcoder2DecoderLayer`.
pub struct Starcoder2DecoderLayer {
    self_attn: Starcoder2Attention,
    mlp: Starcoder2MLP,
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    scope: Scope,
}

#[hooked]
impl Starcoder2DecoderLayer {
    /// Pre-norm attention and MLP, each with a residual connection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
        position_embeddings: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.input_layernorm.forward(hidden_states)?;
        let hidden_states =
            self.self_attn
                .forward(&hidden_states, position_embeddings, attention_mask, cache)?;
        let hidden_states = (residual + hidden_states)?;

        let residual = &hidden_states;
        let mlp_input = self.post_attention_layernorm.forward(&hidden_states)?;
        let mlp_output = self.mlp.forward(&mlp_input)?;
        residual + mlp_output
    }
}

/// `Starcoder2Model`.
pub struct Starcoder2Model {
    embed_tokens: Embedding,
    layers: Vec<Starcoder2DecoderLayer>,
    norm: LayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Option<usize>,
    embedding_dropout: f64,
    scope: Scope,
}

#[hooked]
impl Starcoder2Model {
    /// Hidden states after the final norm [B, T, hidden].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        cache: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.embed_tokens.forward(input_ids)?;
        let (batch, seq_len) = input_ids.dims2()?;
        // `create_causal_mask`, or `create_sliding_window_causal_mask` with a window.
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            nn::past_len(cache),
            self.sliding_window,
            inputs_embeds.dtype(),
            inputs_embeds.device(),
        )?;
        let hidden_states = nn::functional::dropout(&inputs_embeds, self.embedding_dropout)?;
        let position_embeddings =
            self.rotary_emb
                .cos_sin(position_ids, hidden_states.dtype(), hidden_states.device())?;
        let mut hidden_states = hidden_states;
        for decoder_layer in self.layers.iter() {
            hidden_states = decoder_layer.forward(
                &hidden_states,
                Some(&causal_mask),
                cache,
                &position_embeddings,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `Starcoder2ForCausalLM`.
pub struct Starcoder2ForCausalLM {
    model: Starcoder2Model,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Starcoder2ForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        cache: Option<&KvCache>,
    ) -> Result<Tensor> {
        let hidden_states = self
            .model
            .forward(input_ids, attention_mask, position_ids, cache)?;
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for Starcoder2ForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Starcoder2ForCausalLM::forward(
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

/// Builds a Starcoder2 model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Starcoder2Config::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let h = cfg.hidden_size;
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let vb_mlp = vb_l.pp("mlp");
        let mlp = Starcoder2MLP {
            c_fc: Linear::new(h, cfg.intermediate_size, cfg.use_bias, vb_mlp.pp("c_fc"))?,
            c_proj: Linear::new(cfg.intermediate_size, h, cfg.use_bias, vb_mlp.pp("c_proj"))?,
            act: cfg.hidden_act,
            residual_dropout: cfg.residual_dropout,
            scope: vb_mlp.scope::<Starcoder2MLP>(),
        };
        layers.push(Starcoder2DecoderLayer {
            self_attn: Starcoder2Attention::new(&cfg, i, vb_l.pp("self_attn"))?,
            mlp,
            input_layernorm: LayerNorm::new(h, cfg.norm_epsilon, true, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: LayerNorm::new(
                h,
                cfg.norm_epsilon,
                true,
                vb_l.pp("post_attention_layernorm"),
            )?,
            scope: vb_l.scope::<Starcoder2DecoderLayer>(),
        });
    }
    let norm = LayerNorm::new(h, cfg.norm_epsilon, true, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Starcoder2Model {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        sliding_window: cfg.sliding_window,
        embedding_dropout: cfg.embedding_dropout,
        scope: vb_m.scope::<Starcoder2Model>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Starcoder2ForCausalLM {
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
        scope: root.scope::<Starcoder2ForCausalLM>(),
    }))
}
