//! GPTBigCode (StarCoder, SantaCoder), porting transformers' `modeling_gpt_bigcode.py`.
//!
//! GPT-2-like blocks with `nn.Linear` projections, learned positions, and one fused `c_attn`: with
//! `multi_query` it is `[q (all heads) | k (one head) | v (one head)]`, shared by every query head;
//! without, it is laid out per head (`[q_h | k_h | v_h]` for each head h).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{
    self, mask, repeat_kv, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear,
};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a GPTBigCode model, as `GPTBigCodeConfig` reads it.
#[derive(Debug, Clone)]
pub struct GPTBigCodeConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions.
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// MLP width (default 4 * n_embd).
    pub n_inner: usize,
    /// MLP activation.
    pub activation_function: Activation,
    /// Dropout probabilities (unused at inference, kept for the modules).
    pub resid_pdrop: f64,
    /// Embedding dropout.
    pub embd_pdrop: f64,
    /// Attention dropout.
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Scale scores by 1/sqrt(head_dim).
    pub scale_attn_weights: bool,
    /// One key/value head shared by all query heads.
    pub multi_query: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl GPTBigCodeConfig {
    /// Reads the keys `GPTBigCodeConfig` reads (and their `attribute_map` aliases), with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let n_embd = cfg.usize_alias_or(&["n_embd", "hidden_size"], 768)?;
        let n_head = cfg.usize_alias_or(&["n_head", "num_attention_heads"], 12)?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(cfg.error(format!(
                "n_embd ({n_embd}) must be divisible by n_head ({n_head})"
            )));
        }
        let activation_function =
            Activation::from_config(cfg, "activation_function", "gelu_pytorch_tanh")?;
        Ok(GPTBigCodeConfig {
            vocab_size: cfg.usize_or("vocab_size", 50257)?,
            n_positions: cfg.usize_alias_or(&["n_positions", "max_position_embeddings"], 1024)?,
            n_embd,
            n_layer: cfg.usize_alias_or(&["n_layer", "num_hidden_layers"], 12)?,
            n_head,
            n_inner: cfg.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
            activation_function,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.1)?,
            embd_pdrop: cfg.f64_or("embd_pdrop", 0.1)?,
            attn_pdrop: cfg.f64_or("attn_pdrop", 0.1)?,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            scale_attn_weights: cfg.bool_or("scale_attn_weights", true)?,
            multi_query: cfg.bool_or("multi_query", true)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
        })
    }
}

/// transformers' `eager_attention_forward`: the attention output [B, T, H, D] and the probabilities
/// [B, H, T, K] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &GPTBigCodeAttention,
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

/// `GPTBigCodeAttention` (self-attention).
pub struct GPTBigCodeAttention {
    c_attn: Linear,
    c_proj: Linear,
    resid_dropout: Dropout,
    multi_query: bool,
    embed_dim: usize,
    num_heads: usize,
    head_dim: usize,
    kv_dim: usize,
    /// Query heads per key/value head.
    pub num_key_value_groups: usize,
    scaling: f64,
    attn_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl GPTBigCodeAttention {
    fn new(cfg: &GPTBigCodeConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let embed_dim = cfg.n_embd;
        let head_dim = embed_dim / cfg.n_head;
        let kv_heads = if cfg.multi_query { 1 } else { cfg.n_head };
        let kv_dim = kv_heads * head_dim;
        Ok(GPTBigCodeAttention {
            c_attn: Linear::new(embed_dim, embed_dim + 2 * kv_dim, true, vb.pp("c_attn"))?,
            c_proj: Linear::new(embed_dim, embed_dim, true, vb.pp("c_proj"))?,
            resid_dropout: Dropout::new(cfg.resid_pdrop, vb.pp("resid_dropout")),
            multi_query: cfg.multi_query,
            embed_dim,
            num_heads: cfg.n_head,
            head_dim,
            kv_dim,
            num_key_value_groups: cfg.n_head / kv_heads,
            scaling: if cfg.scale_attn_weights {
                (head_dim as f64).powf(-0.5)
            } else {
                1.0
            },
            attn_dropout: cfg.attn_pdrop,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GPTBigCodeAttention {
    /// Self-attention over `hidden_states` [B, T, n_embd].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        layer_past: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = hidden_states.dims3()?;
        let (query, key, value) = if self.multi_query {
            // [q | k | v] with one key/value head: [B, 1, T, E + 2 * kv_dim] split on the last axis.
            let qkv = self.c_attn.forward(hidden_states)?.unsqueeze(1)?;
            let query = qkv.narrow(3, 0, self.embed_dim)?;
            let key = qkv.narrow(3, self.embed_dim, self.kv_dim)?.contiguous()?;
            let value = qkv
                .narrow(3, self.embed_dim + self.kv_dim, self.kv_dim)?
                .contiguous()?;
            let query = query
                .reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            (query, key, value)
        } else {
            // Per head: [q | k | v], each `head_dim` wide.
            let qkv = self
                .c_attn
                .forward(hidden_states)?
                .reshape((b, t, self.num_heads, 3 * self.head_dim))?
                .transpose(1, 2)?;
            let query = qkv.narrow(3, 0, self.head_dim)?.contiguous()?;
            let key = qkv.narrow(3, self.head_dim, self.head_dim)?.contiguous()?;
            let value = qkv
                .narrow(3, 2 * self.head_dim, self.head_dim)?
                .contiguous()?;
            (query, key, value)
        };

        let (key, value) = match layer_past {
            Some(curr_cache) => curr_cache.update(&key, &value, self.layer_idx)?,
            None => (key, value),
        };

        let attention_interface = eager_attention_forward;
        let (attn_output, _attn_weights) = attention_interface(
            self,
            &query,
            &key,
            &value,
            attention_mask,
            self.scaling,
            self.attn_dropout,
        )?;
        let attn_output = attn_output.reshape((b, t, ()))?;
        let attn_output = self.c_proj.forward(&attn_output)?;
        self.resid_dropout.forward(&attn_output)
    }
}

/// `GPTBigCodeMLP`.
pub struct GPTBigCodeMLP {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
    dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl GPTBigCodeMLP {
    /// dropout(c_proj(act(c_fc(x)))).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.c_fc.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        let hidden_states = self.c_proj.forward(&hidden_states)?;
        self.dropout.forward(&hidden_states)
    }
}

/// `GPTBigCodeBlock`.
pub struct GPTBigCodeBlock {
    ln_1: LayerNorm,
    attn: GPTBigCodeAttention,
    ln_2: LayerNorm,
    mlp: GPTBigCodeMLP,
    scope: Scope,
}

#[hooked]
impl GPTBigCodeBlock {
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

/// `GPTBigCodeModel`.
pub struct GPTBigCodeModel {
    wte: Embedding,
    wpe: Embedding,
    drop: Dropout,
    h: Vec<GPTBigCodeBlock>,
    ln_f: LayerNorm,
    scope: Scope,
}

#[hooked]
impl GPTBigCodeModel {
    /// Hidden states after `ln_f` [B, T, n_embd].
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

/// `GPTBigCodeForCausalLM`.
pub struct GPTBigCodeForCausalLM {
    transformer: GPTBigCodeModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GPTBigCodeForCausalLM {
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

impl CausalLM for GPTBigCodeForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GPTBigCodeForCausalLM::forward(
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

/// Builds a GPTBigCode model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GPTBigCodeConfig::read(config)?;
    let root = vb.clone();
    // Checkpoints saved from `GPTBigCodeModel` have no `transformer.` prefix on their weights.
    let vb_t = if !vb.contains("transformer.wte.weight") && vb.contains("wte.weight") {
        vb.pp_module("transformer")
    } else {
        vb.pp("transformer")
    };
    let e = cfg.n_embd;
    let wte = Embedding::new(cfg.vocab_size, e, vb_t.pp("wte"))?;
    let wpe = Embedding::new(cfg.n_positions, e, vb_t.pp("wpe"))?;
    let mut h = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let vb_l = vb_t.pp("h").pp(i);
        let vb_mlp = vb_l.pp("mlp");
        let mlp = GPTBigCodeMLP {
            c_fc: Linear::new(e, cfg.n_inner, true, vb_mlp.pp("c_fc"))?,
            c_proj: Linear::new(cfg.n_inner, e, true, vb_mlp.pp("c_proj"))?,
            act: cfg.activation_function,
            dropout: Dropout::new(cfg.resid_pdrop, vb_mlp.pp("dropout")),
            scope: vb_mlp.scope::<GPTBigCodeMLP>(),
        };
        h.push(GPTBigCodeBlock {
            ln_1: LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_l.pp("ln_1"))?,
            attn: GPTBigCodeAttention::new(&cfg, i, vb_l.pp("attn"))?,
            ln_2: LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_l.pp("ln_2"))?,
            mlp,
            scope: vb_l.scope::<GPTBigCodeBlock>(),
        });
    }
    let ln_f = LayerNorm::new(e, cfg.layer_norm_epsilon, true, vb_t.pp("ln_f"))?;
    let transformer = GPTBigCodeModel {
        wte,
        wpe,
        drop: Dropout::new(cfg.embd_pdrop, vb_t.pp("drop")),
        h,
        ln_f,
        scope: vb_t.scope::<GPTBigCodeModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(transformer.wte.weight.clone(), None, &root.pp("lm_head"))
    } else {
        Linear::new(e, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(GPTBigCodeForCausalLM {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.n_layer,
            heads: cfg.n_head,
            kv_heads: if cfg.multi_query { 1 } else { cfg.n_head },
            head_dim: e / cfg.n_head,
            hidden: e,
            vocab: cfg.vocab_size,
            max_positions: Some(cfg.n_positions),
        },
        scope: root.scope::<GPTBigCodeForCausalLM>(),
    }))
}
