//! LLaMA-like models: `llama`, `mistral`, `qwen2`, `qwen3`.
//!
//! Ports transformers' `modeling_llama.py` (and the Mistral / Qwen2 / Qwen3 files, which differ from it
//! only in the points `LlamaConfig::read` reads: projection biases, sliding-window layers, and Qwen3's
//! per-head q/k RMS norm).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, Linear, RmsNorm};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a LLaMA-like model, as transformers reads it.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `model_type`.
    pub model_type: String,
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
    /// Head size (explicit `head_dim` or hidden / heads).
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Bias on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Qwen3's RMS norm of each query and key head.
    pub qk_norm: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding window of each layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl LlamaConfig {
    /// Reads the keys the Hugging Face classes read, with their defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let model_type = cfg.model_type()?.to_string();
        let hidden_size = cfg.usize(&["hidden_size"])?;
        let num_attention_heads = cfg.usize(&["num_attention_heads"])?;
        let num_hidden_layers = cfg.usize(&["num_hidden_layers"])?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", num_attention_heads)?;
        // Qwen3Config's `head_dim` defaults to 128; the others derive it from hidden / heads.
        let default_head_dim = match model_type.as_str() {
            "qwen3" => 128,
            _ => hidden_size / num_attention_heads.max(1),
        };
        let head_dim = cfg.usize_or("head_dim", default_head_dim)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(crate::Error::Config {
                path: cfg.path.clone(),
                msg: format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            });
        }
        let hidden_act = Activation::from_config(cfg, "hidden_act", "silu")?;
        let attention_bias = cfg.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, qk_norm) = match model_type.as_str() {
            "qwen2" => (true, false, false),
            "qwen3" => (attention_bias, attention_bias, true),
            "mistral" => (false, false, false),
            _ => (attention_bias, attention_bias, false),
        };
        let sliding = match model_type.as_str() {
            // Mistral applies its window to every layer (its config ignores `layer_types`); an absent
            // key is MistralConfig's default 4096, an explicit null is no window.
            "mistral" => {
                let window = match cfg.raw.get("sliding_window") {
                    None => Some(4096),
                    Some(_) => cfg.opt_usize("sliding_window")?,
                };
                vec![window.filter(|w| *w > 0); num_hidden_layers]
            }
            "qwen2" | "qwen3" => {
                // Qwen2Config / Qwen3Config set `sliding_window = None` unless `use_sliding_window`,
                // then derive `layer_types` (when not given) from `max_window_layers` (default 28).
                let window = if cfg.bool_or("use_sliding_window", false)? {
                    cfg.opt_usize("sliding_window")?.filter(|w| *w > 0)
                } else {
                    None
                };
                let types = if cfg.raw.get("layer_types").is_some_and(|v| !v.is_null()) {
                    cfg.layer_types(num_hidden_layers, false)?
                } else {
                    let max_window_layers = cfg.usize_or("max_window_layers", 28)?;
                    (0..num_hidden_layers)
                        .map(|i| i >= max_window_layers)
                        .collect()
                };
                types
                    .into_iter()
                    .map(|s| if s { window } else { None })
                    .collect()
            }
            _ => vec![None; num_hidden_layers],
        };
        let default_max_pos = match model_type.as_str() {
            "mistral" => 4096 * 32,
            "qwen2" | "qwen3" => 32768,
            _ => 2048,
        };
        // Only LlamaMLP reads `mlp_bias`; Mistral's and Qwen's MLPs have no biases.
        let mlp_bias = model_type == "llama" && cfg.bool_or("mlp_bias", false)?;
        Ok(LlamaConfig {
            model_type,
            hidden_size,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
            hidden_act,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            vocab_size: cfg.usize(&["vocab_size"])?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            sliding_window: sliding,
            rope: {
                let mut rope = rope::RopeParams::from_config(cfg, 10000.0, default_max_pos)?;
                // `compute_default_rope_parameters` of these models rotates the whole head and
                // ignores `partial_rotary_factor` (the scaled types read it).
                if rope.rope_type == "default" {
                    rope.partial_rotary_factor = 1.0;
                }
                rope
            },
        })
    }
}

/// `LlamaMLP`: down(act(gate(x)) * up(x)).
pub struct LlamaMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl LlamaMLP {
    fn new(cfg: &LlamaConfig, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(LlamaMLP {
            gate_proj: Linear::new(h, i, cfg.mlp_bias, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, cfg.mlp_bias, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, cfg.mlp_bias, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl LlamaMLP {
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
/// probabilities [B, H, T, T] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &LlamaAttention,
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

/// `LlamaAttention`.
pub struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl LlamaAttention {
    fn new(cfg: &LlamaConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(LlamaAttention {
            q_proj: Linear::new(h, nh * hd, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, cfg.o_bias, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
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
impl LlamaAttention {
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
        let query_states = self.q_proj.forward(hidden_states)?.reshape(hidden_shape)?;
        let key_states = self.k_proj.forward(hidden_states)?.reshape(hidden_shape)?;
        let value_states = self
            .v_proj
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;
        let (query_states, key_states) = match (&self.q_norm, &self.k_norm) {
            (Some(q_norm), Some(k_norm)) => {
                (q_norm.forward(&query_states)?, k_norm.forward(&key_states)?)
            }
            _ => (query_states, key_states),
        };
        let query_states = query_states.transpose(1, 2)?;
        let key_states = key_states.transpose(1, 2)?;

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
        let attn_output = attn_output.reshape((b, t, ()))?;
        self.o_proj.forward(&attn_output)
    }
}

/// `LlamaDecoderLayer`.
pub struct LlamaDecoderLayer {
    self_attn: LlamaAttention,
    mlp: LlamaMLP,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    scope: Scope,
}

#[hooked]
impl LlamaDecoderLayer {
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
        let hidden_states = nn::ops::add(residual, &hidden_states)?;

        let residual = &hidden_states;
        let mlp_input = self.post_attention_layernorm.forward(&hidden_states)?;
        let mlp_output = self.mlp.forward(&mlp_input)?;
        nn::ops::add(residual, &mlp_output)
    }
}

/// `LlamaModel`: embeddings, layers and the final norm.
pub struct LlamaModel {
    embed_tokens: Embedding,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Vec<Option<usize>>,
    scope: Scope,
}

#[hooked]
impl LlamaModel {
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
            let layer_mask = causal_mask_mapping.for_layer(*window);
            hidden_states = decoder_layer.forward(
                &hidden_states,
                Some(layer_mask),
                &position_embeddings,
                past_key_values,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `LlamaForCausalLM`: the model and its output head.
pub struct LlamaForCausalLM {
    model: LlamaModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl LlamaForCausalLM {
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

impl CausalLM for LlamaForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        LlamaForCausalLM::forward(
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

/// Builds a LLaMA-like model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = LlamaConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let embed_tokens = Embedding::new(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = LlamaAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let mlp = LlamaMLP::new(&cfg, vb_l.pp("mlp"))?;
        layers.push(LlamaDecoderLayer {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb_l.pp("input_layernorm"),
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb_l.pp("post_attention_layernorm"),
            )?,
            scope: vb_l.scope::<LlamaDecoderLayer>(),
        });
    }
    let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = LlamaModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        sliding_window: cfg.sliding_window.clone(),
        scope: vb_m.scope::<LlamaModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(cfg.hidden_size, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(LlamaForCausalLM {
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
        scope: root.scope::<LlamaForCausalLM>(),
    }))
}
