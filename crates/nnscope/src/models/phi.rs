//! Phi-1 / Phi-1.5 / Phi-2 (`phi`), porting transformers' `modeling_phi.py` (5.24).
//!
//! One LayerNorm per layer feeds attention and MLP in parallel (`x + attn(ln(x)) + mlp(ln(x))`), the
//! rotary embedding turns the first `partial_rotary_factor` of each head (PhiConfig's default 0.5),
//! optional per-head LayerNorm of queries and keys (`qk_layernorm`), biases on every projection and on
//! `lm_head`, grouped-query attention.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Phi model, as transformers' `PhiConfig` reads it.
#[derive(Debug, Clone)]
pub struct PhiConfig {
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
    /// Head size (`head_dim` if config.json sets it, else hidden / heads).
    pub head_dim: usize,
    /// MLP activation (`gelu_new` by default).
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// lm_head shares the embedding matrix (its bias stays its own).
    pub tie_word_embeddings: bool,
    /// Per-head LayerNorm of queries and keys.
    pub qk_layernorm: bool,
    /// Dropouts (the identity at inference; kept as modules).
    pub resid_pdrop: f64,
    /// Dropout after the embeddings.
    pub embd_pdrop: f64,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f64,
    /// RoPE parameters (`partial_rotary_factor` defaults to 0.5).
    pub rope: rope::RopeParams,
}

impl PhiConfig {
    /// Reads the keys `PhiConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2048)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = match cfg.opt_usize("num_key_value_heads")? {
            Some(n) => n,
            None => num_attention_heads,
        };
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
        let head_dim = cfg
            .opt_usize("head_dim")?
            .filter(|d| *d > 0)
            .unwrap_or(hidden_size / num_attention_heads);
        let act_name = cfg.str_or("hidden_act", "gelu_new")?;
        let hidden_act = Activation::from_name(act_name).ok_or_else(|| {
            cfg.error(format!(
                "hidden_act `{act_name}` is not supported; supported: {}",
                nn::ACTIVATION_NAMES_LIST.join(", ")
            ))
        })?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 2048)?;
        // PhiConfig sets `partial_rotary_factor` to 0.5 when neither the rope dictionary nor the top
        // level gives one.
        let in_params = rope
            .params
            .get("partial_rotary_factor")
            .is_some_and(|v| !v.is_null());
        if !in_params && cfg.opt_f64("partial_rotary_factor")?.is_none() {
            rope.partial_rotary_factor = 0.5;
        }
        if !(0.0..=1.0).contains(&rope.partial_rotary_factor) {
            return Err(cfg.error(format!(
                "partial_rotary_factor ({}) must be between 0 and 1",
                rope.partial_rotary_factor
            )));
        }
        Ok(PhiConfig {
            vocab_size: cfg.usize_or("vocab_size", 51200)?,
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 8192)?,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 24)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            layer_norm_eps: cfg.f64_or("layer_norm_eps", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            qk_layernorm: cfg.bool_or("qk_layernorm", false)?,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.0)?,
            embd_pdrop: cfg.f64_or("embd_pdrop", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            rope,
        })
    }
}

/// transformers' `eager_attention_forward`: returns the attention output [B, T, H, D] and the
/// probabilities [B, H, T, past + T] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &PhiAttention,
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

/// `PhiAttention`.
pub struct PhiAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    q_layernorm: Option<LayerNorm>,
    k_layernorm: Option<LayerNorm>,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    rotary_ndims: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl PhiAttention {
    fn new(cfg: &PhiConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        // The per-head norms are sized hidden / heads, as in transformers.
        let norm_dim = h / nh;
        let (q_layernorm, k_layernorm) = if cfg.qk_layernorm {
            (
                Some(LayerNorm::new(
                    norm_dim,
                    cfg.layer_norm_eps,
                    true,
                    vb.pp("q_layernorm"),
                )?),
                Some(LayerNorm::new(
                    norm_dim,
                    cfg.layer_norm_eps,
                    true,
                    vb.pp("k_layernorm"),
                )?),
            )
        } else {
            (None, None)
        };
        Ok(PhiAttention {
            q_proj: Linear::new(h, nh * hd, true, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, true, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, true, vb.pp("v_proj"))?,
            dense: Linear::new(nh * hd, h, true, vb.pp("dense"))?,
            q_layernorm,
            k_layernorm,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            rotary_ndims: (hd as f64 * cfg.rope.partial_rotary_factor) as usize,
            scaling: (hd as f64).powf(-0.5),
            attention_dropout: cfg.attention_dropout,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl PhiAttention {
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

        let (query_states, key_states) = match (&self.q_layernorm, &self.k_layernorm) {
            (Some(q_layernorm), Some(k_layernorm)) => (
                q_layernorm.forward(&query_states)?,
                k_layernorm.forward(&key_states)?,
            ),
            _ => (query_states, key_states),
        };

        let (cos, sin) = position_embeddings;
        // Partial rotary embedding: the first `rotary_ndims` of each head turn, the rest pass.
        let rd = self.rotary_ndims;
        let pass = self.head_dim - rd;
        let (query_states, key_states) = if rd == 0 {
            // Nothing turns (transformers rotates an empty slice).
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
                // (candle's `cat` on the last axis returns a strided view: made contiguous for matmul)
                let query_states =
                    Tensor::cat(&[&query_rot, &query_pass], D::Minus1)?.contiguous()?;
                let key_states = Tensor::cat(&[&key_rot, &key_pass], D::Minus1)?.contiguous()?;
                (query_states, key_states)
            }
        };

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
        self.dense.forward(&attn_output)
    }
}

/// `PhiMLP`: fc2(act(fc1(x))).
pub struct PhiMLP {
    fc1: Linear,
    fc2: Linear,
    activation_fn: Activation,
    scope: Scope,
}

#[hooked]
impl PhiMLP {
    /// fc2(activation_fn(fc1(hidden_states))).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.fc1.forward(hidden_states)?;
        let hidden_states = self.activation_fn.forward(&hidden_states)?;
        self.fc2.forward(&hidden_states)
    }
}

/// `PhiDecoderLayer`: attention and MLP read the same LayerNorm output; both join the residual.
pub struct PhiDecoderLayer {
    self_attn: PhiAttention,
    mlp: PhiMLP,
    input_layernorm: LayerNorm,
    resid_dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl PhiDecoderLayer {
    /// x + attn(ln(x)) + mlp(ln(x)).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.input_layernorm.forward(hidden_states)?;
        let attn_outputs = self.self_attn.forward(
            &hidden_states,
            position_embeddings,
            attention_mask,
            past_key_values,
        )?;
        let attn_outputs = self.resid_dropout.forward(&attn_outputs)?;
        let feed_forward_hidden_states = self
            .resid_dropout
            .forward(&self.mlp.forward(&hidden_states)?)?;
        (attn_outputs + feed_forward_hidden_states)? + residual
    }
}

/// `PhiModel`: embeddings, layers and the final LayerNorm.
pub struct PhiModel {
    embed_tokens: Embedding,
    layers: Vec<PhiDecoderLayer>,
    rotary_emb: rope::RotaryEmbedding,
    embed_dropout: Dropout,
    final_layernorm: LayerNorm,
    scope: Scope,
}

#[hooked]
impl PhiModel {
    /// Hidden states after the final LayerNorm [B, T, hidden].
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
        let inputs_embeds = self.embed_dropout.forward(&inputs_embeds)?;
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
        self.final_layernorm.forward(&hidden_states)
    }
}

/// `PhiForCausalLM`: the model and its output head (with a bias).
pub struct PhiForCausalLM {
    model: PhiModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl PhiForCausalLM {
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

impl CausalLM for PhiForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        PhiForCausalLM::forward(
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

/// Builds a Phi model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = PhiConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = PhiAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = PhiMLP {
            fc1: Linear::new(h, cfg.intermediate_size, true, vb_mlp.pp("fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, h, true, vb_mlp.pp("fc2"))?,
            activation_fn: cfg.hidden_act,
            scope: vb_mlp.scope::<PhiMLP>(),
        };
        layers.push(PhiDecoderLayer {
            self_attn,
            mlp,
            input_layernorm: LayerNorm::new(h, eps, true, vb_l.pp("input_layernorm"))?,
            resid_dropout: Dropout::new(cfg.resid_pdrop, vb_l.pp("resid_dropout")),
            scope: vb_l.scope::<PhiDecoderLayer>(),
        });
    }
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = PhiModel {
        embed_tokens,
        layers,
        rotary_emb,
        embed_dropout: Dropout::new(cfg.embd_pdrop, vb_m.pp("embed_dropout")),
        final_layernorm: LayerNorm::new(h, eps, true, vb_m.pp("final_layernorm"))?,
        scope: vb_m.scope::<PhiModel>(),
    };
    let vb_head = root.pp("lm_head");
    let lm_head = if cfg.tie_word_embeddings {
        let bias = vb_head.get(cfg.vocab_size, "bias")?;
        Linear::from_weights(model.embed_tokens.weight.clone(), Some(bias), &vb_head)
    } else {
        Linear::new(h, cfg.vocab_size, true, vb_head)?
    };
    Ok(Box::new(PhiForCausalLM {
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
        scope: root.scope::<PhiForCausalLM>(),
    }))
}
