//! StableLM, porting transformers' `modeling_stablelm.py`.
//!
//! LayerNorm (with bias) everywhere, rotary embedding on the first `partial_rotary_factor` of each head,
//! optional per-head LayerNorm of queries and keys (`qk_layernorm`), optional parallel residual
//! (`use_parallel_residual`: attention and MLP both read `input_layernorm`'s output), optional q/k/v
//! bias, grouped-query attention. The attention is written out in the attention module, as
//! transformers 4.x did, so that the probabilities are the output of the module dropout
//! `self.attention_dropout`: the seed's `attentions.L.source.self_attention_dropout_0`.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a StableLM model, as transformers' `StableLmConfig` reads it.
#[derive(Debug, Clone)]
pub struct StableLmConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head size: hidden_size / num_attention_heads.
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v.
    pub use_qkv_bias: bool,
    /// Per-head LayerNorm (weight only) of queries and keys.
    pub qk_layernorm: bool,
    /// x + attn(ln(x)) + mlp(ln(x)) instead of two sequential residual blocks.
    pub use_parallel_residual: bool,
    /// Dropout after the MLP (the identity at inference).
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities (the identity at inference).
    pub attention_dropout: f64,
    /// RoPE parameters (`partial_rotary_factor` defaults to 0.25 for StableLM).
    pub rope: rope::RopeParams,
    /// The head size the rotary tables are computed for (`head_dim` in config.json if set, as
    /// transformers' rope functions read it, else hidden_size / num_attention_heads).
    pub rope_head_dim: usize,
}

impl StableLmConfig {
    /// Reads the keys `StableLmConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2560)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 32)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(cfg.error(format!("hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"),
            ));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        let hidden_act = Activation::from_config(cfg, "hidden_act", "silu")?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 4096)?;
        // `StableLmConfig` defaults `partial_rotary_factor` to 0.25 (not 1) when neither layout sets it.
        let in_params = cfg
            .raw
            .get("rope_parameters")
            .and_then(|v| v.as_object())
            .is_some_and(|m| m.get("partial_rotary_factor").is_some_and(|v| !v.is_null()));
        let at_top = cfg.opt_f64("partial_rotary_factor")?.is_some();
        if !in_params && !at_top {
            rope.partial_rotary_factor = 0.25;
        }
        if !(0.0..=1.0).contains(&rope.partial_rotary_factor) {
            return Err(cfg.error(format!(
                "partial_rotary_factor ({}) must be between 0 and 1",
                rope.partial_rotary_factor
            )));
        }
        let rope_head_dim = cfg
            .opt_usize("head_dim")?
            .filter(|d| *d > 0)
            .unwrap_or(head_dim);
        Ok(StableLmConfig {
            vocab_size: cfg.usize(&["vocab_size"])?,
            intermediate_size: cfg.usize_or("intermediate_size", 6912)?,
            hidden_size,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            layer_norm_eps: cfg.f64_or("layer_norm_eps", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            use_qkv_bias: cfg.bool_or("use_qkv_bias", false)?,
            qk_layernorm: cfg.bool_or("qk_layernorm", false)?,
            use_parallel_residual: cfg.bool_or("use_parallel_residual", false)?,
            hidden_dropout: cfg.f64_or("hidden_dropout", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            rope,
            rope_head_dim,
        })
    }
}

/// `StableLmMLP`: down(act(gate(x)) * up(x)).
pub struct StableLmMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

#[hooked]
impl StableLmMLP {
    /// down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let down_proj = self.down_proj.forward(&nn::ops::mul(
            &self.act_fn.forward(&self.gate_proj.forward(x)?)?,
            &self.up_proj.forward(x)?,
        )?)?;
        Ok(down_proj)
    }
}

/// `StableLmLayerNormPerHead`: one bias-free LayerNorm per head.
pub struct StableLmLayerNormPerHead {
    norms: Vec<LayerNorm>,
    scope: Scope,
}

impl StableLmLayerNormPerHead {
    fn new(dim: usize, num_heads: usize, eps: f64, vb: Builder) -> Result<Self> {
        let vb_n = vb.pp("norms");
        let norms = (0..num_heads)
            .map(|h| LayerNorm::new(dim, eps, false, vb_n.pp(h)))
            .collect::<Result<Vec<_>>>()?;
        Ok(StableLmLayerNormPerHead {
            norms,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl StableLmLayerNormPerHead {
    /// [B, H, T, D]: head h normalised by `norms[h]`.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        // Split along the num_heads axis to get per-head inputs.
        let states_per_heads = hidden_states.chunk(self.norms.len(), 1)?;
        let normed = self
            .norms
            .iter()
            .zip(states_per_heads.iter())
            .map(|(norm, hidden_states)| norm.forward(hidden_states))
            .collect::<Result<Vec<_>>>()?;
        // Normalize and merge the heads back together.
        Tensor::cat(&normed, 1)
    }
}

/// `StableLmAttention`.
pub struct StableLmAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_layernorm: Option<StableLmLayerNormPerHead>,
    k_layernorm: Option<StableLmLayerNormPerHead>,
    /// Dropout on the probabilities (the identity at inference; its output is what multiplies V).
    pub attention_dropout: Dropout,
    num_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    num_key_value_groups: usize,
    rotary_ndims: usize,
    scaling: f64,
    layer_idx: usize,
    scope: Scope,
}

impl StableLmAttention {
    fn new(cfg: &StableLmConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_layernorm, k_layernorm) = if cfg.qk_layernorm {
            (
                Some(StableLmLayerNormPerHead::new(
                    hd,
                    nh,
                    cfg.layer_norm_eps,
                    vb.pp("q_layernorm"),
                )?),
                Some(StableLmLayerNormPerHead::new(
                    hd,
                    nkv,
                    cfg.layer_norm_eps,
                    vb.pp("k_layernorm"),
                )?),
            )
        } else {
            (None, None)
        };
        Ok(StableLmAttention {
            q_proj: Linear::new(h, nh * hd, cfg.use_qkv_bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, cfg.use_qkv_bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, cfg.use_qkv_bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(h, h, false, vb.pp("o_proj"))?,
            q_layernorm,
            k_layernorm,
            attention_dropout: Dropout::new(cfg.attention_dropout, vb.pp("attention_dropout")),
            num_heads: nh,
            num_key_value_heads: nkv,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            rotary_ndims: (hd as f64 * cfg.rope.partial_rotary_factor) as usize,
            scaling: (hd as f64).powf(-0.5),
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl StableLmAttention {
    /// Self-attention over `hidden_states` [B, T, hidden]; `position_embeddings` is (cos, sin).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (bsz, q_len, _) = hidden_states.dims3()?;

        let query_states = self.q_proj.forward(hidden_states)?;
        let key_states = self.k_proj.forward(hidden_states)?;
        let value_states = self.v_proj.forward(hidden_states)?;

        let query_states = query_states
            .reshape((bsz, q_len, self.num_heads, self.head_dim))?
            .transpose(1, 2)?;
        let key_states = key_states
            .reshape((bsz, q_len, self.num_key_value_heads, self.head_dim))?
            .transpose(1, 2)?;
        let value_states = value_states
            .reshape((bsz, q_len, self.num_key_value_heads, self.head_dim))?
            .transpose(1, 2)?;

        let (query_states, key_states) = match (&self.q_layernorm, &self.k_layernorm) {
            (Some(q_layernorm), Some(k_layernorm)) => (
                q_layernorm.forward(&query_states)?,
                k_layernorm.forward(&key_states)?,
            ),
            _ => (query_states, key_states),
        };

        let (cos, sin) = position_embeddings;
        let rd = self.rotary_ndims;
        let pass = self.head_dim - rd;
        let (query_states, key_states) = if rd == 0 {
            // Nothing rotates (transformers rotates an empty slice).
            (query_states, key_states)
        } else {
            let query_rot = query_states.narrow(D::Minus1, 0, rd)?;
            let key_rot = key_states.narrow(D::Minus1, 0, rd)?;
            let (query_rot, key_rot) = apply_rotary_pos_emb(&query_rot, &key_rot, cos, sin)?;
            if pass == 0 {
                (query_rot, key_rot)
            } else {
                let query_pass = query_states.narrow(D::Minus1, rd, pass)?;
                let key_pass = key_states.narrow(D::Minus1, rd, pass)?;
                let query_states = Tensor::cat(&[&query_rot, &query_pass], D::Minus1)?;
                let key_states = Tensor::cat(&[&key_rot, &key_pass], D::Minus1)?;
                (query_states, key_states)
            }
        };

        let (key_states, value_states) = match past_key_values {
            Some(past_key_values) => {
                past_key_values.update(&key_states, &value_states, self.layer_idx)?
            }
            None => (key_states, value_states),
        };

        // Repeat k/v heads if n_kv_heads < n_heads.
        let key_states = repeat_kv(&key_states, self.num_key_value_groups)?;
        let value_states = repeat_kv(&value_states, self.num_key_value_groups)?;

        let query_states = query_states.contiguous()?;
        let key_states = key_states.contiguous()?;
        let mut attn_weights = nn::ops::scale(
            &query_states.matmul(&key_states.transpose(2, 3)?)?,
            self.scaling,
        )?;
        if let Some(mask) = attention_mask {
            attn_weights = nn::ops::add(&attn_weights, mask)?;
        }

        // Upcast attention to fp32.
        let attn_weights =
            nn::functional::softmax(&attn_weights, D::Minus1)?.to_dtype(query_states.dtype())?;
        let attn_weights = self.attention_dropout.forward(&attn_weights)?;

        let attn_output = attn_weights.matmul(&value_states.contiguous()?)?;
        let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
        let attn_output = attn_output.reshape((bsz, q_len, ()))?;
        self.o_proj.forward(&attn_output)
    }
}

/// `StableLmDecoderLayer`.
pub struct StableLmDecoderLayer {
    use_parallel_residual: bool,
    self_attn: StableLmAttention,
    mlp: StableLmMLP,
    input_layernorm: LayerNorm,
    post_attention_layernorm: Option<LayerNorm>,
    dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl StableLmDecoderLayer {
    /// Sequential (`x + attn(ln1(x))`, then `+ mlp(ln2(.))`) or parallel (`x + attn(ln1(x)) +
    /// mlp(ln1(x))`) residual block.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;

        let hidden_states = self.input_layernorm.forward(hidden_states)?;

        // Self Attention
        let self_attn_output = self.self_attn.forward(
            &hidden_states,
            attention_mask,
            position_embeddings,
            past_key_values,
        )?;

        match &self.post_attention_layernorm {
            Some(post_attention_layernorm) if !self.use_parallel_residual => {
                // x = x + attn(ln1(x)); x = x + mlp(ln2(x))
                let residual = (residual + self_attn_output)?;
                let mlp_output = self
                    .mlp
                    .forward(&post_attention_layernorm.forward(&residual)?)?;
                let mlp_output = self.dropout.forward(&mlp_output)?;
                residual + mlp_output
            }
            _ => {
                // x = x + attn(ln1(x)) + mlp(ln1(x))
                let mlp_output = self.mlp.forward(&hidden_states)?;
                let mlp_output = self.dropout.forward(&mlp_output)?;
                (residual + self_attn_output)? + mlp_output
            }
        }
    }
}

/// `StableLmModel`.
pub struct StableLmModel {
    embed_tokens: Embedding,
    layers: Vec<StableLmDecoderLayer>,
    norm: LayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl StableLmModel {
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
        let (dtype, device) = (inputs_embeds.dtype(), inputs_embeds.device().clone());
        let past_seen_tokens = nn::past_len(past_key_values);
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            past_seen_tokens,
            None,
            dtype,
            &device,
        )?;

        let mut hidden_states = inputs_embeds;
        let position_embeddings = self.rotary_emb.cos_sin(position_ids, dtype, &device)?;

        for decoder_layer in self.layers.iter() {
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

/// `StableLmForCausalLM`.
pub struct StableLmForCausalLM {
    model: StableLmModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl StableLmForCausalLM {
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

impl CausalLM for StableLmForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        StableLmForCausalLM::forward(
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

/// Builds a StableLM model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = StableLmConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = StableLmAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = StableLmMLP {
            gate_proj: Linear::new(h, cfg.intermediate_size, false, vb_mlp.pp("gate_proj"))?,
            up_proj: Linear::new(h, cfg.intermediate_size, false, vb_mlp.pp("up_proj"))?,
            down_proj: Linear::new(cfg.intermediate_size, h, false, vb_mlp.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb_mlp.scope::<StableLmMLP>(),
        };
        let input_layernorm = LayerNorm::new(h, eps, true, vb_l.pp("input_layernorm"))?;
        let post_attention_layernorm = if cfg.use_parallel_residual {
            None
        } else {
            Some(LayerNorm::new(
                h,
                eps,
                true,
                vb_l.pp("post_attention_layernorm"),
            )?)
        };
        layers.push(StableLmDecoderLayer {
            use_parallel_residual: cfg.use_parallel_residual,
            self_attn,
            mlp,
            input_layernorm,
            post_attention_layernorm,
            dropout: Dropout::new(cfg.hidden_dropout, vb_l.pp("dropout")),
            scope: vb_l.scope::<StableLmDecoderLayer>(),
        });
    }
    let norm = LayerNorm::new(h, eps, true, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.rope_head_dim)?;
    let model = StableLmModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        scope: vb_m.scope::<StableLmModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(StableLmForCausalLM {
        model,
        lm_head,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<StableLmForCausalLM>(),
    }))
}
