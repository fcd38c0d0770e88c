//! GPT-OSS (`gpt_oss`).
//!
//! Ports transformers' `modeling_gpt_oss.py` (5.24): attention sinks (one learned logit per head
//! appended to the scores as a last column before the softmax, then dropped), alternating
//! sliding-window / full layers (`layer_types`), YaRN RoPE applied to the two halves of each head,
//! biased projections, and a mixture of experts with a biased router (top-k of the logits, softmax
//! over the chosen ones) and clamped SwiGLU experts whose weights are fused 3-D tensors with gate and
//! up columns interleaved.
//!
//! The attention probabilities of the seed's table are `attention_interface_0.source.F_softmax_0`:
//! [B, H, Q, K + 1], the sink column last. What multiplies V is the output of
//! `attention_interface_0.source.nn_functional_dropout_0` ([B, H, Q, K], sink dropped).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::functional as F;
use crate::nn::moe::expert_hits;
use crate::nn::repeat_kv;
use crate::nn::rope;
use crate::nn::{self, mask, Builder, Embedding, KvCache, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// The configuration of a GPT-OSS model, as `GptOssConfig` reads it (with its defaults).
#[derive(Debug, Clone)]
pub struct GptOssConfig {
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
    /// Head size.
    pub head_dim: usize,
    /// Experts.
    pub num_local_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Sigmoid gain of the experts' SwiGLU.
    pub swiglu_alpha: f64,
    /// Clamp of the experts' gate (above) and up projection (both sides).
    pub swiglu_limit: f64,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    /// Attention dropout (inactive at inference, kept for the dropout call).
    pub attention_dropout: f64,
    /// Sliding window of each layer (`None`: full attention).
    pub sliding_window: Vec<Option<usize>>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

/// A key the dataclass gives a default when absent, but that may be an explicit null (which the
/// config's `__post_init__` then derives): `Ok(None)` for null.
fn usize_default_or_null(cfg: &Config, key: &str, default: usize) -> crate::Result<Option<usize>> {
    match cfg.raw.get(key) {
        None => Ok(Some(default)),
        Some(serde_json::Value::Null) => Ok(None),
        Some(_) => cfg.opt_usize(key),
    }
}

impl GptOssConfig {
    /// Reads the keys `GptOssConfig` reads, with its defaults and its `__post_init__`.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 2880)?;
        let num_hidden_layers = cfg.usize_or("num_hidden_layers", 36)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 64)?;
        let num_key_value_heads =
            usize_default_or_null(cfg, "num_key_value_heads", 8)?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(cfg.error(format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = usize_default_or_null(cfg, "head_dim", 64)?
            .unwrap_or(hidden_size / num_attention_heads);
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
            // `__post_init__`: even layers slide, odd layers attend fully.
            None => (0..num_hidden_layers).map(|i| (i + 1) % 2 == 1).collect(),
        };
        let window = usize_default_or_null(cfg, "sliding_window", 128)?.filter(|w| *w > 0);
        let sliding_window = layer_types
            .iter()
            .map(|s| if *s { window } else { None })
            .collect();
        let num_local_experts = cfg.usize_or("num_local_experts", 128)?;
        let num_experts_per_tok = cfg.usize_or("num_experts_per_tok", 4)?;
        if num_experts_per_tok == 0 || num_experts_per_tok > num_local_experts {
            return Err(cfg.error(format!(
                    "num_experts_per_tok ({num_experts_per_tok}) must be between 1 and num_local_experts ({num_local_experts})"
                ),
            ));
        }
        // `__post_init__`: without `rope_parameters`, GPT-OSS's YaRN setting (theta 150000).
        let rope_cfg = match cfg.raw.get("rope_parameters") {
            Some(serde_json::Value::Object(_)) => cfg.clone(),
            _ if cfg.raw.get("rope_scaling").is_some_and(|v| v.is_object()) => cfg.clone(),
            _ => {
                let mut c = cfg.clone();
                c.raw.insert(
                    "rope_parameters".into(),
                    serde_json::json!({
                        "rope_type": "yarn",
                        "factor": 32.0,
                        "beta_fast": 32.0,
                        "beta_slow": 1.0,
                        "truncate": false,
                        "original_max_position_embeddings": 4096
                    }),
                );
                c
            }
        };
        Ok(GptOssConfig {
            hidden_size,
            intermediate_size: cfg.usize_or("intermediate_size", 2880)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_local_experts,
            num_experts_per_tok,
            rms_norm_eps: cfg.f64_or("rms_norm_eps", 1e-5)?,
            swiglu_alpha: cfg.f64_or("swiglu_alpha", 1.702)?,
            swiglu_limit: cfg.f64_or("swiglu_limit", 7.0)?,
            attention_bias: cfg.bool_or("attention_bias", true)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            sliding_window,
            vocab_size: cfg.usize_or("vocab_size", 201088)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            rope: rope::RopeParams::from_config(&rope_cfg, 150000.0, 131072)?,
        })
    }
}

/// `GptOssRMSNorm`: like LLaMA's, but the weight multiplies before the cast back.
pub struct GptOssRMSNorm {
    /// [dim].
    pub weight: Tensor,
    variance_epsilon: f64,
    scope: Scope,
}

impl GptOssRMSNorm {
    fn new(dim: usize, eps: f64, vb: Builder) -> Result<Self> {
        Ok(GptOssRMSNorm {
            weight: vb.get(dim, "weight")?,
            variance_epsilon: eps,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GptOssRMSNorm {
    /// (weight * x / sqrt(mean(x^2) + eps)) in float32, cast back to the input's dtype.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let input_dtype = hidden_states.dtype();
        let hidden_states = hidden_states.to_dtype(DType::F32)?;
        let variance = hidden_states.sqr()?.mean_keepdim(D::Minus1)?;
        let hidden_states =
            hidden_states.broadcast_mul(&(variance + self.variance_epsilon)?.sqrt()?.recip()?)?;
        self.weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&hidden_states)?
            .to_dtype(input_dtype)
    }
}

/// Rotates `x` [B, H, T, D] by halves: (x1 cos - x2 sin, x2 cos + x1 sin); cos/sin are [.., D/2].
#[hooked]
pub fn _apply_rotary_emb(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first_half = x.narrow(D::Minus1, 0, half)?;
    let second_half = x.narrow(D::Minus1, half, half)?;
    let first_ = (first_half.broadcast_mul(cos)? - second_half.broadcast_mul(sin)?)?;
    let second_ = (second_half.broadcast_mul(cos)? + first_half.broadcast_mul(sin)?)?;
    Tensor::cat(&[&first_, &second_], D::Minus1)
}

/// Applies the rotary embedding to q and k ([B, H, T, D]); cos/sin are [B, T, D/2].
#[hooked]
pub fn apply_rotary_pos_emb(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let q_embed = _apply_rotary_emb(q, &cos, &sin)?;
    let k_embed = _apply_rotary_emb(k, &cos, &sin)?;
    Ok((q_embed, k_embed))
}

/// transformers' GPT-OSS `eager_attention_forward`: softmax over the scores plus each head's sink
/// logit (`F_softmax_0`, [B, H, Q, K + 1]), sink column dropped, then `nn_functional_dropout_0`
/// ([B, H, Q, K]) multiplies V. Returns the attention output [B, T, H, D] and those probabilities.
#[hooked]
pub fn eager_attention_forward(
    module: &GptOssAttention,
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

    let (batch, heads, q_len, _) = query.dims4()?;
    let sinks = module
        .sinks
        .reshape((1, (), 1, 1))?
        .to_dtype(attn_weights.dtype())?
        .expand((batch, heads, q_len, 1))?;
    let combined_logits = Tensor::cat(&[&attn_weights, &sinks], D::Minus1)?;

    // Not in the original implementation; transformers subtracts the row max to avoid overflow in
    // half precision, and so do we to match it.
    let combined_logits =
        combined_logits.broadcast_sub(&combined_logits.max_keepdim(D::Minus1)?)?;
    let probs = F::softmax(&combined_logits, D::Minus1)?;
    let k_len = probs.dim(D::Minus1)? - 1;
    let scores = probs.narrow(D::Minus1, 0, k_len)?; // the sink column is dropped here
    let attn_weights = nn::functional::dropout(&scores, dropout)?.to_dtype(value_states.dtype())?;
    let attn_output = attn_weights.matmul(&value_states.contiguous()?)?;
    let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
    Ok((attn_output, attn_weights))
}

/// `GptOssAttention`.
pub struct GptOssAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Per-head sink logits [num_attention_heads].
    pub sinks: Tensor,
    head_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl GptOssAttention {
    fn new(cfg: &GptOssConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(GptOssAttention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            sinks: vb.get(nh, "sinks")?,
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
impl GptOssAttention {
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
        let attn_output = attn_output.reshape((b, t, ()))?;
        self.o_proj.forward(&attn_output)
    }
}

/// `GptOssExperts`: fused weights (`gate_up_proj` [E, H, 2I] with gate and up columns interleaved,
/// `down_proj` [E, I, H], biases), clamped SwiGLU.
pub struct GptOssExperts {
    /// [E, hidden, 2 * intermediate], multiplied from the right.
    pub gate_up_proj: Tensor,
    /// [E, 2 * intermediate].
    pub gate_up_proj_bias: Tensor,
    /// [E, intermediate, hidden].
    pub down_proj: Tensor,
    /// [E, hidden].
    pub down_proj_bias: Tensor,
    num_experts: usize,
    alpha: f64,
    limit: f64,
    scope: Scope,
}

#[hooked]
impl GptOssExperts {
    /// gate = even columns clamped above, up = odd columns clamped both sides,
    /// (up + 1) * gate * sigmoid(alpha * gate).
    pub fn _apply_gate(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (n, two_i) = gate_up.dims2()?;
        let pairs = gate_up.reshape((n, two_i / 2, 2))?;
        let gate = pairs.narrow(2, 0, 1)?.squeeze(2)?;
        let up = pairs.narrow(2, 1, 1)?.squeeze(2)?;
        let gate = gate.minimum(self.limit)?;
        let up = up.clamp(-self.limit, self.limit)?;
        let glu = (&gate * F::sigmoid(&(&gate * self.alpha)?)?)?;
        let gated_output = ((up + 1.0)? * glu)?;
        Ok(gated_output)
    }

    /// `hidden_states` [tokens, hidden], `router_indices` / `routing_weights` [tokens, top_k].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        router_indices: &Tensor,
        routing_weights: &Tensor,
    ) -> Result<Tensor> {
        let mut next_states = hidden_states.zeros_like()?;
        let expert_hit = expert_hits(router_indices, self.num_experts)?;
        let flat_weights = routing_weights.flatten_all()?;
        for hit in expert_hit.iter() {
            let current_state = hidden_states.index_select(&hit.token_idx, 0)?;
            let gate_up = current_state
                .matmul(&self.gate_up_proj.get(hit.expert)?)?
                .broadcast_add(&self.gate_up_proj_bias.get(hit.expert)?)?;
            let gated_output = self._apply_gate(&gate_up)?;
            let out = gated_output
                .matmul(&self.down_proj.get(hit.expert)?)?
                .broadcast_add(&self.down_proj_bias.get(hit.expert)?)?;
            let weights = flat_weights
                .index_select(&hit.weight_idx, 0)?
                .unsqueeze(1)?;
            let weighted_output = out.broadcast_mul(&weights)?;
            next_states = next_states.index_add(
                &hit.token_idx,
                &weighted_output.to_dtype(hidden_states.dtype())?,
                0,
            )?;
        }
        Ok(next_states)
    }
}

/// `GptOssTopKRouter` (`mlp.router`): biased logits, top-k of the logits, softmax over those.
pub struct GptOssTopKRouter {
    /// [num_experts, hidden].
    pub weight: Tensor,
    /// [num_experts].
    pub bias: Tensor,
    top_k: usize,
    scope: Scope,
}

#[hooked]
impl GptOssTopKRouter {
    /// (router_logits [tokens, E], router_scores [tokens, k], router_indices [tokens, k] u32).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let router_logits = F::linear(hidden_states, &self.weight, Some(&self.bias))?;
        let (router_top_value, router_indices) = F::topk(&router_logits, self.top_k)?;
        let router_scores = nn::functional::softmax(&router_top_value, D::Minus1)?;
        Ok((router_logits, router_scores, router_indices))
    }
}

/// `GptOssMLP` (`mlp`): router and experts; returns (hidden states, router scores) as transformers
/// does.
pub struct GptOssMLP {
    router: GptOssTopKRouter,
    experts: GptOssExperts,
    scope: Scope,
}

impl GptOssMLP {
    fn new(cfg: &GptOssConfig, vb: Builder) -> Result<Self> {
        let (e, h, i) = (
            cfg.num_local_experts,
            cfg.hidden_size,
            cfg.intermediate_size,
        );
        let vr = vb.pp("router");
        let router = GptOssTopKRouter {
            weight: vr.get((e, h), "weight")?,
            bias: vr.get(e, "bias")?,
            top_k: cfg.num_experts_per_tok,
            scope: vr.scope::<GptOssTopKRouter>(),
        };
        let ve = vb.pp("experts");
        let experts = GptOssExperts {
            gate_up_proj: ve.get((e, h, 2 * i), "gate_up_proj")?,
            gate_up_proj_bias: ve.get((e, 2 * i), "gate_up_proj_bias")?,
            down_proj: ve.get((e, i, h), "down_proj")?,
            down_proj_bias: ve.get((e, h), "down_proj_bias")?,
            num_experts: e,
            alpha: cfg.swiglu_alpha,
            limit: cfg.swiglu_limit,
            scope: ve.scope::<GptOssExperts>(),
        };
        Ok(GptOssMLP {
            router,
            experts,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GptOssMLP {
    /// ([B, T, hidden], router scores [B*T, top_k]).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch_size, sequence_length, hidden_dim) = hidden_states.dims3()?;
        let hidden_states = hidden_states.reshape(((), hidden_dim))?;
        let (_router_logits, router_scores, router_indices) =
            self.router.forward(&hidden_states)?;
        let hidden_states =
            self.experts
                .forward(&hidden_states, &router_indices, &router_scores)?;
        let hidden_states = hidden_states.reshape((batch_size, sequence_length, hidden_dim))?;
        Ok((hidden_states, router_scores))
    }
}

/// `GptOssDecoderLayer`.
pub struct GptOssDecoderLayer {
    self_attn: GptOssAttention,
    mlp: GptOssMLP,
    input_layernorm: GptOssRMSNorm,
    post_attention_layernorm: GptOssRMSNorm,
    scope: Scope,
}

#[hooked]
impl GptOssDecoderLayer {
    /// Pre-norm attention and MoE, each with a residual connection.
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
        let (mlp_output, _router_scores) = self.mlp.forward(&mlp_input)?;
        residual + mlp_output
    }
}

/// `GptOssModel`: embeddings, layers and the final norm.
pub struct GptOssModel {
    embed_tokens: Embedding,
    layers: Vec<GptOssDecoderLayer>,
    norm: GptOssRMSNorm,
    rotary_emb: rope::RotaryEmbedding,
    sliding_window: Vec<Option<usize>>,
    scope: Scope,
}

#[hooked]
impl GptOssModel {
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
        // GPT-OSS's rotary embedding returns the frequencies once ([.., D/2]), not duplicated.
        let (cos, sin) = self.rotary_emb.cos_sin(position_ids, dtype, device)?;
        let half = cos.dim(D::Minus1)? / 2;
        let position_embeddings = (
            cos.narrow(D::Minus1, 0, half)?,
            sin.narrow(D::Minus1, 0, half)?,
        );
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

/// `GptOssForCausalLM`: the model and its output head.
pub struct GptOssForCausalLM {
    model: GptOssModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GptOssForCausalLM {
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

impl CausalLM for GptOssForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GptOssForCausalLM::forward(
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

/// Builds a GPT-OSS model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GptOssConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("model");
    let embed_tokens = Embedding::new(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let self_attn = GptOssAttention::new(&cfg, i, vb_l.pp("self_attn"))?;
        let mlp = GptOssMLP::new(&cfg, vb_l.pp("mlp"))?;
        layers.push(GptOssDecoderLayer {
            self_attn,
            mlp,
            input_layernorm: GptOssRMSNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb_l.pp("input_layernorm"),
            )?,
            post_attention_layernorm: GptOssRMSNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb_l.pp("post_attention_layernorm"),
            )?,
            scope: vb_l.scope::<GptOssDecoderLayer>(),
        });
    }
    let norm = GptOssRMSNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim)?;
    let model = GptOssModel {
        embed_tokens,
        layers,
        norm,
        rotary_emb,
        sliding_window: cfg.sliding_window.clone(),
        scope: vb_m.scope::<GptOssModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(model.embed_tokens.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(cfg.hidden_size, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(GptOssForCausalLM {
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
        scope: root.scope::<GptOssForCausalLM>(),
    }))
}
