//! GPT-Neo (TinyStories), porting transformers' `modeling_gpt_neo.py`.
//!
//! Learned positions, per-layer `global` or `local` attention (`attention_types`; a local layer sees
//! the last `window_size` keys), attention scores that are not scaled by 1/sqrt(head size) and are
//! computed in float32 in `GPTNeoSelfAttention._attn`, whose `attn_dropout` output is the attention
//! probabilities.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{self, mask, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};
use serde_json::Value;

/// The configuration of a GPT-Neo model, as `GPTNeoConfig` reads it.
#[derive(Debug, Clone)]
pub struct GPTNeoConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Heads.
    pub num_heads: usize,
    /// MLP width (default 4 * hidden_size).
    pub intermediate_size: usize,
    /// Keys a `local` layer sees (the query's own and the `window_size - 1` before it).
    pub window_size: usize,
    /// `global` or `local` for each layer, expanded from `attention_types`.
    pub attention_layers: Vec<String>,
    /// MLP activation.
    pub activation_function: Activation,
    /// Dropout probabilities (unused at inference, kept for the modules).
    pub resid_dropout: f64,
    /// Embedding dropout.
    pub embed_dropout: f64,
    /// Attention dropout.
    pub attention_dropout: f64,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// `GPTNeoConfig.expand_attention_types_params`: `[[["global", "local"], 12]]` -> 24 entries.
fn expand_attention_types(cfg: &Config, types: &Value) -> crate::Result<Vec<String>> {
    let bad = || {
        cfg.error(format!(
                "key `attention_types` should be a list of [[\"global\" | \"local\", ...], count] pairs, found {types}"
            ),
        )
    };
    let mut out = Vec::new();
    for item in types.as_array().ok_or_else(bad)? {
        let pair = item.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
        let names = pair[0].as_array().ok_or_else(bad)?;
        let count = pair[1].as_u64().ok_or_else(bad)?;
        for _ in 0..count {
            for n in names {
                let n = n.as_str().ok_or_else(bad)?;
                if n != "global" && n != "local" {
                    return Err(cfg.error(format!(
                        "`attention_types` names layer type `{n}`; only `global` and `local` exist"
                    )));
                }
                out.push(n.to_string());
            }
        }
    }
    Ok(out)
}

impl GPTNeoConfig {
    /// Reads the keys `GPTNeoConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2048)?;
        let num_heads = cfg.usize_alias_or(&["num_heads", "num_attention_heads"], 16)?;
        let num_layers = cfg.usize_alias_or(&["num_layers", "num_hidden_layers"], 24)?;
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(cfg.error(format!(
                "hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )));
        }
        let attention_layers = match cfg.raw.get("attention_types") {
            None | Some(Value::Null) => {
                let default: Value = serde_json::json!([[["global", "local"], 12]]);
                expand_attention_types(cfg, &default)?
            }
            Some(v) => expand_attention_types(cfg, v)?,
        };
        if attention_layers.len() != num_layers {
            return Err(cfg.error(format!(
                "`attention_types` expands to {} layers, but num_layers is {num_layers}",
                attention_layers.len()
            )));
        }
        let activation_function = Activation::from_config(cfg, "activation_function", "gelu_new")?;
        let window_size = cfg.usize_or("window_size", 256)?;
        if window_size == 0 && attention_layers.iter().any(|t| t == "local") {
            return Err(cfg.error("window_size must be at least 1 when a layer is `local`"));
        }
        Ok(GPTNeoConfig {
            vocab_size: cfg.usize_or("vocab_size", 50257)?,
            max_position_embeddings: cfg.usize_or("max_position_embeddings", 2048)?,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size: cfg
                .opt_usize("intermediate_size")?
                .unwrap_or(4 * hidden_size),
            window_size,
            attention_layers,
            activation_function,
            resid_dropout: cfg.f64_or("resid_dropout", 0.0)?,
            embed_dropout: cfg.f64_or("embed_dropout", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
        })
    }
}

/// `GPTNeoSelfAttention`.
pub struct GPTNeoSelfAttention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    /// Dropout on the probabilities (the identity at inference; its output is the probabilities).
    pub attn_dropout: Dropout,
    resid_dropout: Dropout,
    num_heads: usize,
    head_dim: usize,
    /// `Some(window_size)` on a `local` layer.
    window: Option<usize>,
    layer_id: usize,
    scope: Scope,
}

impl GPTNeoSelfAttention {
    fn new(cfg: &GPTNeoConfig, layer_id: usize, vb: Builder) -> Result<Self> {
        let e = cfg.hidden_size;
        let local = cfg.attention_layers[layer_id] == "local";
        Ok(GPTNeoSelfAttention {
            k_proj: Linear::new(e, e, false, vb.pp("k_proj"))?,
            v_proj: Linear::new(e, e, false, vb.pp("v_proj"))?,
            q_proj: Linear::new(e, e, false, vb.pp("q_proj"))?,
            out_proj: Linear::new(e, e, true, vb.pp("out_proj"))?,
            attn_dropout: Dropout::new(cfg.attention_dropout, vb.pp("attn_dropout")),
            resid_dropout: Dropout::new(cfg.resid_dropout, vb.pp("resid_dropout")),
            num_heads: cfg.num_heads,
            head_dim: e / cfg.num_heads,
            window: local.then_some(cfg.window_size),
            layer_id,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GPTNeoSelfAttention {
    /// [B, T, H * D] -> [B, H, T, D].
    fn _split_heads(
        &self,
        tensor: &Tensor,
        num_heads: usize,
        attn_head_size: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = tensor.dims3()?;
        tensor
            .reshape((b, t, num_heads, attn_head_size))?
            .permute((0, 2, 1, 3))?
            .contiguous()
    }

    /// [B, H, T, D] -> [B, T, H * D].
    fn _merge_heads(
        &self,
        tensor: &Tensor,
        num_heads: usize,
        attn_head_size: usize,
    ) -> Result<Tensor> {
        let tensor = tensor.permute((0, 2, 1, 3))?.contiguous()?;
        let (b, t, _, _) = tensor.dims4()?;
        tensor.reshape((b, t, num_heads * attn_head_size))
    }

    /// Unscaled scores in float32, the layer's causal (or local) mask, then the padding mask:
    /// (attention output [B, H, T, D], probabilities [B, H, T, K]).
    fn _attn(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let query = query.to_dtype(DType::F32)?;
        let key = key.to_dtype(DType::F32)?;
        let attn_weights = query.matmul(&key.transpose(D::Minus1, D::Minus2)?)?;
        let (query_length, key_length) = (query.dim(D::Minus2)?, key.dim(D::Minus2)?);
        // `self.bias[:, :, key_length - query_length : key_length, :key_length]` with
        // `torch.where(causal_mask, attn_weights, finfo.min)`: the minimum absorbs any finite score.
        let causal_mask = mask::causal_mask(
            None,
            1,
            query_length,
            key_length - query_length,
            self.window,
            DType::F32,
            attn_weights.device(),
        )?;
        let mut attn_weights = nn::ops::add(&attn_weights, &causal_mask)?;
        if let Some(mask) = attention_mask {
            attn_weights = nn::ops::add(&attn_weights, &mask.to_dtype(DType::F32)?)?;
        }
        let attn_weights = nn::functional::softmax(&attn_weights, D::Minus1)?;
        let attn_weights = attn_weights.to_dtype(value.dtype())?;
        let attn_weights = self.attn_dropout.forward(&attn_weights)?;
        let attn_output = attn_weights.matmul(&value.contiguous()?)?;
        Ok((attn_output, attn_weights))
    }

    /// Self-attention over `hidden_states` [B, T, hidden].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        layer_past: Option<&KvCache>,
    ) -> Result<Tensor> {
        let query = self.q_proj.forward(hidden_states)?;
        let key = self.k_proj.forward(hidden_states)?;
        let value = self.v_proj.forward(hidden_states)?;

        let query = self._split_heads(&query, self.num_heads, self.head_dim)?;
        let key = self._split_heads(&key, self.num_heads, self.head_dim)?;
        let value = self._split_heads(&value, self.num_heads, self.head_dim)?;

        let (key, value) = match layer_past {
            Some(layer_past) => layer_past.update(&key, &value, self.layer_id)?,
            None => (key, value),
        };

        let (attn_output, _attn_weights) = self._attn(&query, &key, &value, attention_mask)?;

        let attn_output = self._merge_heads(&attn_output, self.num_heads, self.head_dim)?;
        let attn_output = self.out_proj.forward(&attn_output)?;
        self.resid_dropout.forward(&attn_output)
    }
}

/// `GPTNeoAttention`: holds the layer's `GPTNeoSelfAttention` (global or local).
pub struct GPTNeoAttention {
    attention: GPTNeoSelfAttention,
    scope: Scope,
}

#[hooked]
impl GPTNeoAttention {
    /// Calls `self.attention`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        layer_past: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.attention
            .forward(hidden_states, attention_mask, layer_past)
    }
}

/// `GPTNeoMLP`.
pub struct GPTNeoMLP {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
    dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl GPTNeoMLP {
    /// dropout(c_proj(act(c_fc(x)))).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.c_fc.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        let hidden_states = self.c_proj.forward(&hidden_states)?;
        self.dropout.forward(&hidden_states)
    }
}

/// `GPTNeoBlock`.
pub struct GPTNeoBlock {
    ln_1: LayerNorm,
    attn: GPTNeoAttention,
    ln_2: LayerNorm,
    mlp: GPTNeoMLP,
    scope: Scope,
}

#[hooked]
impl GPTNeoBlock {
    /// Pre-norm attention and MLP with residuals.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        layer_past: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.ln_1.forward(hidden_states)?;
        let attn_output = self
            .attn
            .forward(&hidden_states, layer_past, attention_mask)?;
        let hidden_states = (attn_output + residual)?;

        let residual = &hidden_states;
        let hidden_states = self.ln_2.forward(&hidden_states)?;
        let feed_forward_hidden_states = self.mlp.forward(&hidden_states)?;
        residual + feed_forward_hidden_states
    }
}

/// `GPTNeoModel`.
pub struct GPTNeoModel {
    wte: Embedding,
    wpe: Embedding,
    drop: Dropout,
    h: Vec<GPTNeoBlock>,
    ln_f: LayerNorm,
    scope: Scope,
}

#[hooked]
impl GPTNeoModel {
    /// Hidden states after `ln_f` [B, T, hidden].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let inputs_embeds = self.wte.forward(input_ids)?;
        let (batch, seq_len) = input_ids.dims2()?;
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            nn::past_len(cache),
            None,
            inputs_embeds.dtype(),
            inputs_embeds.device(),
        )?;
        let position_embeds = self.wpe.forward(position_ids)?;
        let hidden_states = (inputs_embeds + position_embeds)?;
        let mut hidden_states = self.drop.forward(&hidden_states)?;
        for block in self.h.iter() {
            hidden_states = block.forward(&hidden_states, cache, Some(&causal_mask))?;
        }
        self.ln_f.forward(&hidden_states)
    }
}

/// `GPTNeoForCausalLM`.
pub struct GPTNeoForCausalLM {
    transformer: GPTNeoModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GPTNeoForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let hidden_states =
            self.transformer
                .forward(input_ids, cache, attention_mask, position_ids)?;
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for GPTNeoForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GPTNeoForCausalLM::forward(
            self,
            input_ids,
            past_key_values,
            attention_mask,
            position_ids,
        )
    }

    fn dims(&self) -> Dims {
        self.dims
    }
}

/// Builds a GPT-Neo model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GPTNeoConfig::read(config)?;
    let root = vb.clone();
    // Checkpoints saved from `GPTNeoModel` have no `transformer.` prefix on their weights.
    let vb_t = if !vb.contains("transformer.wte.weight") && vb.contains("wte.weight") {
        vb.pp_module("transformer")
    } else {
        vb.pp("transformer")
    };
    let e = cfg.hidden_size;
    let wte = Embedding::new(cfg.vocab_size, e, vb_t.pp("wte"))?;
    let wpe = Embedding::new(cfg.max_position_embeddings, e, vb_t.pp("wpe"))?;
    let mut h = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let vb_l = vb_t.pp("h").pp(i);
        let vb_a = vb_l.pp("attn");
        let attn = GPTNeoAttention {
            attention: GPTNeoSelfAttention::new(&cfg, i, vb_a.pp("attention"))?,
            scope: vb_a.scope::<GPTNeoAttention>(),
        };
        let vb_mlp = vb_l.pp("mlp");
        let mlp = GPTNeoMLP {
            c_fc: Linear::new(e, cfg.intermediate_size, true, vb_mlp.pp("c_fc"))?,
            c_proj: Linear::new(cfg.intermediate_size, e, true, vb_mlp.pp("c_proj"))?,
            act: cfg.activation_function,
            dropout: Dropout::new(cfg.resid_dropout, vb_mlp.pp("dropout")),
            scope: vb_mlp.scope::<GPTNeoMLP>(),
        };
        h.push(GPTNeoBlock {
            ln_1: LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_l.pp("ln_1"))?,
            attn,
            ln_2: LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_l.pp("ln_2"))?,
            mlp,
            scope: vb_l.scope::<GPTNeoBlock>(),
        });
    }
    let ln_f = LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_t.pp("ln_f"))?;
    let transformer = GPTNeoModel {
        wte,
        wpe,
        drop: Dropout::new(cfg.embed_dropout, vb_t.pp("drop")),
        h,
        ln_f,
        scope: vb_t.scope::<GPTNeoModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(transformer.wte.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(e, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(GPTNeoForCausalLM {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.num_layers,
            heads: cfg.num_heads,
            kv_heads: cfg.num_heads,
            head_dim: e / cfg.num_heads,
            hidden: e,
            vocab: cfg.vocab_size,
            max_positions: Some(cfg.max_position_embeddings),
        },
        scope: root.scope::<GPTNeoForCausalLM>(),
    }))
}
