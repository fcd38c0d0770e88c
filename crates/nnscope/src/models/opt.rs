//! OPT, porting transformers' `modeling_opt.py`.
//!
//! Learned positions stored with an offset of 2 (`OPTLearnedPositionalEmbedding`; positions come
//! from the attention mask, as `cumsum(mask) - 1`), layer norms before (`do_layer_norm_before`, most
//! sizes) or after (OPT-350m) each block, and embeddings narrower than the hidden size
//! (`word_embed_proj_dim`) with `project_in` / `project_out` around the decoder. Weights as on the hub:
//! `model.decoder.` (or `decoder.` when saved from `OPTModel`), head tied to the embeddings.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{self, mask, Activation, Builder, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of an OPT model, as `OPTConfig` reads it.
#[derive(Debug, Clone)]
pub struct OPTConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// MLP width.
    pub ffn_dim: usize,
    /// Learned positions (the table has 2 more rows).
    pub max_position_embeddings: usize,
    /// Layer norms before attention and MLP (else after each residual, and no final norm).
    pub do_layer_norm_before: bool,
    /// No final layer norm even with `do_layer_norm_before`.
    pub remove_final_layer_norm: bool,
    /// Embedding width (`project_in` / `project_out` when it differs from `hidden_size`).
    pub word_embed_proj_dim: usize,
    /// Residual dropout (unused at inference).
    pub dropout: f64,
    /// Attention dropout (unused at inference).
    pub attention_dropout: f64,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP activation.
    pub activation_function: Activation,
    /// Biases on the attention and MLP projections.
    pub enable_bias: bool,
    /// Layer norms with weight and bias (else parameter-free).
    pub layer_norm_elementwise_affine: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl OPTConfig {
    /// Reads the keys `OPTConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 768)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 12)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(cfg.error(format!(
                    "hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let activation_function = Activation::from_config(cfg, "activation_function", "relu")?;
        Ok(OPTConfig {
            vocab_size: cfg.usize_or("vocab_size", 50272)?,
            hidden_size,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 12)?,
            ffn_dim: cfg.usize_or("ffn_dim", 3072)?,
            max_position_embeddings: cfg.usize_or("max_position_embeddings", 2048)?,
            do_layer_norm_before: cfg.bool_or("do_layer_norm_before", true)?,
            remove_final_layer_norm: cfg.bool_or("_remove_final_layer_norm", false)?,
            word_embed_proj_dim: cfg.opt_usize("word_embed_proj_dim")?.unwrap_or(hidden_size),
            dropout: cfg.f64_or("dropout", 0.1)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            num_attention_heads,
            activation_function,
            enable_bias: cfg.bool_or("enable_bias", true)?,
            layer_norm_elementwise_affine: cfg.bool_or("layer_norm_elementwise_affine", true)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
        })
    }
}

/// `OPTLearnedPositionalEmbedding`: an embedding of `max_position_embeddings + 2` rows read at
/// `position_ids + 2`.
pub struct OPTLearnedPositionalEmbedding {
    /// [max_position_embeddings + 2, hidden].
    pub weight: Tensor,
    offset: usize,
    scope: Scope,
}

#[hooked]
impl OPTLearnedPositionalEmbedding {
    /// Position embeddings [B, T, hidden] of `position_ids` [B, T].
    pub fn forward(&self, position_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = position_ids.dims2()?;
        let offset = Tensor::new(self.offset as i64, position_ids.device())?;
        let ids = position_ids
            .to_dtype(candle_core::DType::I64)?
            .broadcast_add(&offset)?;
        let rows = self.weight.index_select(&ids.flatten_all()?, 0)?;
        rows.reshape((b, t, self.weight.dim(1)?))
    }
}

/// transformers' `eager_attention_forward`: the attention output [B, T, H, D] and the probabilities
/// [B, H, T, K] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &OPTAttention,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attention_mask: Option<&Tensor>,
    scaling: f64,
    dropout: f64,
) -> Result<(Tensor, Tensor)> {
    let _ = module;
    let mut attn_weights = nn::ops::scale(
        &query.matmul(&key.transpose(D::Minus1, D::Minus2)?)?,
        scaling,
    )?;
    if let Some(mask) = attention_mask {
        attn_weights = nn::ops::add(&attn_weights, mask)?;
    }
    let attn_weights =
        nn::functional::softmax(&attn_weights, D::Minus1)?.to_dtype(query.dtype())?;
    let attn_weights = nn::functional::dropout(&attn_weights, dropout)?;
    let attn_output = attn_weights.matmul(&value.contiguous()?)?;
    let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
    Ok((attn_output, attn_weights))
}

/// `OPTAttention`.
pub struct OPTAttention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scaling: f64,
    dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl OPTAttention {
    fn new(cfg: &OPTConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let e = cfg.hidden_size;
        let head_dim = e / cfg.num_attention_heads;
        let bias = cfg.enable_bias;
        Ok(OPTAttention {
            k_proj: Linear::new(e, e, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(e, e, bias, vb.pp("v_proj"))?,
            q_proj: Linear::new(e, e, bias, vb.pp("q_proj"))?,
            out_proj: Linear::new(e, e, bias, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scaling: (head_dim as f64).powf(-0.5),
            dropout: cfg.attention_dropout,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl OPTAttention {
    /// Self-attention over `hidden_states` [B, T, hidden]; the query is scaled before the scores.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        cache: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (bsz, tgt_len, _) = hidden_states.dims3()?;
        let shape = (bsz, tgt_len, self.num_heads, self.head_dim);
        let query_states = nn::ops::scale(&self.q_proj.forward(hidden_states)?, self.scaling)?;
        let query_states = query_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;
        let key_states = self.k_proj.forward(hidden_states)?;
        let value_states = self.v_proj.forward(hidden_states)?;
        let key_states = key_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;
        let value_states = value_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;

        let (key_states, value_states) = match cache {
            Some(cache) => cache.update(&key_states, &value_states, self.layer_idx)?,
            None => (key_states, value_states),
        };

        let attention_interface = eager_attention_forward;
        let (attn_output, _attn_weights) = attention_interface(
            self,
            &query_states,
            &key_states,
            &value_states,
            attention_mask,
            1.0,
            self.dropout,
        )?;
        let attn_output = attn_output.reshape((bsz, tgt_len, ()))?;
        self.out_proj.forward(&attn_output)
    }
}

/// `OPTDecoderLayer`: attention then `fc1` / `fc2`, each with a residual; layer norms before each
/// block or after each residual.
pub struct OPTDecoderLayer {
    self_attn: OPTAttention,
    do_layer_norm_before: bool,
    dropout: f64,
    activation_fn: Activation,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    scope: Scope,
}

#[hooked]
impl OPTDecoderLayer {
    /// One decoder layer.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let mut hidden_states = hidden_states.clone();
        if self.do_layer_norm_before {
            hidden_states = self.self_attn_layer_norm.forward(&hidden_states)?;
        }
        let hidden_states = self
            .self_attn
            .forward(&hidden_states, cache, attention_mask)?;
        let hidden_states = nn::functional::dropout(&hidden_states, self.dropout)?;
        let mut hidden_states = (residual + hidden_states)?;
        if !self.do_layer_norm_before {
            hidden_states = self.self_attn_layer_norm.forward(&hidden_states)?;
        }

        let residual = hidden_states.clone();
        if self.do_layer_norm_before {
            hidden_states = self.final_layer_norm.forward(&hidden_states)?;
        }
        let hidden_states = self.fc1.forward(&hidden_states)?;
        let hidden_states = self.activation_fn.forward(&hidden_states)?;
        let hidden_states = self.fc2.forward(&hidden_states)?;
        let hidden_states = nn::functional::dropout(&hidden_states, self.dropout)?;
        let mut hidden_states = (residual + hidden_states)?;
        if !self.do_layer_norm_before {
            hidden_states = self.final_layer_norm.forward(&hidden_states)?;
        }
        Ok(hidden_states)
    }
}

/// `OPTDecoder`.
pub struct OPTDecoder {
    embed_tokens: Embedding,
    embed_positions: OPTLearnedPositionalEmbedding,
    project_out: Option<Linear>,
    project_in: Option<Linear>,
    final_layer_norm: Option<LayerNorm>,
    layers: Vec<OPTDecoderLayer>,
    scope: Scope,
}

#[hooked]
impl OPTDecoder {
    /// Hidden states after the final norm and `project_out` [B, T, word_embed_proj_dim].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let mut inputs_embeds = self.embed_tokens.forward(input_ids)?;
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
        let pos_embeds = self.embed_positions.forward(position_ids)?;
        if let Some(project_in) = &self.project_in {
            inputs_embeds = project_in.forward(&inputs_embeds)?;
        }
        let mut hidden_states = (inputs_embeds + pos_embeds)?;
        for decoder_layer in self.layers.iter() {
            hidden_states = decoder_layer.forward(&hidden_states, Some(&causal_mask), cache)?;
        }
        if let Some(final_layer_norm) = &self.final_layer_norm {
            hidden_states = final_layer_norm.forward(&hidden_states)?;
        }
        if let Some(project_out) = &self.project_out {
            hidden_states = project_out.forward(&hidden_states)?;
        }
        Ok(hidden_states)
    }
}

/// `OPTModel`.
pub struct OPTModel {
    decoder: OPTDecoder,
    scope: Scope,
}

#[hooked]
impl OPTModel {
    /// Calls the decoder.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        self.decoder
            .forward(input_ids, attention_mask, cache, position_ids)
    }
}

/// `OPTForCausalLM`.
pub struct OPTForCausalLM {
    model: OPTModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl OPTForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&KvCache>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let hidden_states = self
            .model
            .forward(input_ids, attention_mask, cache, position_ids)?;
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for OPTForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        OPTForCausalLM::forward(
            self,
            input_ids,
            attention_mask,
            past_key_values,
            position_ids,
        )
    }

    fn dims(&self) -> Dims {
        self.dims
    }
}

/// A layer norm as `nn.LayerNorm(dim, elementwise_affine=affine)` builds it (eps 1e-5).
fn layer_norm(dim: usize, affine: bool, vb: Builder) -> Result<LayerNorm> {
    if affine {
        LayerNorm::new(dim, 1e-5, true, vb)
    } else {
        let ones = Tensor::ones(dim, vb.dtype(), vb.device())?;
        Ok(LayerNorm::from_weights(ones, None, 1e-5, &vb))
    }
}

/// Builds an OPT model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = OPTConfig::read(config)?;
    let root = vb.clone();
    // Checkpoints saved from `OPTModel` (facebook/opt-*) have no `model.` prefix.
    let vb_m = if !vb.contains("model.decoder.embed_tokens.weight")
        && vb.contains("decoder.embed_tokens.weight")
    {
        vb.pp_module("model")
    } else {
        vb.pp("model")
    };
    let vb_d = vb_m.pp("decoder");
    let (e, w) = (cfg.hidden_size, cfg.word_embed_proj_dim);
    let embed_tokens = Embedding::new(cfg.vocab_size, w, vb_d.pp("embed_tokens"))?;
    let vb_p = vb_d.pp("embed_positions");
    let embed_positions = OPTLearnedPositionalEmbedding {
        weight: vb_p.get((cfg.max_position_embeddings + 2, e), "weight")?,
        offset: 2,
        scope: vb_p.scope::<OPTLearnedPositionalEmbedding>(),
    };
    let (project_out, project_in) = if w != e {
        (
            Some(Linear::new(e, w, false, vb_d.pp("project_out"))?),
            Some(Linear::new(w, e, false, vb_d.pp("project_in"))?),
        )
    } else {
        (None, None)
    };
    let final_layer_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
        Some(layer_norm(
            e,
            cfg.layer_norm_elementwise_affine,
            vb_d.pp("final_layer_norm"),
        )?)
    } else {
        None
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_d.pp("layers").pp(i);
        let affine = cfg.layer_norm_elementwise_affine;
        layers.push(OPTDecoderLayer {
            self_attn: OPTAttention::new(&cfg, i, vb_l.pp("self_attn"))?,
            do_layer_norm_before: cfg.do_layer_norm_before,
            dropout: cfg.dropout,
            activation_fn: cfg.activation_function,
            self_attn_layer_norm: layer_norm(e, affine, vb_l.pp("self_attn_layer_norm"))?,
            fc1: Linear::new(e, cfg.ffn_dim, cfg.enable_bias, vb_l.pp("fc1"))?,
            fc2: Linear::new(cfg.ffn_dim, e, cfg.enable_bias, vb_l.pp("fc2"))?,
            final_layer_norm: layer_norm(e, affine, vb_l.pp("final_layer_norm"))?,
            scope: vb_l.scope::<OPTDecoderLayer>(),
        });
    }
    let decoder = OPTDecoder {
        embed_tokens,
        embed_positions,
        project_out,
        project_in,
        final_layer_norm,
        layers,
        scope: vb_d.scope::<OPTDecoder>(),
    };
    let model = OPTModel {
        decoder,
        scope: vb_m.scope::<OPTModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(
            model.decoder.embed_tokens.weight.clone(),
            None,
            &root.pp("lm_head"),
        )
    } else {
        Linear::new(w, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(OPTForCausalLM {
        model,
        lm_head,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_attention_heads,
            head_dim: e / cfg.num_attention_heads,
            hidden: e,
            vocab: cfg.vocab_size,
            max_positions: Some(cfg.max_position_embeddings),
        },
        scope: root.scope::<OPTForCausalLM>(),
    }))
}
