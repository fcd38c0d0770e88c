//! Qwen2-MoE (`qwen2_moe`).
//!
//! Ports transformers' `modeling_qwen2_moe.py` (5.24) with one deliberate difference kept from
//! transformers 4.x: the attention is written out inside `Qwen2MoeAttention::forward`, calling
//! `nn.functional.dropout` directly, so that the attention probabilities are the hookpoint
//! `attentions.L.source.nn_functional_dropout_0` named by the seed's table (5.x moved that call into a
//! shared `eager_attention_forward`; the arithmetic is the same).
//!
//! The sparse block mirrors 5.24's module tree: `mlp.gate` (top-k router), `mlp.experts` (every
//! expert's weights as fused 3-D tensors, loaded from either the fused or the per-expert checkpoint
//! layout), `mlp.shared_expert` and `mlp.shared_expert_gate`. Only the experts some token is routed to
//! are computed, each on its own tokens (gathered with `index_select`, added back with `index_add`).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::functional as F;
use crate::nn::moe::{Experts, PerExpertLayout, TopKRouter};
use crate::nn::repeat_kv;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, Activation, Builder, Embedding, KvCache, Linear, RmsNorm};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Qwen2-MoE model, as `Qwen2MoeConfig` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct Qwen2MoeConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// Width of the dense MLP of `mlp_only_layers` (and of layers off the sparse step).
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Activation of every MLP and expert.
    pub hidden_act: Activation,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Bias on q, k, v.
    pub qkv_bias: bool,
    /// Attention dropout (inactive at inference, kept for the dropout call).
    pub attention_dropout: f64,
    /// Sliding window of each layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Whether layer i is a sparse MoE block (else a dense `Qwen2MoeMLP`).
    pub sparse: Vec<bool>,
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Renormalize the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
    /// Width of each routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the shared expert.
    pub shared_expert_intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl Qwen2MoeConfig {
    /// Reads the keys `Qwen2MoeConfig` reads, with its defaults and its `__post_init__`.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2048)?;
        let num_hidden_layers = cfg.usize_or("num_hidden_layers", 24)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 16)?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 16)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = cfg.usize_or("head_dim", hidden_size / num_attention_heads)?;
        let hidden_act = Activation::from_config(cfg, "hidden_act", "silu")?;
        // `__post_init__`: the window only exists with `use_sliding_window`, and the default layer
        // types put it on even layers below `max_window_layers`.
        let use_sliding_window = cfg.bool_or("use_sliding_window", false)?;
        let window = if use_sliding_window {
            cfg.raw
                .get("sliding_window")
                .map_or(Ok(Some(4096)), |_| cfg.opt_usize("sliding_window"))?
        } else {
            None
        };
        // A window of 0 (what `save_pretrained` writes when sliding is off) means full attention.
        let window = window.filter(|w| *w > 0);
        let max_window_layers = cfg.usize_or("max_window_layers", 28)?;
        let layer_types: Vec<bool> = match cfg.opt_str_list("layer_types")? {
            Some(lt) => {
                if lt.len() < num_hidden_layers {
                    return Err(cfg.error(format!(
                        "`layer_types` has {} entries for {num_hidden_layers} layers",
                        lt.len()
                    )));
                }
                lt.iter()
                    .take(num_hidden_layers)
                    .map(|t| t == "sliding_attention")
                    .collect()
            }
            None => (0..num_hidden_layers)
                .map(|i| (i + 1) % 2 == 1 && i < max_window_layers && use_sliding_window)
                .collect(),
        };
        let sliding_window = layer_types
            .iter()
            .map(|s| if *s { window } else { None })
            .collect();

        let num_experts = cfg.usize_or("num_experts", 60)?;
        let num_experts_per_tok = cfg.usize_or("num_experts_per_tok", 4)?;
        let decoder_sparse_step = cfg.usize_or("decoder_sparse_step", 1)?;
        let mlp_only_layers = cfg.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
        if num_experts > 0 && decoder_sparse_step == 0 {
            return Err(cfg.error("decoder_sparse_step must be at least 1"));
        }
        if num_experts > 0 && (num_experts_per_tok == 0 || num_experts_per_tok > num_experts) {
            return Err(cfg.error(format!("num_experts_per_tok ({num_experts_per_tok}) must be between 1 and num_experts ({num_experts})"),
            ));
        }
        let sparse = (0..num_hidden_layers)
            .map(|i| {
                !mlp_only_layers.contains(&i)
                    && num_experts > 0
                    && (i + 1) % decoder_sparse_step == 0
            })
            .collect();
        Ok(Qwen2MoeConfig {
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 5632)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
            qkv_bias: cfg.bool_or("qkv_bias", true)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            sliding_window,
            sparse,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: cfg.bool_or("norm_topk_prob", false)?,
            moe_intermediate_size: cfg.usize_or("moe_intermediate_size", 1408)?,
            shared_expert_intermediate_size: cfg
                .usize_or("shared_expert_intermediate_size", 5632)?,
            vocab_size: cfg.usize_or("vocab_size", 151936)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            rope: rope::RopeParams::from_config(cfg, 10000.0, 32768)?,
        })
    }
}

/// `Qwen2MoeMLP`: down(act(gate(x)) * up(x)), the dense MLP and the shared expert.
pub struct Qwen2MoeMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl Qwen2MoeMLP {
    fn new(cfg: &Qwen2MoeConfig, intermediate_size: usize, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, intermediate_size);
        Ok(Qwen2MoeMLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Qwen2MoeMLP {
    /// down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let down_proj = self.down_proj.forward(&nn::ops::mul(
            &self.act_fn.forward(&self.gate_proj.forward(x)?)?,
            &self.up_proj.forward(x)?,
        )?)?;
        Ok(down_proj)
    }
}

/// `Qwen2MoeSparseMoeBlock`: routed experts plus a sigmoid-gated shared expert.
pub struct Qwen2MoeSparseMoeBlock {
    gate: TopKRouter,
    experts: Experts,
    shared_expert: Qwen2MoeMLP,
    shared_expert_gate: Linear,
    scope: Scope,
}

impl Qwen2MoeSparseMoeBlock {
    fn new(cfg: &Qwen2MoeConfig, vb: Builder) -> Result<Self> {
        let vg = vb.pp("gate");
        let gate = TopKRouter::new(
            cfg.num_experts,
            cfg.hidden_size,
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            true,
            vg.clone(),
            &vg,
        )?;
        let ve = vb.pp("experts");
        Ok(Qwen2MoeSparseMoeBlock {
            gate,
            experts: Experts::new(
                cfg.num_experts,
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.hidden_act,
                ve.clone(),
                &[PerExpertLayout {
                    vb: ve,
                    names: ["gate_proj", "up_proj", "down_proj"],
                }],
            )?,
            shared_expert: Qwen2MoeMLP::new(
                cfg,
                cfg.shared_expert_intermediate_size,
                vb.pp("shared_expert"),
            )?,
            shared_expert_gate: Linear::new(
                cfg.hidden_size,
                1,
                false,
                vb.pp("shared_expert_gate"),
            )?,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Qwen2MoeSparseMoeBlock {
    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let (batch_size, sequence_length, hidden_dim) = hidden_states.dims3()?;
        let hidden_states_reshaped = hidden_states.reshape(((), hidden_dim))?;
        let shared_expert_output = self.shared_expert.forward(&hidden_states_reshaped)?;
        let (_router_logits, routing_weights, selected_experts) =
            self.gate.forward(&hidden_states_reshaped)?;
        let expert_output =
            self.experts
                .forward(&hidden_states_reshaped, &selected_experts, &routing_weights)?;

        let shared_expert_output =
            F::sigmoid(&self.shared_expert_gate.forward(&hidden_states_reshaped)?)?
                .broadcast_mul(&shared_expert_output)?;

        let expert_output = (expert_output + shared_expert_output)?;
        expert_output.reshape((batch_size, sequence_length, hidden_dim))
    }
}

/// A decoder layer's feed-forward: sparse MoE block or dense MLP (`mlp_only_layers`,
/// `decoder_sparse_step`).
pub enum Qwen2MoeFeedForward {
    /// `Qwen2MoeSparseMoeBlock`.
    Sparse(Qwen2MoeSparseMoeBlock),
    /// `Qwen2MoeMLP` with `intermediate_size`.
    Dense(Qwen2MoeMLP),
}

impl Qwen2MoeFeedForward {
    /// Runs the block (each variant is a module with its own scope).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Qwen2MoeFeedForward::Sparse(m) => m.forward(x),
            Qwen2MoeFeedForward::Dense(m) => m.forward(x),
        }
    }
}

/// `Qwen2MoeAttention`, with transformers 4.x's inline eager attention.
pub struct Qwen2MoeAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl Qwen2MoeAttention {
    fn new(cfg: &Qwen2MoeConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Qwen2MoeAttention {
            q_proj: Linear::new(h, nh * hd, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, false, vb.pp("o_proj"))?,
            num_heads: nh,
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
impl Qwen2MoeAttention {
    /// Self-attention over `hidden_states` [B, T, hidden]; the probabilities that multiply V are the
    /// output of `nn_functional_dropout_0`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
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

        let (cos, sin) = position_embeddings;
        let (query_states, key_states) =
            apply_rotary_pos_emb(&query_states, &key_states, cos, sin)?;
        let (key_states, value_states) = match past_key_values {
            Some(past_key_values) => {
                past_key_values.update(&key_states, &value_states, self.layer_idx)?
            }
            None => (key_states, value_states),
        };

        let key_states = repeat_kv(&key_states, self.num_key_value_groups)?;
        let value_states = repeat_kv(&value_states, self.num_key_value_groups)?;

        // 5.24 multiplies by `scaling` (4.x divided by sqrt(head_dim)); the goldens come from 5.24.
        let mut attn_weights = nn::ops::scale(
            &query_states.matmul(&key_states.transpose(2, 3)?)?,
            self.scaling,
        )?;
        if let Some(causal_mask) = attention_mask {
            attn_weights = nn::ops::add(&attn_weights, causal_mask)?;
        }

        // Upcast to float32 for the softmax, back to the query's dtype after.
        let attn_weights =
            nn::functional::softmax(&attn_weights, D::Minus1)?.to_dtype(query_states.dtype())?;
        let attn_weights = nn::functional::dropout(&attn_weights, self.attention_dropout)?;
        let attn_output = attn_weights.matmul(&value_states.contiguous()?)?;

        let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
        let attn_output = attn_output.reshape((bsz, q_len, ()))?;
        self.o_proj.forward(&attn_output)
    }
}

/// `Qwen2MoeDecoderLayer`.
pub struct Qwen2MoeDecoderLayer {
    self_attn: Qwen2MoeAttention,
    mlp: Qwen2MoeFeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    scope: Scope,
}

#[hooked]
impl Qwen2MoeDecoderLayer {
    /// Pre-norm attention and feed-forward, each with a residual connection.
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

/// `Qwen2MoeModel`: embeddings, layers and the final norm.
pub struct Qwen2MoeModel {
    embed_tokens: Embedding,
    layers: Vec<Qwen2MoeDecoderLayer>,
    norm: RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Vec<Option<usize>>,
    scope: Scope,
}

#[hooked]
impl Qwen2MoeModel {
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

/// `Qwen2MoeForCausalLM`: the model and its output head.
pub struct Qwen2MoeForCausalLM {
    model: Qwen2MoeModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Qwen2MoeForCausalLM {
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

impl CausalLM for Qwen2MoeForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Qwen2MoeForCausalLM::forward(
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

/// Builds a Qwen2-MoE model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Qwen2MoeConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let embed_tokens = Embedding::new(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = Qwen2MoeAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let mlp = if cfg.sparse[i] {
            Qwen2MoeFeedForward::Sparse(Qwen2MoeSparseMoeBlock::new(&cfg, vb_l.pp("mlp"))?)
        } else {
            Qwen2MoeFeedForward::Dense(Qwen2MoeMLP::new(
                &cfg,
                cfg.intermediate_size,
                vb_l.pp("mlp"),
            )?)
        };
        layers.push(Qwen2MoeDecoderLayer {
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
            scope: vb_l.scope::<Qwen2MoeDecoderLayer>(),
        });
    }
    let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Qwen2MoeModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        sliding_window: cfg.sliding_window.clone(),
        scope: vb_m.scope::<Qwen2MoeModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(cfg.hidden_size, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Qwen2MoeForCausalLM {
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
        scope: root.scope::<Qwen2MoeForCausalLM>(),
    }))
}
