//! GPT-2, porting transformers' `modeling_gpt2.py`.
//!
//! The attention interface calls `module.attn_dropout(attn_weights)` as transformers 4.x did, so the
//! seed's path `attention_interface_0.source.module_attn_dropout_0` is the attention probabilities.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{
    self, mask, Activation, Builder, Conv1D, Dropout, Embedding, KvCache, LayerNorm, Linear,
};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// The configuration of a GPT-2 model, as transformers reads it.
#[derive(Debug, Clone)]
pub struct GPT2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions.
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// MLP width (default 4 * n_embd).
    pub n_inner: usize,
    /// MLP activation.
    pub activation_function: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Scale scores by 1/sqrt(head_dim).
    pub scale_attn_weights: bool,
    /// Further scale scores by 1/(layer_idx + 1).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute the scores in float32 (`_upcast_and_reordered_attn`).
    pub reorder_and_upcast_attn: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout probabilities (unused at inference, kept for the modules).
    pub attn_pdrop: f64,
    /// Residual dropout.
    pub resid_pdrop: f64,
    /// Embedding dropout.
    pub embd_pdrop: f64,
}

impl GPT2Config {
    /// Reads the keys `GPT2Config` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let n_embd = cfg.usize(&["n_embd", "hidden_size"])?;
        let n_head = cfg.usize(&["n_head", "num_attention_heads"])?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(crate::Error::Config {
                path: cfg.path.clone(),
                msg: format!("n_embd ({n_embd}) must be divisible by n_head ({n_head})"),
            });
        }
        let activation_function = Activation::from_config(cfg, "activation_function", "gelu_new")?;
        Ok(GPT2Config {
            vocab_size: cfg.usize(&["vocab_size"])?,
            n_positions: cfg.usize_or("n_positions", 1024)?,
            n_embd,
            n_layer: cfg.usize(&["n_layer", "num_hidden_layers"])?,
            n_head,
            n_inner: cfg.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
            activation_function,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            scale_attn_weights: cfg.bool_or("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: cfg
                .bool_or("scale_attn_by_inverse_layer_idx", false)?,
            reorder_and_upcast_attn: cfg.bool_or("reorder_and_upcast_attn", false)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            attn_pdrop: cfg.f64_or("attn_pdrop", 0.1)?,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.1)?,
            embd_pdrop: cfg.f64_or("embd_pdrop", 0.1)?,
        })
    }
}

/// GPT-2's `eager_attention_forward`: (attention output [B, T, H, D], probabilities [B, H, T, T]).
#[hooked]
pub fn eager_attention_forward(
    module: &GPT2Attention,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attention_mask: Option<&Tensor>,
    scaling: f64,
) -> Result<(Tensor, Tensor)> {
    let mut attn_weights = nn::ops::scale(
        &query.matmul(&key.transpose(D::Minus1, D::Minus2)?)?,
        scaling,
    )?;
    if let Some(mask) = attention_mask {
        attn_weights = nn::ops::add(&attn_weights, mask)?;
    }
    let attn_weights = nn::functional::softmax(&attn_weights, D::Minus1)?;
    let attn_weights = attn_weights.to_dtype(value.dtype())?;
    let attn_weights = module.attn_dropout.forward(&attn_weights)?;
    let attn_output = attn_weights.matmul(value)?;
    let attn_output = attn_output.transpose(1, 2)?;
    Ok((attn_output, attn_weights))
}

/// `GPT2Attention` (self-attention).
pub struct GPT2Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    /// Dropout on the probabilities (the identity at inference; its output is the probabilities).
    pub attn_dropout: Dropout,
    resid_dropout: Dropout,
    num_heads: usize,
    head_dim: usize,
    split_size: usize,
    scaling: f64,
    reorder_and_upcast_attn: bool,
    layer_idx: usize,
    scope: Scope,
}

impl GPT2Attention {
    fn new(cfg: &GPT2Config, layer_idx: usize, vb: Builder) -> Result<Self> {
        let embed_dim = cfg.n_embd;
        let head_dim = embed_dim / cfg.n_head;
        let mut scaling = 1.0;
        if cfg.scale_attn_weights {
            scaling = (head_dim as f64).powf(-0.5);
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scaling /= (layer_idx + 1) as f64;
        }
        Ok(GPT2Attention {
            c_attn: Conv1D::new(3 * embed_dim, embed_dim, vb.pp("c_attn"))?,
            c_proj: Conv1D::new(embed_dim, embed_dim, vb.pp("c_proj"))?,
            attn_dropout: Dropout::new(cfg.attn_pdrop, vb.pp("attn_dropout")),
            resid_dropout: Dropout::new(cfg.resid_pdrop, vb.pp("resid_dropout")),
            num_heads: cfg.n_head,
            head_dim,
            split_size: embed_dim,
            scaling,
            reorder_and_upcast_attn: cfg.reorder_and_upcast_attn,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GPT2Attention {
    /// Scores computed in float32 whatever the dtype (`reorder_and_upcast_attn`).
    fn _upcast_and_reordered_attn(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let q = query.to_dtype(DType::F32)?;
        let k = key.to_dtype(DType::F32)?;
        let mut attn_weights = nn::ops::scale(
            &q.matmul(&k.transpose(D::Minus1, D::Minus2)?)?,
            self.scaling,
        )?;
        if let Some(mask) = attention_mask {
            attn_weights = nn::ops::add(&attn_weights, &mask.to_dtype(DType::F32)?)?;
        }
        let attn_weights = nn::functional::softmax(&attn_weights, D::Minus1)?;
        let attn_weights = attn_weights.to_dtype(value.dtype())?;
        let attn_weights = self.attn_dropout.forward(&attn_weights)?;
        let attn_output = attn_weights.matmul(value)?;
        let attn_output = attn_output.transpose(1, 2)?;
        Ok((attn_output, attn_weights))
    }

    /// Self-attention over `hidden_states` [B, T, n_embd].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = hidden_states.dims3()?;
        let qkv = self.c_attn.forward(hidden_states)?;
        let query_states = qkv.narrow(2, 0, self.split_size)?;
        let key_states = qkv.narrow(2, self.split_size, self.split_size)?;
        let value_states = qkv.narrow(2, 2 * self.split_size, self.split_size)?;
        let shape = (b, t, self.num_heads, self.head_dim);
        let query_states = query_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;
        let key_states = key_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;
        let value_states = value_states.reshape(shape)?.transpose(1, 2)?.contiguous()?;
        let (key_states, value_states) = match past_key_values {
            Some(past_key_values) => {
                past_key_values.update(&key_states, &value_states, self.layer_idx)?
            }
            None => (key_states, value_states),
        };

        let (attn_output, _attn_weights) = if self.reorder_and_upcast_attn {
            self._upcast_and_reordered_attn(
                &query_states,
                &key_states,
                &value_states,
                attention_mask,
            )?
        } else {
            let attention_interface = eager_attention_forward;
            attention_interface(
                self,
                &query_states,
                &key_states,
                &value_states,
                attention_mask,
                self.scaling,
            )?
        };
        let attn_output = attn_output.reshape((b, t, ()))?;
        let attn_output = self.c_proj.forward(&attn_output)?;
        self.resid_dropout.forward(&attn_output)
    }
}

/// `GPT2MLP`.
pub struct GPT2MLP {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
    dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl GPT2MLP {
    /// c_proj(act(c_fc(x))).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.c_fc.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        let hidden_states = self.c_proj.forward(&hidden_states)?;
        self.dropout.forward(&hidden_states)
    }
}

/// `GPT2Block`.
pub struct GPT2Block {
    ln_1: LayerNorm,
    attn: GPT2Attention,
    ln_2: LayerNorm,
    mlp: GPT2MLP,
    scope: Scope,
}

#[hooked]
impl GPT2Block {
    /// Pre-norm attention and MLP with residuals.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.ln_1.forward(hidden_states)?;
        let attn_output = self
            .attn
            .forward(&hidden_states, attention_mask, past_key_values)?;
        let hidden_states = (attn_output + residual)?;

        let residual = &hidden_states;
        let mlp_input = self.ln_2.forward(&hidden_states)?;
        let feed_forward_hidden_states = self.mlp.forward(&mlp_input)?;
        residual + feed_forward_hidden_states
    }
}

/// `GPT2Model`.
pub struct GPT2Model {
    wte: Embedding,
    wpe: Embedding,
    drop: Dropout,
    h: Vec<GPT2Block>,
    ln_f: LayerNorm,
    scope: Scope,
}

#[hooked]
impl GPT2Model {
    /// Hidden states after `ln_f` [B, T, n_embd].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let inputs_embeds = self.wte.forward(input_ids)?;
        let position_embeds = self.wpe.forward(position_ids)?;
        let hidden_states = inputs_embeds.broadcast_add(&position_embeds)?;
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_len,
            nn::past_len(past_key_values),
            None,
            hidden_states.dtype(),
            hidden_states.device(),
        )?;
        let mut hidden_states = self.drop.forward(&hidden_states)?;
        for block in self.h.iter() {
            hidden_states = block.forward(&hidden_states, Some(&causal_mask), past_key_values)?;
        }
        self.ln_f.forward(&hidden_states)
    }
}

/// `GPT2LMHeadModel`.
pub struct GPT2LMHeadModel {
    transformer: GPT2Model,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GPT2LMHeadModel {
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

/// Where the probabilities are with `reorder_and_upcast_attn`: transformers calls
/// `self._upcast_and_reordered_attn(..)` instead of `attention_interface(..)`, and its dropout is
/// `self.attn_dropout(attn_weights)`.
pub const UPCAST_ATTENTION_PROBABILITIES: &str =
    "source.self__upcast_and_reordered_attn_0.source.self_attn_dropout_0";

impl CausalLM for GPT2LMHeadModel {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GPT2LMHeadModel::forward(
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

    fn attention_probabilities(&self) -> Option<&'static str> {
        // Every layer shares the config, so the first one says it for all.
        let reordered = self
            .transformer
            .h
            .first()
            .is_some_and(|b| b.attn.reorder_and_upcast_attn);
        reordered.then_some(UPCAST_ATTENTION_PROBABILITIES)
    }
}

/// Builds a GPT-2 model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GPT2Config::read(config)?;
    let root = vb.clone();
    // Checkpoints saved from `GPT2Model` (openai-community/gpt2 among them) have no `transformer.`
    // prefix on their weights; the module is still `transformer`, as transformers loads it.
    let vb_t = if !vb.contains("transformer.wte.weight") && vb.contains("wte.weight") {
        vb.pp_module("transformer")
    } else {
        vb.pp("transformer")
    };
    let wte = Embedding::new(cfg.vocab_size, cfg.n_embd, vb_t.pp("wte"))?;
    let wpe = Embedding::new(cfg.n_positions, cfg.n_embd, vb_t.pp("wpe"))?;
    let drop = Dropout::new(cfg.embd_pdrop, vb_t.pp("drop"));
    let mut h = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let vb_l = vb_t.pp("h").pp(i);
        let ln_1 = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, true, vb_l.pp("ln_1"))?;
        let attn = GPT2Attention::new(&cfg, i, vb_l.pp("attn"))?;
        let ln_2 = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, true, vb_l.pp("ln_2"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = GPT2MLP {
            c_fc: Conv1D::new(cfg.n_inner, cfg.n_embd, vb_mlp.pp("c_fc"))?,
            c_proj: Conv1D::new(cfg.n_embd, cfg.n_inner, vb_mlp.pp("c_proj"))?,
            act: cfg.activation_function,
            dropout: Dropout::new(cfg.resid_pdrop, vb_mlp.pp("dropout")),
            scope: vb_mlp.scope::<GPT2MLP>(),
        };
        h.push(GPT2Block {
            ln_1,
            attn,
            ln_2,
            mlp,
            scope: vb_l.scope::<GPT2Block>(),
        });
    }
    let ln_f = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, true, vb_t.pp("ln_f"))?;
    let transformer = GPT2Model {
        wte,
        wpe,
        drop,
        h,
        ln_f,
        scope: vb_t.scope::<GPT2Model>(),
    };
    let lm_head = if cfg.tie_word_embeddings || !root.contains("lm_head.weight") {
        Linear::from_weights(transformer.wte.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(cfg.n_embd, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(GPT2LMHeadModel {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.n_layer,
            heads: cfg.n_head,
            kv_heads: cfg.n_head,
            head_dim: cfg.n_embd / cfg.n_head,
            hidden: cfg.n_embd,
            vocab: cfg.vocab_size,
            max_positions: Some(cfg.n_positions),
        },
        scope: root.scope::<GPT2LMHeadModel>(),
    }))
}
