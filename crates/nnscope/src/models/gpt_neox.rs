//! GPT-NeoX (Pythia), porting transformers' `modeling_gpt_neox.py`.
//!
//! One fused `query_key_value` projection laid out per head (`[q_h | k_h | v_h]` for each head h),
//! rotary embeddings on the first `partial_rotary_factor` (`rotary_pct`) of each head, parallel or
//! sequential residuals (`use_parallel_residual`), and an untied output head stored as `embed_out` in
//! published checkpoints (transformers renames it `lm_head` on load).

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::rope::{self, rotate_half};
use crate::nn::{self, mask, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{Result, Tensor, D};

/// The configuration of a GPT-NeoX model, as `GPTNeoXConfig` reads it.
#[derive(Debug, Clone)]
pub struct GPTNeoXConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Dropout on the attention probabilities (unused at inference).
    pub attention_dropout: f64,
    /// Dropout after the embeddings, attention and MLP (unused at inference).
    pub hidden_dropout: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Attention and MLP both read the layer input and are added to it together.
    pub use_parallel_residual: bool,
    /// Biases on `query_key_value` and `dense`.
    pub attention_bias: bool,
    /// RoPE parameters (`rotary_emb_base` and `rotary_pct` in older configs).
    pub rope: rope::RopeParams,
    /// The head size the rotary tables are computed for (`head_dim` if config.json has one).
    pub rope_head_dim: usize,
}

impl GPTNeoXConfig {
    /// Reads the keys `GPTNeoXConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = cfg.usize_or("hidden_size", 6144)?;
        let num_attention_heads = cfg.usize_or("num_attention_heads", 64)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(cfg.error(format!(
                    "hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let hidden_act = Activation::from_config(cfg, "hidden_act", "gelu")?;
        let max_position_embeddings = cfg.usize_or("max_position_embeddings", 2048)?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, max_position_embeddings)?;
        // `GPTNeoXConfig.convert_rope_params_to_dict`: inside `rope_parameters` (or `rope_scaling`)
        // first, else `rotary_emb_base` / `rotary_pct`, else 10000 / 0.25; the top-level
        // `rope_theta` / `partial_rotary_factor` keys are not read.
        let inner = |key: &str| rope.params.get(key).and_then(|v| v.as_f64());
        rope.theta = match inner("rope_theta") {
            Some(t) => t,
            None => cfg.f64_or("rotary_emb_base", 10000.0)?,
        };
        rope.partial_rotary_factor = match inner("partial_rotary_factor") {
            Some(p) => p,
            None => cfg.f64_or("rotary_pct", 0.25)?,
        };
        if !(0.0..=1.0).contains(&rope.partial_rotary_factor) {
            return Err(cfg.error(format!(
                "rotary_pct / partial_rotary_factor ({}) must be between 0 and 1",
                rope.partial_rotary_factor
            )));
        }
        let rope_head_dim = cfg
            .opt_usize("head_dim")?
            .filter(|d| *d > 0)
            .unwrap_or(hidden_size / num_attention_heads);
        Ok(GPTNeoXConfig {
            vocab_size: cfg.usize_or("vocab_size", 50432)?,
            hidden_size,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 44)?,
            num_attention_heads,
            intermediate_size: cfg.usize_or("intermediate_size", 24576)?,
            hidden_act,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            hidden_dropout: cfg.f64_or("hidden_dropout", 0.0)?,
            layer_norm_eps: cfg.f64_or("layer_norm_eps", 1e-5)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            use_parallel_residual: cfg.bool_or("use_parallel_residual", true)?,
            attention_bias: cfg.bool_or("attention_bias", true)?,
            rope,
            rope_head_dim,
        })
    }
}

/// `GPTNeoXMLP`: dense_4h_to_h(act(dense_h_to_4h(x))).
pub struct GPTNeoXMLP {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: Activation,
    scope: Scope,
}

#[hooked]
impl GPTNeoXMLP {
    /// The feed-forward block.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.dense_h_to_4h.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        self.dense_4h_to_h.forward(&hidden_states)
    }
}

/// GPT-NeoX's `apply_rotary_pos_emb`: rotates the first `cos.shape[-1]` dimensions of each head of
/// q and k ([B, H, T, D]) and passes the rest through; cos/sin are [B, T, rotary dims].
#[hooked]
pub fn apply_rotary_pos_emb(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let rotary_dim = cos.dim(D::Minus1)?;
    let head_dim = q.dim(D::Minus1)?;
    let q_rot = q.narrow(D::Minus1, 0, rotary_dim)?;
    let q_pass = q.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
    let k_rot = k.narrow(D::Minus1, 0, rotary_dim)?;
    let k_pass = k.narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?;
    let q_embed = (q_rot.broadcast_mul(&cos)? + rotate_half(&q_rot)?.broadcast_mul(&sin)?)?;
    let k_embed = (k_rot.broadcast_mul(&cos)? + rotate_half(&k_rot)?.broadcast_mul(&sin)?)?;
    let q_embed = Tensor::cat(&[&q_embed, &q_pass], D::Minus1)?;
    let k_embed = Tensor::cat(&[&k_embed, &k_pass], D::Minus1)?;
    Ok((q_embed, k_embed))
}

/// transformers' `eager_attention_forward`: the attention output [B, T, H, D] and the probabilities
/// [B, H, T, K] (the output of `nn_functional_dropout_0`).
#[hooked]
pub fn eager_attention_forward(
    module: &GPTNeoXAttention,
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    attention_mask: Option<&Tensor>,
    scaling: f64,
    dropout: f64,
) -> Result<(Tensor, Tensor)> {
    let _ = module;
    let mut attn_weights = nn::ops::scale(&query.matmul(&key.transpose(2, 3)?)?, scaling)?;
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

/// `GPTNeoXAttention`.
pub struct GPTNeoXAttention {
    query_key_value: Linear,
    dense: Linear,
    head_size: usize,
    scaling: f64,
    attention_dropout: f64,
    layer_idx: usize,
    scope: Scope,
}

impl GPTNeoXAttention {
    fn new(cfg: &GPTNeoXConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_size = h / cfg.num_attention_heads;
        Ok(GPTNeoXAttention {
            query_key_value: Linear::new(h, 3 * h, cfg.attention_bias, vb.pp("query_key_value"))?,
            dense: Linear::new(h, h, cfg.attention_bias, vb.pp("dense"))?,
            head_size,
            scaling: (head_size as f64).powf(-0.5),
            attention_dropout: cfg.attention_dropout,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GPTNeoXAttention {
    /// Self-attention over `hidden_states` [B, T, hidden].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        layer_past: Option<&KvCache>,
        position_embeddings: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (b, t, _) = hidden_states.dims3()?;
        let hidden_shape = (b, t, (), 3 * self.head_size);
        // Per head: [q | k | v], each `head_size` wide.
        let qkv = self
            .query_key_value
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;
        let query_states = qkv.narrow(D::Minus1, 0, self.head_size)?.contiguous()?;
        let key_states = qkv
            .narrow(D::Minus1, self.head_size, self.head_size)?
            .contiguous()?;
        let value_states = qkv
            .narrow(D::Minus1, 2 * self.head_size, self.head_size)?
            .contiguous()?;

        let (cos, sin) = position_embeddings;
        let (query_states, key_states) =
            apply_rotary_pos_emb(&query_states, &key_states, cos, sin)?;

        let (key_states, value_states) = match layer_past {
            Some(layer_past) => layer_past.update(&key_states, &value_states, self.layer_idx)?,
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
        self.dense.forward(&attn_output)
    }
}

/// `GPTNeoXLayer`.
pub struct GPTNeoXLayer {
    use_parallel_residual: bool,
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    post_attention_dropout: Dropout,
    post_mlp_dropout: Dropout,
    attention: GPTNeoXAttention,
    mlp: GPTNeoXMLP,
    scope: Scope,
}

#[hooked]
impl GPTNeoXLayer {
    /// Attention and MLP, in parallel (both from the layer input) or one after the other.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        layer_past: Option<&KvCache>,
        position_embeddings: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let attn_output = self.attention.forward(
            &self.input_layernorm.forward(hidden_states)?,
            attention_mask,
            layer_past,
            position_embeddings,
        )?;
        let attn_output = self.post_attention_dropout.forward(&attn_output)?;

        if self.use_parallel_residual {
            // x = x + attn(ln1(x)) + mlp(ln2(x))
            let mlp_output = self
                .mlp
                .forward(&self.post_attention_layernorm.forward(hidden_states)?)?;
            let mlp_output = self.post_mlp_dropout.forward(&mlp_output)?;
            (mlp_output + attn_output)? + hidden_states
        } else {
            // x = x + attn(ln1(x)); x = x + mlp(ln2(x))
            let attn_output = (attn_output + hidden_states)?;
            let mlp_output = self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&attn_output)?)?;
            let mlp_output = self.post_mlp_dropout.forward(&mlp_output)?;
            mlp_output + attn_output
        }
    }
}

/// `GPTNeoXModel`.
pub struct GPTNeoXModel {
    embed_in: Embedding,
    emb_dropout: Dropout,
    layers: Vec<GPTNeoXLayer>,
    final_layer_norm: LayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl GPTNeoXModel {
    /// Hidden states after the final norm [B, T, hidden].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        cache: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.embed_in.forward(input_ids)?;
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
        let mut hidden_states = self.emb_dropout.forward(&inputs_embeds)?;
        let position_embeddings =
            self.rotary_emb
                .cos_sin(position_ids, hidden_states.dtype(), hidden_states.device())?;
        for layer in self.layers.iter() {
            hidden_states = layer.forward(
                &hidden_states,
                Some(&causal_mask),
                cache,
                &position_embeddings,
            )?;
        }
        self.final_layer_norm.forward(&hidden_states)
    }
}

/// `GPTNeoXForCausalLM`.
pub struct GPTNeoXForCausalLM {
    gpt_neox: GPTNeoXModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GPTNeoXForCausalLM {
    /// Logits [B, T, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        cache: Option<&KvCache>,
    ) -> Result<Tensor> {
        let hidden_states =
            self.gpt_neox
                .forward(input_ids, attention_mask, position_ids, cache)?;
        self.lm_head.forward(&hidden_states)
    }
}

impl CausalLM for GPTNeoXForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GPTNeoXForCausalLM::forward(
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

/// Builds a GPT-NeoX model. Weights as published (`gpt_neox.` prefix, `embed_out` head) or as
/// transformers 5 names the head (`lm_head`).
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GPTNeoXConfig::read(config)?;
    let root = vb.clone();
    let vb_m = vb.pp("gpt_neox");
    let embed_in = Embedding::new(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_in"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_m.pp("layers").pp(i);
        let h = cfg.hidden_size;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = GPTNeoXMLP {
            dense_h_to_4h: Linear::new(h, cfg.intermediate_size, true, vb_mlp.pp("dense_h_to_4h"))?,
            dense_4h_to_h: Linear::new(cfg.intermediate_size, h, true, vb_mlp.pp("dense_4h_to_h"))?,
            act: cfg.hidden_act,
            scope: vb_mlp.scope::<GPTNeoXMLP>(),
        };
        layers.push(GPTNeoXLayer {
            use_parallel_residual: cfg.use_parallel_residual,
            input_layernorm: LayerNorm::new(
                h,
                cfg.layer_norm_eps,
                true,
                vb_l.pp("input_layernorm"),
            )?,
            post_attention_layernorm: LayerNorm::new(
                h,
                cfg.layer_norm_eps,
                true,
                vb_l.pp("post_attention_layernorm"),
            )?,
            post_attention_dropout: Dropout::new(
                cfg.hidden_dropout,
                vb_l.pp("post_attention_dropout"),
            ),
            post_mlp_dropout: Dropout::new(cfg.hidden_dropout, vb_l.pp("post_mlp_dropout")),
            attention: GPTNeoXAttention::new(&cfg, i, vb_l.pp("attention"))?,
            mlp,
            scope: vb_l.scope::<GPTNeoXLayer>(),
        });
    }
    let final_layer_norm = LayerNorm::new(
        cfg.hidden_size,
        cfg.layer_norm_eps,
        true,
        vb_m.pp("final_layer_norm"),
    )?;
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.rope_head_dim)?;
    let gpt_neox = GPTNeoXModel {
        embed_in,
        emb_dropout: Dropout::new(cfg.hidden_dropout, vb_m.pp("emb_dropout")),
        layers,
        final_layer_norm,
        rotary_emb,
        scope: vb_m.scope::<GPTNeoXModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(gpt_neox.embed_in.weight.clone(), None, &root.pp("lm_head"))
    } else if root.contains("lm_head.weight") || !root.contains("embed_out.weight") {
        Linear::new(cfg.hidden_size, cfg.vocab_size, false, root.pp("lm_head"))?
    } else {
        // Published checkpoints name the head `embed_out`; the module is `lm_head`.
        let weight = root
            .pp("embed_out")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        Linear::from_weights(
            nn::prepare_linear_weight(weight)?,
            None,
            &root.pp("lm_head"),
        )
    };
    Ok(Box::new(GPTNeoXForCausalLM {
        gpt_neox,
        lm_head,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_attention_heads,
            head_dim: cfg.hidden_size / cfg.num_attention_heads,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<GPTNeoXForCausalLM>(),
    }))
}
