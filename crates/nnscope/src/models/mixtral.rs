//! Mixtral (`mixtral`), porting transformers' `modeling_mixtral.py` (5.24).
//!
//! Mistral's attention (GQA, an optional sliding window on every layer) with a sparse MoE block in
//! place of the MLP: `mlp.gate` routes each token to its top `num_experts_per_tok` of
//! `num_local_experts` experts (softmax in float32, top k, renormalized), `mlp.experts` runs them.
//! The router logits are the hookpoint `model.layers.L.mlp.gate.output.0`.
//!
//! Weights load from transformers 5's names (`mlp.gate`, fused `mlp.experts.gate_up_proj` /
//! `down_proj`) or the hub's (`block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w3/w2`).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::moe::{Experts, PerExpertLayout, TopKRouter};
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, Linear, RmsNorm};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Mixtral model, as transformers' `MixtralConfig` reads it.
#[derive(Debug, Clone)]
pub struct MixtralConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Width of each expert.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head size (explicit `head_dim`, else hidden / heads).
    pub head_dim: usize,
    /// Expert activation.
    pub hidden_act: Activation,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding window of every layer (`None`: full attention).
    pub sliding_window: Option<usize>,
    /// Attention dropout (the identity at inference).
    pub attention_dropout: f64,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Experts per layer.
    pub num_local_experts: usize,
    /// RoPE parameters (theta 1e6 by default).
    pub rope: rope::RopeParams,
}

impl MixtralConfig {
    /// Reads the keys `MixtralConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 4096)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 8)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        // `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`.
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
        // `attribute_map`: a config may say `num_experts` for `num_local_experts`.
        let num_local_experts = cfg.usize_alias_or(&["num_local_experts", "num_experts"], 8)?;
        let num_experts_per_tok = cfg.usize_or("num_experts_per_tok", 2)?;
        if num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts {
            return Err(cfg.error(format!(
                    "num_experts_per_tok ({num_experts_per_tok}) must be between 1 and num_local_experts ({num_local_experts})"
                ),
            ));
        }
        let mut rope = rope::RopeParams::from_config(cfg, 1_000_000.0, 4096 * 32)?;
        // Mixtral's default RoPE rotates the whole head (the scaled types read the factor).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        Ok(MixtralConfig {
            vocab_size: cfg.usize_or("vocab_size", 32000)?,
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 14336)?,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            sliding_window: cfg.opt_usize("sliding_window")?.filter(|w| *w > 0),
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            num_experts_per_tok,
            num_local_experts,
            rope,
        })
    }
}

/// `MixtralSparseMoeBlock`: the router and the experts.
pub struct MixtralSparseMoeBlock {
    gate: TopKRouter,
    experts: Experts,
    scope: Scope,
}

impl MixtralSparseMoeBlock {
    /// `vb` is the module path (`mlp`); `legacy` the hub checkpoints' `block_sparse_moe` prefix.
    fn new(cfg: &MixtralConfig, vb: Builder, legacy: Builder) -> Result<Self> {
        let (e, h) = (cfg.num_local_experts, cfg.hidden_size);
        let vg = vb.pp("gate");
        let gate_weights = if vg.contains("weight") {
            vg.clone()
        } else {
            legacy.pp("gate")
        };
        let gate = TopKRouter::new(
            e,
            h,
            cfg.num_experts_per_tok,
            true,
            false,
            vg,
            &gate_weights,
        )?;
        let ve = vb.pp("experts");
        let experts = Experts::new(
            e,
            h,
            cfg.intermediate_size,
            cfg.hidden_act,
            ve.clone(),
            &[
                PerExpertLayout {
                    vb: legacy.pp("experts"),
                    names: ["w1", "w3", "w2"],
                },
                PerExpertLayout {
                    vb: ve,
                    names: ["gate_proj", "up_proj", "down_proj"],
                },
            ],
        )?;
        Ok(MixtralSparseMoeBlock {
            gate,
            experts,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl MixtralSparseMoeBlock {
    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let (batch_size, sequence_length, hidden_dim) = hidden_states.dims3()?;
        let hidden_states = hidden_states.reshape(((), hidden_dim))?;
        let (_router_logits, top_k_weights, top_k_index) = self.gate.forward(&hidden_states)?;
        let hidden_states = self
            .experts
            .forward(&hidden_states, &top_k_index, &top_k_weights)?;
        hidden_states.reshape((batch_size, sequence_length, hidden_dim))
    }
}

/// transformers' `eager_attention_forward`: returns the attention output [B, T, H, D] and the
/// probabilities [B, H, T, past + T] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &MixtralAttention,
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

/// `MixtralAttention`.
pub struct MixtralAttention {
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

impl MixtralAttention {
    fn new(cfg: &MixtralConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(MixtralAttention {
            q_proj: Linear::new(h, nh * hd, false, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, false, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, false, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, false, vb.pp("o_proj"))?,
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
impl MixtralAttention {
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

/// `MixtralDecoderLayer`.
pub struct MixtralDecoderLayer {
    self_attn: MixtralAttention,
    mlp: MixtralSparseMoeBlock,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    scope: Scope,
}

#[hooked]
impl MixtralDecoderLayer {
    /// Pre-norm attention and sparse MoE block, each with a residual connection.
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
        let hidden_states = (residual + hidden_states)?;

        let residual = &hidden_states;
        let mlp_input = self.post_attention_layernorm.forward(&hidden_states)?;
        let mlp_output = self.mlp.forward(&mlp_input)?;
        residual + mlp_output
    }
}

/// `MixtralModel`: embeddings, layers and the final norm.
pub struct MixtralModel {
    embed_tokens: Embedding,
    layers: Vec<MixtralDecoderLayer>,
    norm: RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Option<usize>,
    scope: Scope,
}

#[hooked]
impl MixtralModel {
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
                &position_embeddings,
                Some(&causal_mask),
                past_key_values,
            )?;
        }
        self.norm.forward(&hidden_states)
    }
}

/// `MixtralForCausalLM`: the model and its output head.
pub struct MixtralForCausalLM {
    model: MixtralModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl MixtralForCausalLM {
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

impl CausalLM for MixtralForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        MixtralForCausalLM::forward(
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

/// Builds a Mixtral model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = MixtralConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = MixtralAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let mlp = MixtralSparseMoeBlock::new(&cfg, vb_l.pp("mlp"), vb_l.pp("block_sparse_moe"))?;
        layers.push(MixtralDecoderLayer {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::new(h, eps, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb_l.pp("post_attention_layernorm"))?,
            scope: vb_l.scope::<MixtralDecoderLayer>(),
        });
    }
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = MixtralModel {
        embed_tokens,
        layers,
        norm: RmsNorm::new(h, eps, vb_m.pp("norm"))?,
        rotary_emb,
        sliding_window: cfg.sliding_window,
        scope: vb_m.scope::<MixtralModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(MixtralForCausalLM {
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
        scope: root.scope::<MixtralForCausalLM>(),
    }))
}
