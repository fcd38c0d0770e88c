//! DBRX (`dbrx`).
//!
//! Ports transformers' `modeling_dbrx.py` (5.24) with one deliberate difference kept from
//! transformers 4.x: the attention is written out inside `DbrxAttention::forward`, calling
//! `nn.functional.dropout` directly, so that the attention probabilities are the hookpoint
//! `attentions.L.attn.source.nn_functional_dropout_0` named by the seed's table (`attentions.L` is the
//! `norm_attn_norm` wrapper; the arithmetic is the same as 5.x's `eager_attention_forward`).
//!
//! Module tree as in Hugging Face: `transformer.wte`, `transformer.blocks.L.norm_attn_norm.{norm_1,
//! attn, norm_2}`, `transformer.blocks.L.ffn.{router.layer, experts.mlp}`, `transformer.norm_f`,
//! `lm_head`. The experts' GLU weights are fused 2-D tensors `w1`, `v1`, `w2` of shape
//! [num_experts * ffn_hidden_size, d_model]; only the experts some token is routed to are computed.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::functional as F;
use crate::nn::moe::expert_hits;
use crate::nn::repeat_kv;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, Activation, Builder, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// nn.LayerNorm's default epsilon (DBRX's norms do not set one).
const LAYER_NORM_EPS: f64 = 1e-5;

/// The configuration of a DBRX model, as `DbrxConfig` (with its `attn_config` and `ffn_config`)
/// reads it.
#[derive(Debug, Clone)]
pub struct DbrxConfig {
    /// `d_model`.
    pub d_model: usize,
    /// `n_heads`.
    pub n_heads: usize,
    /// `n_layers`.
    pub n_layers: usize,
    /// `attn_config.kv_n_heads`.
    pub kv_n_heads: usize,
    /// `attn_config.clip_qkv`: q, k and v are clamped to [-clip, clip].
    pub clip_qkv: Option<f64>,
    /// `attn_config.attn_pdrop`.
    pub attn_pdrop: f64,
    /// `resid_pdrop`.
    pub resid_pdrop: f64,
    /// `ffn_config.ffn_hidden_size`.
    pub ffn_hidden_size: usize,
    /// `ffn_config.moe_num_experts`.
    pub moe_num_experts: usize,
    /// `ffn_config.moe_top_k`.
    pub moe_top_k: usize,
    /// `ffn_config.moe_normalize_expert_weights`: the p of the p-norm the top-k weights are divided
    /// by (`None`: no normalization).
    pub moe_normalize_expert_weights: Option<f64>,
    /// `ffn_config.ffn_act_fn.name`.
    pub ffn_act_fn: Activation,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE parameters.
    pub rope: rope::RopeParams,
}

impl DbrxConfig {
    /// Reads the keys the Hugging Face classes read, with their defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let d_model = cfg.usize(&["d_model", "hidden_size"])?;
        let n_heads = cfg.usize(&["n_heads", "num_attention_heads"])?;
        let n_layers = cfg.usize(&["n_layers", "num_hidden_layers"])?;
        let attn = cfg.sub("attn_config")?;
        let ffn = cfg.sub("ffn_config")?;
        let kv_n_heads = attn.usize_or("kv_n_heads", 1)?;
        if n_heads == 0 || kv_n_heads == 0 || n_heads % kv_n_heads != 0 {
            return Err(cfg.error(format!("n_heads ({n_heads}) must be a positive multiple of attn_config.kv_n_heads ({kv_n_heads})"),
            ));
        }
        if cfg.bool_or("tie_word_embeddings", false)? {
            return Err(cfg.error("tie_word_embeddings is not supported for DBRX models"));
        }
        let act_name = match ffn.raw.get("ffn_act_fn") {
            None | Some(serde_json::Value::Null) => "silu".to_string(),
            Some(serde_json::Value::Object(m)) => match m.get("name") {
                None => "silu".to_string(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => {
                    return Err(cfg.error(format!(
                        "ffn_config.ffn_act_fn.name should be a string, found {v}"
                    )))
                }
            },
            Some(v) => {
                return Err(cfg.error(format!(
                    "ffn_config.ffn_act_fn should be an object, found {v}"
                )))
            }
        };
        let ffn_act_fn = Activation::from_name(&act_name).ok_or_else(|| {
            cfg.error(format!(
                "ffn_config.ffn_act_fn `{act_name}` is not supported; supported: {}",
                nn::ACTIVATION_NAMES_LIST.join(", ")
            ))
        })?;
        // Absent means the default 1.0; an explicit null turns the normalization off.
        let moe_normalize_expert_weights = match ffn.raw.get("moe_normalize_expert_weights") {
            None => Some(1.0),
            Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                cfg.error(format!(
                    "ffn_config.moe_normalize_expert_weights should be a number, found {v}"
                ))
            })?),
        };
        let moe_num_experts = ffn.usize_or("moe_num_experts", 4)?;
        let moe_top_k = ffn.usize_or("moe_top_k", 1)?;
        if moe_top_k == 0 || moe_top_k > moe_num_experts {
            return Err(cfg.error(format!("ffn_config.moe_top_k ({moe_top_k}) must be between 1 and moe_num_experts ({moe_num_experts})"),
            ));
        }
        // transformers 5.24 reads RoPE from the top-level `rope_parameters` / `rope_theta` only: a
        // legacy `attn_config.rope_theta` is ignored (theta defaults to 10000), and so it is here.
        let max_seq_len = cfg.usize_or("max_seq_len", 2048)?;
        Ok(DbrxConfig {
            d_model,
            n_heads,
            n_layers,
            kv_n_heads,
            clip_qkv: attn.opt_f64("clip_qkv")?,
            attn_pdrop: attn.f64_or("attn_pdrop", 0.0)?,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.0)?,
            ffn_hidden_size: ffn.usize_or("ffn_hidden_size", 3584)?,
            moe_num_experts,
            moe_top_k,
            moe_normalize_expert_weights,
            ffn_act_fn,
            vocab_size: cfg.usize_or("vocab_size", 32000)?,
            rope: rope::RopeParams::from_config(cfg, 10000.0, max_seq_len)?,
        })
    }
}

/// `torch.norm(x, p, dim=-1, keepdim=True)` for the router's weights (p = 0 counts the non-zero
/// entries, as torch does).
#[hooked]
fn p_norm(x: &Tensor, p: f64) -> Result<Tensor> {
    if p == 0.0 {
        x.ne(0.0)?.to_dtype(x.dtype())?.sum_keepdim(D::Minus1)
    } else if p == 1.0 {
        x.abs()?.sum_keepdim(D::Minus1)
    } else if p == 2.0 {
        x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()
    } else if p.is_infinite() && p > 0.0 {
        x.abs()?.max_keepdim(D::Minus1)
    } else {
        x.abs()?.powf(p)?.sum_keepdim(D::Minus1)?.powf(1.0 / p)
    }
}

/// `DbrxAttention`, with transformers 4.x's inline eager attention.
// `Wqkv` keeps the Hugging Face attribute name, so its hookpoint is `self_Wqkv_0` as in nnsight.
#[allow(non_snake_case)]
pub struct DbrxAttention {
    Wqkv: Linear,
    out_proj: Linear,
    hidden_size: usize,
    num_heads: usize,
    head_dim: usize,
    num_key_value_heads: usize,
    num_key_value_groups: usize,
    clip_qkv: Option<f64>,
    scaling: f64,
    attn_pdrop: f64,
    layer_idx: usize,
    scope: Scope,
}

impl DbrxAttention {
    fn new(cfg: &DbrxConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let hidden_size = cfg.d_model;
        let head_dim = hidden_size / cfg.n_heads;
        let qkv = hidden_size + 2 * cfg.kv_n_heads * head_dim;
        Ok(DbrxAttention {
            Wqkv: Linear::new(hidden_size, qkv, false, vb.pp("Wqkv"))?,
            out_proj: Linear::new(hidden_size, hidden_size, false, vb.pp("out_proj"))?,
            hidden_size,
            num_heads: cfg.n_heads,
            head_dim,
            num_key_value_heads: cfg.kv_n_heads,
            num_key_value_groups: cfg.n_heads / cfg.kv_n_heads,
            clip_qkv: cfg.clip_qkv,
            scaling: (head_dim as f64).powf(-0.5),
            attn_pdrop: cfg.attn_pdrop,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl DbrxAttention {
    /// Self-attention over `hidden_states` [B, T, d_model]; the probabilities that multiply V are the
    /// output of `nn_functional_dropout_0`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (bsz, q_len, _) = hidden_states.dims3()?;

        let qkv_states = self.Wqkv.forward(hidden_states)?;
        let qkv_states = match self.clip_qkv {
            Some(clip) => qkv_states.clamp(-clip, clip)?,
            None => qkv_states,
        };

        let kv_size = self.num_key_value_heads * self.head_dim;
        let query_states = qkv_states.narrow(2, 0, self.hidden_size)?;
        let key_states = qkv_states.narrow(2, self.hidden_size, kv_size)?;
        let value_states = qkv_states.narrow(2, self.hidden_size + kv_size, kv_size)?;

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
        let attn_weights = nn::functional::dropout(&attn_weights, self.attn_pdrop)?;
        let attn_output = attn_weights.matmul(&value_states.contiguous()?)?;

        let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
        let attn_output = attn_output.reshape((bsz, q_len, self.hidden_size))?;
        self.out_proj.forward(&attn_output)
    }
}

/// `DbrxNormAttentionNorm`: norm_1, attention, residual, norm_2; returns (residual, normed).
pub struct DbrxNormAttentionNorm {
    norm_1: LayerNorm,
    attn: DbrxAttention,
    norm_2: LayerNorm,
    resid_pdrop: f64,
    scope: Scope,
}

#[hooked]
impl DbrxNormAttentionNorm {
    /// (hidden state after the attention's residual, that state normed by `norm_2`).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let residual_states = hidden_states;
        let hidden_states = self
            .norm_1
            .forward(hidden_states)?
            .to_dtype(hidden_states.dtype())?;

        let hidden_states = self.attn.forward(
            &hidden_states,
            attention_mask,
            position_embeddings,
            past_key_values,
        )?;

        let hidden_states = nn::functional::dropout(&hidden_states, self.resid_pdrop)?;
        let hidden_states = (hidden_states + residual_states)?;

        let residual_states = hidden_states.clone();
        let hidden_states = self
            .norm_2
            .forward(&hidden_states)?
            .to_dtype(hidden_states.dtype())?;

        Ok((residual_states, hidden_states))
    }
}

/// `DbrxExpertGLU` (`ffn.experts.mlp`): the fused expert weights, and one expert's GLU.
pub struct DbrxExpertGLU {
    /// [num_experts * ffn_hidden_size, d_model]: gate projections.
    pub w1: Tensor,
    /// [num_experts * ffn_hidden_size, d_model]: up projections.
    pub v1: Tensor,
    /// [num_experts * ffn_hidden_size, d_model]: down projections (used untransposed).
    pub w2: Tensor,
    activation_fn: Activation,
    scope: Scope,
}

#[hooked]
impl DbrxExpertGLU {
    /// One expert on its tokens `x` [n, d_model]: (act(x w1^T) * x v1^T) w2.
    pub fn forward(
        &self,
        x: &Tensor,
        expert_w1: &Tensor,
        expert_v1: &Tensor,
        expert_w2: &Tensor,
    ) -> Result<Tensor> {
        let gate_proj = x.matmul(&expert_w1.t()?)?;
        let up_proj = x.matmul(&expert_v1.t()?)?;
        let gate_proj = self.activation_fn.forward(&gate_proj)?;
        let intermediate_states = (gate_proj * up_proj)?;
        let down_proj = intermediate_states.matmul(expert_w2)?;
        Ok(down_proj)
    }
}

/// `DbrxExperts` (`ffn.experts`): routes each token to its experts and sums their weighted outputs.
pub struct DbrxExperts {
    mlp: DbrxExpertGLU,
    hidden_size: usize,
    ffn_hidden_size: usize,
    num_experts: usize,
    scope: Scope,
}

#[hooked]
impl DbrxExperts {
    /// `hidden_states` [B, T, d_model], `top_k_index` / `top_k_weights` [B*T, top_k] -> [B, T, d_model].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        top_k_index: &Tensor,
        top_k_weights: &Tensor,
    ) -> Result<Tensor> {
        let batch_size = hidden_states.dim(0)?;
        let hidden_states = hidden_states.reshape(((), self.hidden_size))?;

        let mut next_states = hidden_states.zeros_like()?;
        let expert_hit = expert_hits(top_k_index, self.num_experts)?;
        let flat_weights = top_k_weights.flatten_all()?;
        let f = self.ffn_hidden_size;
        for hit in expert_hit.iter() {
            let v1 = self.mlp.v1.narrow(0, hit.expert * f, f)?;
            let w1 = self.mlp.w1.narrow(0, hit.expert * f, f)?;
            let w2 = self.mlp.w2.narrow(0, hit.expert * f, f)?;
            let states = self.mlp.forward(
                &hidden_states.index_select(&hit.token_idx, 0)?,
                &w1,
                &v1,
                &w2,
            )?;
            let weights = flat_weights
                .index_select(&hit.weight_idx, 0)?
                .unsqueeze(1)?;
            let states = states
                .reshape(((), self.hidden_size))?
                .broadcast_mul(&weights)?;
            next_states = next_states.index_add(&hit.token_idx, &states, 0)?;
        }

        next_states.reshape((batch_size, (), self.hidden_size))
    }
}

/// `DbrxRouter` (`ffn.router`): the router logits.
pub struct DbrxRouter {
    layer: Linear,
    scope: Scope,
}

#[hooked]
impl DbrxRouter {
    /// Router logits [B*T, num_experts] (jitter is training-only).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = hidden_states.reshape(((), hidden_states.dim(D::Minus1)?))?;
        self.layer.forward(&hidden_states)
    }
}

/// `DbrxFFN` (`ffn`): router, top-k with p-norm normalization, experts.
pub struct DbrxFFN {
    router: DbrxRouter,
    experts: DbrxExperts,
    moe_normalize_expert_weights: Option<f64>,
    top_k: usize,
    scope: Scope,
}

#[hooked]
impl DbrxFFN {
    /// Softmax over the experts (in the logits' dtype), top-k, and the optional p-norm
    /// normalization: (weights, expert indices), each [B*T, top_k].
    pub fn route_tokens_to_experts(&self, router_logits: &Tensor) -> Result<(Tensor, Tensor)> {
        let router_logits = nn::functional::softmax(router_logits, D::Minus1)?;
        let (router_top_value, router_indices) = F::topk(&router_logits, self.top_k)?;
        let router_top_value = match self.moe_normalize_expert_weights {
            Some(p) => router_top_value.broadcast_div(&p_norm(&router_top_value, p)?)?,
            None => router_top_value,
        };
        Ok((router_top_value, router_indices))
    }

    /// [B, T, d_model] -> [B, T, d_model].
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let router_logits = self.router.forward(hidden_states)?;
        let (top_k_weights, top_k_index) = self.route_tokens_to_experts(&router_logits)?;
        let output = self
            .experts
            .forward(hidden_states, &top_k_index, &top_k_weights)?;
        Ok(output)
    }
}

/// `DbrxBlock`.
pub struct DbrxBlock {
    norm_attn_norm: DbrxNormAttentionNorm,
    ffn: DbrxFFN,
    resid_pdrop: f64,
    scope: Scope,
}

#[hooked]
impl DbrxBlock {
    /// Attention sub-block, then the MoE feed-forward with a residual connection.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (resid_states, hidden_states) = self.norm_attn_norm.forward(
            hidden_states,
            position_embeddings,
            attention_mask,
            past_key_values,
        )?;

        let hidden_states = self.ffn.forward(&hidden_states)?;
        let hidden_states = nn::functional::dropout(&hidden_states, self.resid_pdrop)?;
        resid_states + hidden_states
    }
}

/// `DbrxModel` (`transformer`): embeddings, blocks and the final norm.
pub struct DbrxModel {
    wte: Embedding,
    blocks: Vec<DbrxBlock>,
    norm_f: LayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl DbrxModel {
    /// Hidden states after the final norm [B, T, d_model].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.wte.forward(input_ids)?;
        let (batch, seq_len) = input_ids.dims2()?;
        let (dtype, device) = (inputs_embeds.dtype(), inputs_embeds.device());
        let past_seen_tokens = nn::past_len(past_key_values);
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            past_seen_tokens,
            None,
            dtype,
            device,
        )?;
        let position_embeddings = self.rotary_emb.cos_sin(position_ids, dtype, device)?;
        let mut hidden_states = inputs_embeds;
        for decoder_layer in self.blocks.iter() {
            hidden_states = decoder_layer.forward(
                &hidden_states,
                Some(&causal_mask),
                &position_embeddings,
                past_key_values,
            )?;
        }
        self.norm_f.forward(&hidden_states)
    }
}

/// `DbrxForCausalLM`: the model and its output head.
pub struct DbrxForCausalLM {
    transformer: DbrxModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl DbrxForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let hidden_states =
            self.transformer
                .forward(input_ids, attention_mask, position_ids, past_key_values)?;
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for DbrxForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        DbrxForCausalLM::forward(
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

fn load_block(cfg: &DbrxConfig, layer_idx: usize, vb: Builder) -> Result<DbrxBlock> {
    let d = cfg.d_model;
    let vn = vb.pp("norm_attn_norm");
    let norm_1 = LayerNorm::new(d, LAYER_NORM_EPS, false, vn.pp("norm_1"))?;
    let attn = DbrxAttention::new(cfg, layer_idx, vn.pp("attn"))?;
    let norm_2 = LayerNorm::new(d, LAYER_NORM_EPS, false, vn.pp("norm_2"))?;
    let norm_attn_norm = DbrxNormAttentionNorm {
        norm_1,
        attn,
        norm_2,
        resid_pdrop: cfg.resid_pdrop,
        scope: vn.scope::<DbrxNormAttentionNorm>(),
    };

    let vf = vb.pp("ffn");
    let vr = vf.pp("router");
    let router = DbrxRouter {
        layer: Linear::new(d, cfg.moe_num_experts, false, vr.pp("layer"))?,
        scope: vr.scope::<DbrxRouter>(),
    };
    let ve = vf.pp("experts");
    let vm = ve.pp("mlp");
    let rows = cfg.moe_num_experts * cfg.ffn_hidden_size;
    let mlp = DbrxExpertGLU {
        w1: vm.get((rows, d), "w1")?,
        v1: vm.get((rows, d), "v1")?,
        w2: vm.get((rows, d), "w2")?,
        activation_fn: cfg.ffn_act_fn,
        scope: vm.scope::<DbrxExpertGLU>(),
    };
    let experts = DbrxExperts {
        mlp,
        hidden_size: d,
        ffn_hidden_size: cfg.ffn_hidden_size,
        num_experts: cfg.moe_num_experts,
        scope: ve.scope::<DbrxExperts>(),
    };
    let ffn = DbrxFFN {
        router,
        experts,
        moe_normalize_expert_weights: cfg.moe_normalize_expert_weights,
        top_k: cfg.moe_top_k,
        scope: vf.scope::<DbrxFFN>(),
    };
    Ok(DbrxBlock {
        norm_attn_norm,
        ffn,
        resid_pdrop: cfg.resid_pdrop,
        scope: vb.scope::<DbrxBlock>(),
    })
}

/// Builds a DBRX model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = DbrxConfig::read(config)?;
    let root = vb.clone();
    let vt = vb.pp("transformer");
    let wte = Embedding::new(cfg.vocab_size, cfg.d_model, vt.pp("wte"))?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        blocks.push(load_block(&cfg, i, vt.pp("blocks").pp(i))?);
    }
    let norm_f = LayerNorm::new(cfg.d_model, LAYER_NORM_EPS, false, vt.pp("norm_f"))?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.d_model / cfg.n_heads)?;
    let transformer = DbrxModel {
        wte,
        blocks,
        norm_f,
        rotary_emb,
        scope: vt.scope::<DbrxModel>(),
    };
    let lm_head = Linear::new(cfg.d_model, cfg.vocab_size, false, root.pp("lm_head"))?;
    Ok(Box::new(DbrxForCausalLM {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.n_layers,
            heads: cfg.n_heads,
            kv_heads: cfg.kv_n_heads,
            head_dim: cfg.d_model / cfg.n_heads,
            hidden: cfg.d_model,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<DbrxForCausalLM>(),
    }))
}
