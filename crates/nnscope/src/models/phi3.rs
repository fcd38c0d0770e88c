//! Phi-3 / Phi-3.5 / Phi-4-mini (`phi3`), porting transformers' `modeling_phi3.py` (5.24).
//!
//! LLaMA-like with fused projections (`qkv_proj` holds q, k and v rows; `gate_up_proj` the gate then
//! the up rows), residual dropouts, rotary embedding over the first `partial_rotary_factor` of each
//! head, LongRoPE scaling (short factors up to `original_max_position_embeddings`, long factors
//! past it) and an optional sliding window on every layer.
//!
//! Generation: transformers' `Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache and
//! recomputes the whole sequence at the step where it first grows past
//! `original_max_position_embeddings` (so every cached key uses the long factors);
//! [`CausalLM::restart_cache`] tells nnscope's generation loop to do the same.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, rotate_half};
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Dropout, Embedding, KvCache, Linear, RmsNorm,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Phi-3 model, as transformers' `Phi3Config` reads it.
#[derive(Debug, Clone)]
pub struct Phi3Config {
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
    /// MLP activation.
    pub hidden_act: Activation,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Residual dropout (the identity at inference; kept as modules).
    pub resid_pdrop: f64,
    /// Attention dropout.
    pub attention_dropout: f64,
    /// Sliding window of every layer (`None`: full attention).
    pub sliding_window: Option<usize>,
    /// The pretraining context: past it LongRoPE switches to its long factors, and generation
    /// recomputes the cache once.
    pub original_max_position_embeddings: usize,
    /// RoPE parameters (`default` or `longrope`).
    pub rope: rope::RopeParams,
}

impl Phi3Config {
    /// Reads the keys `Phi3Config` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 3072)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = cfg
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
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
        let act_name = cfg.str_or("hidden_act", "silu")?;
        let hidden_act = Activation::from_name(act_name).ok_or_else(|| {
            cfg.error(format!(
                "hidden_act `{act_name}` is not supported; supported: {}",
                nn::ACTIVATION_NAMES_LIST.join(", ")
            ))
        })?;
        let max_position_embeddings = cfg.usize_or("max_position_embeddings", 4096)?;
        let original_max_position_embeddings =
            cfg.usize_or("original_max_position_embeddings", 4096)?;
        // Phi3Config renames the legacy types `su` and `yarn` to `longrope` and accepts only
        // `default` and `longrope`.
        let mut c = cfg.clone();
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(serde_json::Value::Object(m)) = c.raw.get_mut(key) {
                for tk in ["rope_type", "type"] {
                    if let Some(t) = m.get_mut(tk) {
                        if matches!(t.as_str(), Some("su") | Some("yarn")) {
                            *t = serde_json::Value::from("longrope");
                        }
                    }
                }
            }
        }
        let mut rope = rope::RopeParams::from_config(&c, 10000.0, max_position_embeddings)?;
        if !matches!(rope.rope_type.as_str(), "default" | "longrope") {
            return Err(cfg.error(format!(
                "rope_parameters.rope_type `{}` is not supported by Phi-3 (default or longrope)",
                rope.rope_type
            )));
        }
        // The top-level `original_max_position_embeddings` (class default 4096) wins over the rope
        // dictionary's.
        rope.params.insert(
            "original_max_position_embeddings".into(),
            serde_json::Value::from(original_max_position_embeddings),
        );
        if !(0.0..=1.0).contains(&rope.partial_rotary_factor) {
            return Err(cfg.error(format!(
                "partial_rotary_factor ({}) must be between 0 and 1",
                rope.partial_rotary_factor
            )));
        }
        if rope.rope_type == "longrope" {
            let half = (hidden_size / num_attention_heads) as f64 * rope.partial_rotary_factor;
            let half = half as usize / 2;
            for key in ["short_factor", "long_factor"] {
                let n = rope
                    .params
                    .get(key)
                    .and_then(|v| v.as_array())
                    .map(|a| a.len());
                if n != Some(half) {
                    return Err(cfg.error(format!(
                        "rope_parameters.{key} must be a list of {half} numbers, found {}",
                        rope.params
                            .get(key)
                            .map_or("nothing".into(), |v| v.to_string())
                    )));
                }
            }
        }
        Ok(Phi3Config {
            vocab_size: cfg.usize_or("vocab_size", 32064)?,
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 8192)?,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            sliding_window: cfg.opt_usize("sliding_window")?.filter(|w| *w > 0),
            original_max_position_embeddings,
            rope,
        })
    }
}

/// `Phi3MLP`: down(up * act(gate)), gate and up from one fused projection.
pub struct Phi3MLP {
    gate_up_proj: Linear,
    down_proj: Linear,
    activation_fn: Activation,
    scope: Scope,
}

#[hooked]
impl Phi3MLP {
    /// down_proj(up * activation_fn(gate)) with (gate, up) = gate_up_proj(x).chunk(2).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let up_states = self.gate_up_proj.forward(hidden_states)?;
        let chunks = up_states.chunk(2, D::Minus1)?;
        let (gate, up_states) = (&chunks[0], &chunks[1]);
        let up_states = (up_states * self.activation_fn.forward(gate)?)?;
        self.down_proj.forward(&up_states)
    }
}

/// Phi-3's `apply_rotary_pos_emb`: rotates the first `cos.shape[-1]` dims of each head of q and k
/// ([B, H, T, D]), passing the rest; cos/sin are [B, T, rotary dims].
#[hooked]
pub fn apply_rotary_pos_emb(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let rotary_dim = cos.dim(D::Minus1)?;
    let head_dim = q.dim(D::Minus1)?;
    let pass = head_dim - rotary_dim;
    let q_rot = q.narrow(D::Minus1, 0, rotary_dim)?;
    let k_rot = k.narrow(D::Minus1, 0, rotary_dim)?;
    let q_embed = (q_rot.broadcast_mul(&cos)? + rotate_half(&q_rot)?.broadcast_mul(&sin)?)?;
    let k_embed = (k_rot.broadcast_mul(&cos)? + rotate_half(&k_rot)?.broadcast_mul(&sin)?)?;
    if pass == 0 {
        return Ok((q_embed, k_embed));
    }
    let q_pass = q.narrow(D::Minus1, rotary_dim, pass)?;
    let k_pass = k.narrow(D::Minus1, rotary_dim, pass)?;
    // (candle's `cat` on the last axis returns a strided view: made contiguous for matmul)
    let q_embed = Tensor::cat(&[&q_embed, &q_pass], D::Minus1)?.contiguous()?;
    let k_embed = Tensor::cat(&[&k_embed, &k_pass], D::Minus1)?.contiguous()?;
    Ok((q_embed, k_embed))
}

/// transformers' `eager_attention_forward`: returns the attention output [B, T, H, D] and the
/// probabilities [B, H, T, past + T] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &Phi3Attention,
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

/// `Phi3Attention`: one fused `qkv_proj`.
pub struct Phi3Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl Phi3Attention {
    fn new(cfg: &Phi3Config, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let op_size = nh * hd + 2 * (nkv * hd);
        Ok(Phi3Attention {
            o_proj: Linear::new(nh * hd, h, false, vb.pp("o_proj"))?,
            qkv_proj: Linear::new(h, op_size, false, vb.pp("qkv_proj"))?,
            num_attention_heads: nh,
            num_key_value_heads: nkv,
            head_dim: hd,
            num_key_value_groups: nh / nkv,
            scaling: (hd as f64).powf(-0.5),
            attention_dropout: cfg.attention_dropout,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Phi3Attention {
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
        let qkv = self.qkv_proj.forward(hidden_states)?;
        let query_pos = self.num_attention_heads * self.head_dim;
        let kv_size = self.num_key_value_heads * self.head_dim;
        let query_states = qkv.narrow(D::Minus1, 0, query_pos)?;
        let key_states = qkv.narrow(D::Minus1, query_pos, kv_size)?;
        let value_states = qkv.narrow(D::Minus1, query_pos + kv_size, kv_size)?;

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

/// `Phi3DecoderLayer`.
pub struct Phi3DecoderLayer {
    self_attn: Phi3Attention,
    mlp: Phi3MLP,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    resid_attn_dropout: Dropout,
    resid_mlp_dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl Phi3DecoderLayer {
    /// Pre-norm attention and MLP, each with a (dropout) residual connection.
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
        let hidden_states = (residual + self.resid_attn_dropout.forward(&hidden_states)?)?;

        let residual = &hidden_states;
        let mlp_input = self.post_attention_layernorm.forward(&hidden_states)?;
        let mlp_output = self.mlp.forward(&mlp_input)?;
        residual + self.resid_mlp_dropout.forward(&mlp_output)?
    }
}

/// `Phi3Model`: embeddings, layers and the final norm.
pub struct Phi3Model {
    embed_tokens: Embedding,
    layers: Vec<Phi3DecoderLayer>,
    norm: RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Option<usize>,
    scope: Scope,
}

#[hooked]
impl Phi3Model {
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
        // One mask for every layer: sliding when the config has a window.
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            past_seen_tokens,
            self.sliding_window,
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

/// `Phi3ForCausalLM`: the model and its output head.
pub struct Phi3ForCausalLM {
    model: Phi3Model,
    lm_head: Linear,
    original_max_position_embeddings: usize,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Phi3ForCausalLM {
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

impl CausalLM for Phi3ForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Phi3ForCausalLM::forward(
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

    /// `prepare_inputs_for_generation`: with `input_ids.shape[1] >= original_max_position_embeddings
    /// + 1` and at most `original_max_position_embeddings` tokens cached, the cache is dropped.
    fn restart_cache(&self, past: usize, total: usize) -> bool {
        let omp = self.original_max_position_embeddings;
        past > 0 && total > omp && past <= omp
    }
}

/// Builds a Phi-3 model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Phi3Config::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = Phi3Attention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = Phi3MLP {
            gate_up_proj: Linear::new(
                h,
                2 * cfg.intermediate_size,
                false,
                vb_mlp.pp("gate_up_proj"),
            )?,
            down_proj: Linear::new(cfg.intermediate_size, h, false, vb_mlp.pp("down_proj"))?,
            activation_fn: cfg.hidden_act,
            scope: vb_mlp.scope::<Phi3MLP>(),
        };
        layers.push(Phi3DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::new(h, eps, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb_l.pp("post_attention_layernorm"))?,
            resid_attn_dropout: Dropout::new(cfg.resid_pdrop, vb_l.pp("resid_attn_dropout")),
            resid_mlp_dropout: Dropout::new(cfg.resid_pdrop, vb_l.pp("resid_mlp_dropout")),
            scope: vb_l.scope::<Phi3DecoderLayer>(),
        });
    }
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Phi3Model {
        embed_tokens,
        layers,
        norm: RmsNorm::new(h, eps, vb_m.pp("norm"))?,
        rotary_emb,
        sliding_window: cfg.sliding_window,
        scope: vb_m.scope::<Phi3Model>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Phi3ForCausalLM {
        model,
        lm_head,
        original_max_position_embeddings: cfg.original_max_position_embeddings,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<Phi3ForCausalLM>(),
    }))
}
