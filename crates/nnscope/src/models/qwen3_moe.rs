//! Qwen3-MoE (`qwen3_moe`), porting transformers' `modeling_qwen3_moe.py` (5.24).
//!
//! Qwen3's attention (per-head RMS norm of queries and keys, `attention_bias`, GQA, a sliding window
//! on every layer with `use_sliding_window`) with a sparse MoE block on the layers
//! `decoder_sparse_step` picks and `mlp_only_layers` does not name (a dense `Qwen3MoeMLP` elsewhere):
//! `mlp.gate` routes each token to its top `num_experts_per_tok` of `num_experts` experts (softmax
//! in float32, top k, renormalized with `norm_topk_prob`), `mlp.experts` runs them. The router
//! logits are the hookpoint `model.layers.L.mlp.gate.output.0`.
//!
//! Weights load from the hub's per-expert names (`mlp.experts.E.gate_proj/up_proj/down_proj`, what
//! `save_pretrained` writes) or transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::moe::{Experts, PerExpertLayout, TopKRouter};
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, repeat_kv, Activation, Builder, Embedding, KvCache, Linear, RmsNorm};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a Qwen3-MoE model, as transformers' `Qwen3MoeConfig` reads it.
#[derive(Debug, Clone)]
pub struct Qwen3MoeConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Width of the dense MLP (`mlp_only_layers` and layers off the sparse step).
    pub intermediate_size: usize,
    /// Width of each routed expert.
    pub moe_intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head size (`head_dim` in config.json, else hidden / heads).
    pub head_dim: usize,
    /// Activation of every MLP and expert.
    pub hidden_act: Activation,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    /// Sliding window of every layer (`use_sliding_window`; `None`: full attention).
    pub sliding_window: Option<usize>,
    /// Attention dropout (the identity at inference).
    pub attention_dropout: f64,
    /// Whether layer i is a sparse MoE block (else a dense `Qwen3MoeMLP`).
    pub sparse: Vec<bool>,
    /// Routed experts.
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Renormalize the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl Qwen3MoeConfig {
    /// Reads the keys `Qwen3MoeConfig` reads, with its defaults and its `__post_init__`.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2048)?;
        let num_hidden_layers = cfg.usize_or("num_hidden_layers", 24)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = cfg.usize_or("num_key_value_heads", 4)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        // `getattr(config, "head_dim", hidden_size // num_attention_heads)`.
        let head_dim = cfg
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 {
            return Err(cfg.error("head_dim must be positive"));
        }
        let act_name = cfg.str_or("hidden_act", "silu")?;
        let hidden_act = Activation::from_name(act_name).ok_or_else(|| {
            cfg.error(format!(
                "hidden_act `{act_name}` is not supported; supported: {}",
                nn::ACTIVATION_NAMES_LIST.join(", ")
            ))
        })?;
        // `__post_init__`: the window only exists with `use_sliding_window` (default 4096).
        let sliding_window = if cfg.bool_or("use_sliding_window", false)? {
            match cfg.raw.get("sliding_window") {
                None => Some(4096),
                Some(_) => cfg.opt_usize("sliding_window")?,
            }
        } else {
            None
        };
        // A window of 0 means full attention.
        let sliding_window = sliding_window.filter(|w| *w > 0);
        // `attribute_map`: `num_experts` is stored as `num_local_experts`.
        let num_experts = cfg.usize_alias_or(&["num_local_experts", "num_experts"], 128)?;
        let num_experts_per_tok = cfg.usize_or("num_experts_per_tok", 8)?;
        let decoder_sparse_step = cfg.usize_or("decoder_sparse_step", 1)?;
        let mlp_only_layers = cfg.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
        if num_experts > 0 && decoder_sparse_step == 0 {
            return Err(cfg.error("decoder_sparse_step must be at least 1"));
        }
        let sparse: Vec<bool> = (0..num_hidden_layers)
            .map(|i| {
                !mlp_only_layers.contains(&i)
                    && num_experts > 0
                    && (i + 1) % decoder_sparse_step == 0
            })
            .collect();
        if sparse.iter().any(|s| *s)
            && (num_experts_per_tok == 0 || num_experts_per_tok > num_experts)
        {
            return Err(cfg.error(format!("num_experts_per_tok ({num_experts_per_tok}) must be between 1 and num_experts ({num_experts})"),
            ));
        }
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 32768)?;
        // Qwen3-MoE's default RoPE rotates the whole head (the scaled types read the factor).
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        Ok(Qwen3MoeConfig {
            vocab_size: cfg.usize_or("vocab_size", 151936)?,
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 6144)?,
            moe_intermediate_size: cfg.usize_or("moe_intermediate_size", 768)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            attention_bias: cfg.bool_or("attention_bias", false)?,
            sliding_window,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            sparse,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: cfg.bool_or("norm_topk_prob", false)?,
            rope,
        })
    }
}

/// `Qwen3MoeMLP`: down(act(gate(x)) * up(x)), the dense MLP of layers without experts.
pub struct Qwen3MoeMLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act_fn: Activation,
    scope: Scope,
}

impl Qwen3MoeMLP {
    fn new(cfg: &Qwen3MoeConfig, vb: Builder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Qwen3MoeMLP {
            gate_proj: Linear::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Linear::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, false, vb.pp("down_proj"))?,
            act_fn: cfg.hidden_act,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Qwen3MoeMLP {
    /// down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let down_proj = self.down_proj.forward(&nn::ops::mul(
            &self.act_fn.forward(&self.gate_proj.forward(x)?)?,
            &self.up_proj.forward(x)?,
        )?)?;
        Ok(down_proj)
    }
}

/// `Qwen3MoeSparseMoeBlock`: the experts and their router.
pub struct Qwen3MoeSparseMoeBlock {
    experts: Experts,
    gate: TopKRouter,
    scope: Scope,
}

impl Qwen3MoeSparseMoeBlock {
    fn new(cfg: &Qwen3MoeConfig, vb: Builder) -> Result<Self> {
        let (e, h) = (cfg.num_experts, cfg.hidden_size);
        let ve = vb.pp("experts");
        let experts = Experts::new(
            e,
            h,
            cfg.moe_intermediate_size,
            cfg.hidden_act,
            ve.clone(),
            &[PerExpertLayout {
                vb: ve,
                names: ["gate_proj", "up_proj", "down_proj"],
            }],
        )?;
        let vg = vb.pp("gate");
        let gate = TopKRouter::new(
            e,
            h,
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            true,
            vg.clone(),
            &vg,
        )?;
        Ok(Qwen3MoeSparseMoeBlock {
            experts,
            gate,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Qwen3MoeSparseMoeBlock {
    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let (batch_size, sequence_length, hidden_dim) = hidden_states.dims3()?;
        let hidden_states_reshaped = hidden_states.reshape(((), hidden_dim))?;
        let (_router_logits, routing_weights, selected_experts) =
            self.gate.forward(&hidden_states_reshaped)?;
        let final_hidden_states =
            self.experts
                .forward(&hidden_states_reshaped, &selected_experts, &routing_weights)?;
        final_hidden_states.reshape((batch_size, sequence_length, hidden_dim))
    }
}

/// transformers' `eager_attention_forward`: returns the attention output [B, T, H, D] and the
/// probabilities [B, H, T, past + T] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &Qwen3MoeAttention,
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

/// `Qwen3MoeAttention`.
pub struct Qwen3MoeAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl Qwen3MoeAttention {
    fn new(cfg: &Qwen3MoeConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Qwen3MoeAttention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            q_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
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
impl Qwen3MoeAttention {
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
            .q_norm
            .forward(&self.q_proj.forward(hidden_states)?.reshape(hidden_shape)?)?
            .transpose(1, 2)?;
        let key_states = self
            .k_norm
            .forward(&self.k_proj.forward(hidden_states)?.reshape(hidden_shape)?)?
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

/// A decoder layer's feed-forward: sparse MoE block or dense MLP (`mlp_only_layers`,
/// `decoder_sparse_step`).
pub enum Qwen3MoeFeedForward {
    /// `Qwen3MoeSparseMoeBlock`.
    Sparse(Qwen3MoeSparseMoeBlock),
    /// `Qwen3MoeMLP` with `intermediate_size`.
    Dense(Qwen3MoeMLP),
}

impl Qwen3MoeFeedForward {
    /// Runs the block (each variant is a module with its own scope).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Qwen3MoeFeedForward::Sparse(m) => m.forward(x),
            Qwen3MoeFeedForward::Dense(m) => m.forward(x),
        }
    }
}

/// `Qwen3MoeDecoderLayer`.
pub struct Qwen3MoeDecoderLayer {
    self_attn: Qwen3MoeAttention,
    mlp: Qwen3MoeFeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    scope: Scope,
}

#[hooked]
impl Qwen3MoeDecoderLayer {
    /// Pre-norm attention and feed-forward, each with a residual connection.
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

/// `Qwen3MoeModel`: embeddings, layers and the final norm.
pub struct Qwen3MoeModel {
    embed_tokens: Embedding,
    layers: Vec<Qwen3MoeDecoderLayer>,
    norm: RmsNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Option<usize>,
    scope: Scope,
}

#[hooked]
impl Qwen3MoeModel {
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

/// `Qwen3MoeForCausalLM`: the model and its output head.
pub struct Qwen3MoeForCausalLM {
    model: Qwen3MoeModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl Qwen3MoeForCausalLM {
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

impl CausalLM for Qwen3MoeForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        Qwen3MoeForCausalLM::forward(
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

/// Builds a Qwen3-MoE model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = Qwen3MoeConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed_tokens = Embedding::new(cfg.vocab_size, h, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = Qwen3MoeAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let mlp = if cfg.sparse[i] {
            Qwen3MoeFeedForward::Sparse(Qwen3MoeSparseMoeBlock::new(&cfg, vb_l.pp("mlp"))?)
        } else {
            Qwen3MoeFeedForward::Dense(Qwen3MoeMLP::new(&cfg, vb_l.pp("mlp"))?)
        };
        layers.push(Qwen3MoeDecoderLayer {
            self_attn,
            mlp,
            input_layernorm: RmsNorm::new(h, eps, vb_l.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb_l.pp("post_attention_layernorm"))?,
            scope: vb_l.scope::<Qwen3MoeDecoderLayer>(),
        });
    }
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = Qwen3MoeModel {
        embed_tokens,
        layers,
        norm: RmsNorm::new(h, eps, vb_m.pp("norm"))?,
        rotary_emb,
        sliding_window: cfg.sliding_window,
        scope: vb_m.scope::<Qwen3MoeModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(Qwen3MoeForCausalLM {
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
        scope: root.scope::<Qwen3MoeForCausalLM>(),
    }))
}
