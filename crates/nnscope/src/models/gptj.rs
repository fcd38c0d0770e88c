//! GPT-J, porting transformers' `modeling_gptj.py`.
//!
//! The numerics follow transformers 5.24 (q and k upcast to float32 for the scores, scores multiplied
//! by `head_dim ** -0.5`, rotate-every-two rotary embedding on the first `rotary_dim` dimensions of
//! each head, attention and MLP both fed by the one `ln_1`). The call structure keeps transformers
//! 4.x's `self._attn(..)` with its `self.attn_dropout` module, because the seed's hookpoint
//! `attentions.L.source.self__attn_0.source.self_attn_dropout_0` names that structure.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{self, mask, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Device, Result, Tensor, D};

/// The configuration of a GPT-J model, as transformers' `GPTJConfig` reads it.
#[derive(Debug, Clone)]
pub struct GPTJConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Rows of the sinusoid table (`max_position_embeddings`).
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// Rotated dimensions at the start of each head.
    pub rotary_dim: usize,
    /// MLP width (default 4 * n_embd).
    pub n_inner: usize,
    /// MLP activation.
    pub activation_function: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Residual dropout (the identity at inference).
    pub resid_pdrop: f64,
    /// Embedding dropout (the identity at inference).
    pub embd_pdrop: f64,
    /// Attention-probability dropout (the identity at inference).
    pub attn_pdrop: f64,
    /// lm_head shares the embedding matrix (its bias stays its own).
    pub tie_word_embeddings: bool,
}

impl GPTJConfig {
    /// Reads the keys `GPTJConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let n_embd = cfg.usize_alias_or(&["n_embd", "hidden_size"], 4096)?;
        let n_head = cfg.usize_alias_or(&["n_head", "num_attention_heads"], 16)?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(cfg.error(format!(
                "n_embd ({n_embd}) must be divisible by n_head ({n_head})"
            )));
        }
        let head_dim = n_embd / n_head;
        // transformers 5.24 declares `rotary_dim: int` and rejects null; 4.x's null meant "the whole
        // hidden size", which only ever worked with a single head.
        if cfg.raw.get("rotary_dim").is_some_and(|v| v.is_null()) {
            return Err(cfg.error("`rotary_dim` is null; transformers 5 requires an integer (the rotated dimensions of each head)",
            ));
        }
        let rotary_dim = cfg.usize_or("rotary_dim", 64)?;
        // Anything else fails inside transformers' forward (the sin/cos table does not broadcast).
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
            return Err(cfg.error(format!("`rotary_dim` ({rotary_dim}) must be even and between 2 and the head size ({head_dim})"),
            ));
        }
        let activation_function = Activation::from_config(cfg, "activation_function", "gelu_new")?;
        Ok(GPTJConfig {
            vocab_size: cfg.usize(&["vocab_size"])?,
            n_positions: cfg.usize_alias_or(&["n_positions", "max_position_embeddings"], 2048)?,
            n_embd,
            n_layer: cfg.usize_alias_or(&["n_layer", "num_hidden_layers"], 28)?,
            n_head,
            rotary_dim,
            n_inner: cfg.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
            activation_function,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            resid_pdrop: cfg.f64_or("resid_pdrop", 0.0)?,
            embd_pdrop: cfg.f64_or("embd_pdrop", 0.0)?,
            attn_pdrop: cfg.f64_or("attn_pdrop", 0.0)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
        })
    }
}

/// `create_sinusoidal_positions`: [num_pos, dim] float32 rows `cat(sin(p * inv_freq), cos(p * inv_freq))`,
/// with `inv_freq = 1 / 10000 ** (arange(0, dim, 2) / dim)` computed in float32 as torch does.
pub fn create_sinusoidal_positions(num_pos: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / 10000f32.powf(i as f32 / dim as f32))
        .collect();
    let half = inv_freq.len();
    let mut data = Vec::with_capacity(num_pos * half * 2);
    for p in 0..num_pos {
        let inp: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        data.extend(inp.iter().map(|x| x.sin()));
        data.extend(inp.iter().map(|x| x.cos()));
    }
    Tensor::from_vec(data, (num_pos, half * 2), device)
}

/// `GPTJRotaryEmbedding`: looks up the sinusoid table at the positions.
pub struct GPTJRotaryEmbedding {
    /// [max_positions, rotary_dim], float32.
    embed_positions: Tensor,
    max_positions: usize,
    scope: Scope,
}

#[hooked]
impl GPTJRotaryEmbedding {
    /// (sin, cos), each [B, T, rotary_dim / 2] in `x`'s dtype, for `position_ids` [B, T].
    pub fn forward(&self, x: &Tensor, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = position_ids.dims2()?;
        let position_ids = position_ids.flatten_all()?;
        // Checked here so that an out-of-table position is an error naming the limit.
        let positions = position_ids.to_dtype(DType::I64)?;
        for p in positions.to_vec1::<i64>()? {
            if p < 0 || p as usize >= self.max_positions {
                candle_core::bail!(
                    "position {p} requested but the model's sinusoid table has {} rows (n_positions)",
                    self.max_positions
                );
            }
        }
        let sincos = self.embed_positions.index_select(&position_ids, 0)?;
        let sincos = sincos.reshape((b, t, ()))?.to_dtype(x.dtype())?;
        let half = sincos.dim(D::Minus1)? / 2;
        let sin = sincos.narrow(D::Minus1, 0, half)?;
        let cos = sincos.narrow(D::Minus1, half, half)?;
        Ok((sin, cos))
    }
}

/// Interleaved rotation: pairs (x[2i], x[2i+1]) become (-x[2i+1], x[2i]).
#[hooked]
pub fn rotate_every_two(x: &Tensor) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let xp = x.reshape((b, t, h, d / 2, 2))?;
    let x1 = xp.narrow(D::Minus1, 0, 1)?;
    let x2 = xp.narrow(D::Minus1, 1, 1)?;
    let x = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.reshape((b, t, h, d))
}

/// Rotary embedding on `tensor` [B, T, H, rotary_dim]; sin and cos are [B, T, rotary_dim / 2], each
/// entry repeated twice (`repeat_interleave`) to line up with the interleaved pairs.
#[hooked]
pub fn apply_rotary_pos_emb(tensor: &Tensor, sin: &Tensor, cos: &Tensor) -> Result<Tensor> {
    let sin = repeat_interleave2(&sin.unsqueeze(2)?)?;
    let cos = repeat_interleave2(&cos.unsqueeze(2)?)?;
    tensor.broadcast_mul(&cos)? + rotate_every_two(tensor)?.broadcast_mul(&sin)?
}

/// `torch.repeat_interleave(x, 2, dim=-1)`.
#[hooked]
pub fn repeat_interleave2(x: &Tensor) -> Result<Tensor> {
    Tensor::stack(&[x, x], D::Minus1)?.flatten_from(D::Minus2)
}

/// `GPTJAttention`.
pub struct GPTJAttention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    /// Dropout on the probabilities (the identity at inference; its output is what multiplies V).
    pub attn_dropout: Dropout,
    resid_dropout: Dropout,
    head_dim: usize,
    rotary_dim: usize,
    scaling: f64,
    layer_idx: usize,
    scope: Scope,
}

impl GPTJAttention {
    fn new(cfg: &GPTJConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let e = cfg.n_embd;
        let head_dim = e / cfg.n_head;
        Ok(GPTJAttention {
            k_proj: Linear::new(e, e, false, vb.pp("k_proj"))?,
            v_proj: Linear::new(e, e, false, vb.pp("v_proj"))?,
            q_proj: Linear::new(e, e, false, vb.pp("q_proj"))?,
            out_proj: Linear::new(e, e, false, vb.pp("out_proj"))?,
            attn_dropout: Dropout::new(cfg.attn_pdrop, vb.pp("attn_dropout")),
            resid_dropout: Dropout::new(cfg.resid_pdrop, vb.pp("resid_dropout")),
            head_dim,
            rotary_dim: cfg.rotary_dim,
            scaling: (head_dim as f64).powf(-0.5),
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl GPTJAttention {
    /// Scores in float32, softmax, `attn_dropout`, times V: (output [B, H, T, D], probabilities).
    fn _attn(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        // Keep the attention weights computation in fp32 to avoid overflow issues.
        let query = query.to_dtype(DType::F32)?;
        let key = key.to_dtype(DType::F32)?;
        let mut attn_weights = nn::ops::scale(
            &query.matmul(&key.transpose(D::Minus1, D::Minus2)?)?,
            self.scaling,
        )?;
        if let Some(mask) = attention_mask {
            attn_weights = nn::ops::add(&attn_weights, &mask.to_dtype(DType::F32)?)?;
        }
        let attn_weights = nn::functional::softmax(&attn_weights, D::Minus1)?;
        let attn_weights = attn_weights.to_dtype(value.dtype())?;
        let attn_weights = self.attn_dropout.forward(&attn_weights)?;
        let attn_output = attn_weights.matmul(value)?;
        Ok((attn_output, attn_weights))
    }

    /// Self-attention over `hidden_states` [B, T, n_embd]; `position_embeddings` is (sin, cos).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        position_embeddings: &(Tensor, Tensor),
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = hidden_states.dims3()?;
        let hidden_shape = (b, t, (), self.head_dim);
        let query = self.q_proj.forward(hidden_states)?.reshape(hidden_shape)?;
        let key = self.k_proj.forward(hidden_states)?.reshape(hidden_shape)?;
        let value = self
            .v_proj
            .forward(hidden_states)?
            .reshape(hidden_shape)?
            .transpose(1, 2)?;

        let (sin, cos) = position_embeddings;
        // transformers 5 always takes its `rotary_dim is not None` branch: rotate the first
        // `rotary_dim` dimensions, pass the rest (possibly none) through.
        let rd = self.rotary_dim;
        let pass = self.head_dim - rd;
        let k_rot = key.narrow(D::Minus1, 0, rd)?;
        let k_pass = key.narrow(D::Minus1, rd, pass)?;

        let q_rot = query.narrow(D::Minus1, 0, rd)?;
        let q_pass = query.narrow(D::Minus1, rd, pass)?;

        let k_rot = apply_rotary_pos_emb(&k_rot, sin, cos)?;
        let q_rot = apply_rotary_pos_emb(&q_rot, sin, cos)?;

        let key = Tensor::cat(&[&k_rot, &k_pass], D::Minus1)?;
        let query = Tensor::cat(&[&q_rot, &q_pass], D::Minus1)?;

        let query = query.transpose(1, 2)?.contiguous()?;
        let key = key.transpose(1, 2)?.contiguous()?;
        let value = value.contiguous()?;
        let (key, value) = match past_key_values {
            Some(past_key_values) => past_key_values.update(&key, &value, self.layer_idx)?,
            None => (key, value),
        };

        let (attn_output, _attn_weights) = self._attn(&query, &key, &value, attention_mask)?;
        let attn_output = attn_output.transpose(1, 2)?.contiguous()?;
        let attn_output = attn_output.reshape((b, t, ()))?;
        let attn_output = self.out_proj.forward(&attn_output)?;
        self.resid_dropout.forward(&attn_output)
    }
}

/// `GPTJMLP`: fc_out(act(fc_in(x))).
pub struct GPTJMLP {
    fc_in: Linear,
    fc_out: Linear,
    act: Activation,
    dropout: Dropout,
    scope: Scope,
}

#[hooked]
impl GPTJMLP {
    /// fc_out(act(fc_in(x))).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let hidden_states = self.fc_in.forward(hidden_states)?;
        let hidden_states = self.act.forward(&hidden_states)?;
        let hidden_states = self.fc_out.forward(&hidden_states)?;
        self.dropout.forward(&hidden_states)
    }
}

/// `GPTJBlock`: attention and MLP in parallel on the same `ln_1` output.
pub struct GPTJBlock {
    ln_1: LayerNorm,
    attn: GPTJAttention,
    mlp: GPTJMLP,
    scope: Scope,
}

#[hooked]
impl GPTJBlock {
    /// attn(ln_1(x)) + mlp(ln_1(x)) + x.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        position_embeddings: &(Tensor, Tensor),
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let hidden_states = self.ln_1.forward(hidden_states)?;
        let attn_output = self.attn.forward(
            &hidden_states,
            position_embeddings,
            attention_mask,
            past_key_values,
        )?;
        let feed_forward_hidden_states = self.mlp.forward(&hidden_states)?;
        (attn_output + feed_forward_hidden_states)? + residual
    }
}

/// `GPTJModel`.
pub struct GPTJModel {
    wte: Embedding,
    drop: Dropout,
    h: Vec<GPTJBlock>,
    ln_f: LayerNorm,
    rotary_emb: GPTJRotaryEmbedding,
    scope: Scope,
}

#[hooked]
impl GPTJModel {
    /// Hidden states after `ln_f` [B, T, n_embd].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.wte.forward(input_ids)?;
        let (batch, seq_length) = input_ids.dims2()?;
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch,
            seq_length,
            nn::past_len(past_key_values),
            None,
            inputs_embeds.dtype(),
            inputs_embeds.device(),
        )?;
        let hidden_states = inputs_embeds;
        let mut hidden_states = self.drop.forward(&hidden_states)?;
        let position_embeddings = self.rotary_emb.forward(&hidden_states, position_ids)?;
        for block in self.h.iter() {
            hidden_states = block.forward(
                &hidden_states,
                Some(&causal_mask),
                &position_embeddings,
                past_key_values,
            )?;
        }
        self.ln_f.forward(&hidden_states)
    }
}

/// `GPTJForCausalLM`.
pub struct GPTJForCausalLM {
    transformer: GPTJModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl GPTJForCausalLM {
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

impl CausalLM for GPTJForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        GPTJForCausalLM::forward(
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

/// Builds a GPT-J model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = GPTJConfig::read(config)?;
    let root = vb.clone();
    let vb_t = vb.pp("transformer");
    let wte = Embedding::new(cfg.vocab_size, cfg.n_embd, vb_t.pp("wte"))?;
    let drop = Dropout::new(cfg.embd_pdrop, vb_t.pp("drop"));
    let mut h = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let vb_l = vb_t.pp("h").pp(i);
        let ln_1 = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, true, vb_l.pp("ln_1"))?;
        let attn = GPTJAttention::new(&cfg, i, vb_l.pp("attn"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = GPTJMLP {
            fc_in: Linear::new(cfg.n_embd, cfg.n_inner, true, vb_mlp.pp("fc_in"))?,
            fc_out: Linear::new(cfg.n_inner, cfg.n_embd, true, vb_mlp.pp("fc_out"))?,
            act: cfg.activation_function,
            dropout: Dropout::new(cfg.resid_pdrop, vb_mlp.pp("dropout")),
            scope: vb_mlp.scope::<GPTJMLP>(),
        };
        h.push(GPTJBlock {
            ln_1,
            attn,
            mlp,
            scope: vb_l.scope::<GPTJBlock>(),
        });
    }
    let ln_f = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, true, vb_t.pp("ln_f"))?;
    // The table is float32 whatever the compute dtype, as transformers' buffer is; the forward casts.
    let vb_rot = vb_t.pp("rotary_emb");
    let rotary_emb = GPTJRotaryEmbedding {
        embed_positions: create_sinusoidal_positions(cfg.n_positions, cfg.rotary_dim, vb.device())?,
        max_positions: cfg.n_positions,
        scope: vb_rot.scope::<GPTJRotaryEmbedding>(),
    };
    let transformer = GPTJModel {
        wte,
        drop,
        h,
        ln_f,
        rotary_emb,
        scope: vb_t.scope::<GPTJModel>(),
    };
    let vb_head = root.pp("lm_head");
    let lm_head = if cfg.tie_word_embeddings || !vb_head.contains("weight") {
        // Tied: the weight is the embedding matrix; the bias is lm_head's own (zero when the
        // checkpoint has none, as transformers initialises a missing Linear bias).
        let bias = if vb_head.contains("bias") {
            vb_head.get(cfg.vocab_size, "bias")?
        } else {
            Tensor::zeros(cfg.vocab_size, vb.dtype(), vb.device())?
        };
        Linear::from_weights(transformer.wte.weight.clone(), Some(bias), &vb_head)
    } else {
        Linear::new(cfg.n_embd, cfg.vocab_size, true, vb_head)?
    };
    Ok(Box::new(GPTJForCausalLM {
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
        scope: root.scope::<GPTJForCausalLM>(),
    }))
}
