//! Falcon (`falcon`), porting transformers' `modeling_falcon.py` (5.24): Falcon-7B (multi-query,
//! parallel attention + MLP), Falcon-RW (ALiBi, sequential residual), Falcon-40B/180B
//! (`new_decoder_architecture`: grouped key/value heads, `ln_attn` + `ln_mlp` or one norm).
//!
//! The fused `query_key_value` projection has one layout per variant (see
//! [`FalconAttention::_split_heads`]). The eager attention has two branches, kept as in Python:
//! - rotary (`alibi: false`): the probabilities are the output of the softmax, `F_softmax_0` (no
//!   dropout is applied to them), the registry's path;
//! - ALiBi: the probabilities go through the `attention_dropout` module, whose output
//!   (`self_attention_dropout_0`) is the path this model reports for that configuration.
//!
//! As in transformers, the ALiBi bias is built in bfloat16 from the mask's positions, added to the
//! scores before scaling, and also folded (divided by sqrt(head size)) into the additive mask.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::functional as F;
use crate::nn::rope::{self, apply_rotary_pos_emb};
use crate::nn::{self, mask, Activation, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Device, Result, Tensor, D};

/// The configuration of a Falcon model, as transformers' `FalconConfig` reads it.
#[derive(Debug, Clone)]
pub struct FalconConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size (`hidden_size`, or the legacy `n_embed`).
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads of `new_decoder_architecture` (defaults to the query heads).
    pub num_kv_heads: usize,
    /// Norms before the parallel attention and MLP of `new_decoder_architecture` (1 or 2).
    pub num_ln_in_parallel_attn: Option<usize>,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Residual dropout (the identity at inference).
    pub hidden_dropout: f64,
    /// Attention dropout (the identity at inference).
    pub attention_dropout: f64,
    /// ALiBi instead of rotary embeddings.
    pub alibi: bool,
    /// Falcon-40B's layout: grouped key/value heads in the fused projection.
    pub new_decoder_architecture: bool,
    /// One key/value head (old layout only).
    pub multi_query: bool,
    /// Attention and MLP read the same input and join the residual together.
    pub parallel_attn: bool,
    /// Biases on the linear layers.
    pub bias: bool,
    /// MLP width (4 x hidden by default).
    pub ffn_hidden_size: usize,
    /// MLP activation (`gelu`).
    pub activation: Activation,
    /// lm_head shares the embedding matrix (true by default).
    pub tie_word_embeddings: bool,
    /// RoPE parameters (used when `alibi` is false).
    pub rope: rope::RopeParams,
}

impl FalconConfig {
    /// Reads the keys `FalconConfig` reads, with its defaults and its `__post_init__`.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        let hidden_size = match cfg.opt_usize("n_embed")? {
            Some(n) => n,
            None => cfg.usize_or("hidden_size", 4544)?,
        };
        let num_attention_heads = cfg.usize_or("num_attention_heads", 71)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(cfg.error(format!("hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"),
            ));
        }
        let num_kv_heads = cfg
            .opt_usize("num_kv_heads")?
            .unwrap_or(num_attention_heads);
        let new_decoder_architecture = cfg.bool_or("new_decoder_architecture", false)?;
        let multi_query = cfg.bool_or("multi_query", true)?;
        let parallel_attn = cfg.bool_or("parallel_attn", true)?;
        let mut num_ln_in_parallel_attn = cfg.opt_usize("num_ln_in_parallel_attn")?;
        if new_decoder_architecture {
            if num_kv_heads == 0 || num_attention_heads % num_kv_heads != 0 {
                return Err(cfg.error(format!(
                        "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
                    ),
                ));
            }
            // FalconDecoderLayer: `num_ln_in_parallel_attn` defaults to 2 with the new layout.
            let n = *num_ln_in_parallel_attn.get_or_insert(2);
            if !parallel_attn {
                return Err(cfg.error("new_decoder_architecture needs parallel_attn (transformers' decoder layer has no sequential path for it)",
                ));
            }
            if n != 1 && n != 2 {
                return Err(cfg.error(format!("num_ln_in_parallel_attn must be 1 or 2, found {n}")));
            }
        } else {
            if !multi_query && num_kv_heads != num_attention_heads {
                return Err(cfg.error(format!(
                        "num_kv_heads ({num_kv_heads}) must equal num_attention_heads ({num_attention_heads}) without multi_query or new_decoder_architecture"
                    ),
                ));
            }
            if parallel_attn && num_ln_in_parallel_attn == Some(2) {
                return Err(cfg.error("num_ln_in_parallel_attn 2 needs new_decoder_architecture (transformers' decoder layer reads input_layernorm otherwise)",
                ));
            }
        }
        let act_name = cfg.str_or("activation", "gelu")?;
        let activation = Activation::from_name(act_name).ok_or_else(|| {
            cfg.error(format!(
                "activation `{act_name}` is not supported; supported: {}",
                nn::ACTIVATION_NAMES_LIST.join(", ")
            ))
        })?;
        let mut rope = rope::RopeParams::from_config(cfg, 10000.0, 2048)?;
        // Falcon's default RoPE rotates the whole head.
        if rope.rope_type == "default" {
            rope.partial_rotary_factor = 1.0;
        }
        Ok(FalconConfig {
            vocab_size: cfg.usize_or("vocab_size", 65024)?,
            hidden_size,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_kv_heads,
            num_ln_in_parallel_attn,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            hidden_dropout: cfg.f64_or("hidden_dropout", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            alibi: cfg.bool_or("alibi", false)?,
            new_decoder_architecture,
            multi_query,
            parallel_attn,
            bias: cfg.bool_or("bias", false)?,
            ffn_hidden_size: cfg.opt_usize("ffn_hidden_size")?.unwrap_or(4 * hidden_size),
            activation,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
            rope,
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The ALiBi slopes of `num_heads` heads, in float32 (as `build_alibi_tensor` computes them).
fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    let closest_power_of_2 = 1usize << (num_heads as f64).log2().floor() as u32;
    let base = 2f32.powf(-(2f32.powf(-((closest_power_of_2 as f32).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest_power_of_2)
        .map(|p| base.powf(p as f32))
        .collect();
    if closest_power_of_2 != num_heads {
        let extra_base = 2f32.powf(-(2f32.powf(-((2.0 * closest_power_of_2 as f32).log2() - 3.0))));
        let num_remaining_heads = closest_power_of_2.min(num_heads - closest_power_of_2);
        slopes.extend(
            (1..=2 * num_remaining_heads)
                .step_by(2)
                .map(|p| extra_base.powf(p as f32)),
        );
    }
    slopes
}

/// `(cumsum(mask) - 1) * mask` of each row, flattened.
fn alibi_positions(rows: &[Vec<i64>]) -> Vec<f32> {
    let mut positions = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.len()));
    for row in rows {
        let mut cum = 0i64;
        for m in row {
            cum += m;
            positions.push(((cum - 1) * m) as f32);
        }
    }
    positions
}

/// `build_alibi_tensor`: [B * H, 1, K] with `bf16(slope[h]) * ((cumsum(mask) - 1) * mask)[b, k]`,
/// the product rounded to bfloat16 as transformers computes it, then cast to `dtype`.
#[hooked]
pub fn build_alibi_tensor(
    attention_mask: &Tensor,
    num_heads: usize,
    dtype: DType,
) -> Result<Tensor> {
    let (batch_size, seq_length) = attention_mask.dims2()?;
    let device = attention_mask.device();
    let slopes = alibi_slopes(num_heads);
    let rows = attention_mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let positions = alibi_positions(&rows);
    let arange_tensor = Tensor::from_vec(positions, (batch_size, 1, seq_length), device)?;
    let slopes = Tensor::from_vec(slopes, (num_heads, 1), device)?;
    let alibi = slopes
        .to_dtype(DType::BF16)?
        .broadcast_mul(&arange_tensor.to_dtype(DType::BF16)?)?;
    alibi
        .reshape((batch_size * num_heads, 1, seq_length))?
        .to_dtype(dtype)
}

/// `dropout_add`: residual + dropout(x) (the dropout is the identity at inference).
#[hooked]
pub fn dropout_add(x: &Tensor, residual: &Tensor, prob: f64) -> Result<Tensor> {
    let out = F::dropout(x, prob)?;
    residual + out
}

/// `FalconAttention`.
pub struct FalconAttention {
    query_key_value: Linear,
    dense: Linear,
    /// Dropout on the ALiBi branch's probabilities (the identity at inference; its output is what
    /// multiplies V there).
    pub attention_dropout: Dropout,
    num_heads: usize,
    head_dim: usize,
    inv_norm_factor: f64,
    new_decoder_architecture: bool,
    multi_query: bool,
    num_kv_heads: usize,
    layer_idx: usize,
    scope: Scope,
}

impl FalconAttention {
    fn new(cfg: &FalconConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let hd = cfg.head_dim();
        let qkv_out_dim = if cfg.new_decoder_architecture {
            (cfg.num_kv_heads * 2 + nh) * hd
        } else if cfg.multi_query {
            h + 2 * hd
        } else {
            3 * h
        };
        Ok(FalconAttention {
            query_key_value: Linear::new(h, qkv_out_dim, cfg.bias, vb.pp("query_key_value"))?,
            dense: Linear::new(h, h, cfg.bias, vb.pp("dense"))?,
            attention_dropout: Dropout::new(cfg.attention_dropout, vb.pp("attention_dropout")),
            num_heads: nh,
            head_dim: hd,
            inv_norm_factor: 1.0 / (hd as f64).sqrt(),
            new_decoder_architecture: cfg.new_decoder_architecture,
            multi_query: cfg.multi_query,
            num_kv_heads: if cfg.new_decoder_architecture || !cfg.multi_query {
                cfg.num_kv_heads
            } else {
                1
            },
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl FalconAttention {
    /// Splits the fused projection [B, T, out] into query [B, T, H, D] and key, value ([B, T, H, D]
    /// with the new layout, whose key/value heads are broadcast to the query heads; [B, T, 1, D]
    /// with multi-query; [B, T, H, D] otherwise).
    fn _split_heads(&self, fused_qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if self.new_decoder_architecture {
            let (batch, seq_len, _) = fused_qkv.dims3()?;
            let groups = self.num_heads / self.num_kv_heads;
            let qkv = fused_qkv.reshape((batch, seq_len, (), groups + 2, self.head_dim))?;
            let query = qkv.narrow(3, 0, groups)?;
            let key = qkv.narrow(3, groups, 1)?;
            let value = qkv.narrow(3, groups + 1, 1)?;
            let key = key.broadcast_as(query.shape())?;
            let value = value.broadcast_as(query.shape())?;
            let shape = (batch, seq_len, self.num_heads, self.head_dim);
            Ok((
                query.reshape(shape)?,
                key.contiguous()?.reshape(shape)?,
                value.contiguous()?.reshape(shape)?,
            ))
        } else if !self.multi_query {
            let (batch_size, seq_length, _three_times_hidden_size) = fused_qkv.dims3()?;
            let fused_qkv =
                fused_qkv.reshape((batch_size, seq_length, self.num_heads, 3, self.head_dim))?;
            Ok((
                fused_qkv.narrow(3, 0, 1)?.squeeze(3)?,
                fused_qkv.narrow(3, 1, 1)?.squeeze(3)?,
                fused_qkv.narrow(3, 2, 1)?.squeeze(3)?,
            ))
        } else {
            let (batch_size, seq_length, _three_times_hidden_size) = fused_qkv.dims3()?;
            let fused_qkv =
                fused_qkv.reshape((batch_size, seq_length, self.num_heads + 2, self.head_dim))?;
            Ok((
                fused_qkv.narrow(2, 0, self.num_heads)?,
                fused_qkv.narrow(2, self.num_heads, 1)?,
                fused_qkv.narrow(2, self.num_heads + 1, 1)?,
            ))
        }
    }

    /// [B * H, T, D] -> [B, T, H * D].
    fn _merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch_size_and_num_heads, seq_length, _) = x.dims3()?;
        let batch_size = batch_size_and_num_heads / self.num_heads;
        let x = x.reshape((batch_size, self.num_heads, seq_length, self.head_dim))?;
        let x = x.permute((0, 2, 1, 3))?;
        x.contiguous()?
            .reshape((batch_size, seq_length, self.num_heads * self.head_dim))
    }

    /// Self-attention over `hidden_states` [B, T, hidden]: rotary (`alibi` is `None`) or ALiBi.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        alibi: Option<&Tensor>,
        attention_mask: &Tensor,
        layer_past: Option<&KvCache>,
        position_embeddings: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let fused_qkv = self.query_key_value.forward(hidden_states)?;
        let num_kv_heads = if self.new_decoder_architecture {
            self.num_heads
        } else {
            self.num_kv_heads
        };
        let (query_layer, key_layer, value_layer) = self._split_heads(&fused_qkv)?;
        let (batch_size, query_length, _, _) = query_layer.dims4()?;
        let query_layer = query_layer.transpose(1, 2)?.contiguous()?.reshape((
            batch_size,
            self.num_heads,
            query_length,
            self.head_dim,
        ))?;
        let key_layer = key_layer.transpose(1, 2)?.contiguous()?.reshape((
            batch_size,
            num_kv_heads,
            query_length,
            self.head_dim,
        ))?;
        let value_layer = value_layer.transpose(1, 2)?.contiguous()?.reshape((
            batch_size,
            num_kv_heads,
            query_length,
            self.head_dim,
        ))?;

        let (query_layer, key_layer) = match alibi {
            None => {
                let (cos, sin) = position_embeddings;
                apply_rotary_pos_emb(&query_layer, &key_layer, cos, sin)?
            }
            Some(_) => (query_layer, key_layer),
        };

        let (key_layer, value_layer) = match layer_past {
            Some(layer_past) => layer_past.update(&key_layer, &value_layer, self.layer_idx)?,
            None => (key_layer, value_layer),
        };
        let kv_length = key_layer.dim(D::Minus2)?;
        let dtype = hidden_states.dtype();

        match alibi {
            None => {
                let attention_scores = query_layer
                    .contiguous()?
                    .broadcast_matmul(&key_layer.transpose(D::Minus1, D::Minus2)?)?;
                let attention_scores = (attention_scores / (self.head_dim as f64).sqrt())?;
                // No dropout on this branch: the softmax's output multiplies V.
                let attention_scores = F::softmax(
                    &attention_scores
                        .broadcast_add(attention_mask)?
                        .to_dtype(dtype)?,
                    D::Minus1,
                )?;
                let attn_output = attention_scores.broadcast_matmul(&value_layer.contiguous()?)?;
                let attn_output = attn_output.reshape((
                    batch_size,
                    self.num_heads,
                    query_length,
                    self.head_dim,
                ))?;
                let attn_output = attn_output.permute((0, 2, 1, 3))?.contiguous()?;
                let attn_output = attn_output.reshape((
                    batch_size,
                    query_length,
                    self.num_heads * self.head_dim,
                ))?;
                self.dense.forward(&attn_output)
            }
            Some(alibi) => {
                let matmul_result = query_layer
                    .contiguous()?
                    .broadcast_matmul(&key_layer.transpose(D::Minus1, D::Minus2)?)?;
                let attention_scores =
                    matmul_result.reshape((batch_size, self.num_heads, query_length, kv_length))?;
                let input_dtype = attention_scores.dtype();
                let attention_scores = if input_dtype == DType::F16 || input_dtype == DType::BF16 {
                    attention_scores.to_dtype(DType::F32)?
                } else {
                    attention_scores
                };
                let attention_logits = attention_scores.broadcast_add(
                    &alibi
                        .reshape((batch_size, self.num_heads, 1, ()))?
                        .to_dtype(attention_scores.dtype())?,
                )?;
                let attention_logits = (attention_logits * self.inv_norm_factor)?;
                let attention_probs = F::softmax(
                    &attention_logits
                        .broadcast_add(&attention_mask.to_dtype(attention_logits.dtype())?)?
                        .to_dtype(dtype)?,
                    D::Minus1,
                )?;
                let attention_probs = self.attention_dropout.forward(&attention_probs)?;
                let attention_probs_reshaped = attention_probs.reshape((
                    batch_size,
                    self.num_heads,
                    query_length,
                    kv_length,
                ))?;
                let attn_output = attention_probs_reshaped
                    .broadcast_matmul(&value_layer.contiguous()?)?
                    .flatten(0, 1)?;
                let attn_output = self._merge_heads(&attn_output)?;
                self.dense.forward(&attn_output)
            }
        }
    }
}

/// `FalconMLP`: dense_4h_to_h(act(dense_h_to_4h(x))).
pub struct FalconMLP {
    dense_h_to_4h: Linear,
    act: Activation,
    dense_4h_to_h: Linear,
    scope: Scope,
}

#[hooked]
impl FalconMLP {
    /// dense_4h_to_h(act(dense_h_to_4h(x))).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.act.forward(&self.dense_h_to_4h.forward(x)?)?;
        self.dense_4h_to_h.forward(&x)
    }
}

/// `FalconDecoderLayer`.
pub struct FalconDecoderLayer {
    self_attention: FalconAttention,
    mlp: FalconMLP,
    /// `input_layernorm` (and `post_attention_layernorm` without `parallel_attn`), or
    /// `ln_attn` + `ln_mlp` with two norms in parallel.
    input_layernorm: Option<LayerNorm>,
    post_attention_layernorm: Option<LayerNorm>,
    ln_attn: Option<LayerNorm>,
    ln_mlp: Option<LayerNorm>,
    new_decoder_architecture: bool,
    parallel_attn: bool,
    num_ln_in_parallel_attn: Option<usize>,
    attention_dropout: f64,
    hidden_dropout: f64,
    scope: Scope,
}

#[hooked]
impl FalconDecoderLayer {
    /// Parallel (`x + attn(ln(x)) + mlp(ln'(x))`) or sequential residual block.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        alibi: Option<&Tensor>,
        attention_mask: &Tensor,
        layer_past: Option<&KvCache>,
        position_embeddings: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let mut residual = hidden_states.clone();
        let two_norms = self.new_decoder_architecture && self.num_ln_in_parallel_attn == Some(2);
        let (attention_layernorm_out, mut mlp_layernorm_out) =
            match (&self.ln_attn, &self.ln_mlp, &self.input_layernorm) {
                (Some(ln_attn), Some(ln_mlp), _) if two_norms => (
                    ln_attn.forward(hidden_states)?,
                    Some(ln_mlp.forward(hidden_states)?),
                ),
                (_, _, Some(input_layernorm)) => (input_layernorm.forward(hidden_states)?, None),
                _ => candle_core::bail!("falcon decoder layer without its layer norms"),
            };

        let attention_output = self.self_attention.forward(
            &attention_layernorm_out,
            alibi,
            attention_mask,
            layer_past,
            position_embeddings,
        )?;

        if !self.new_decoder_architecture {
            if self.parallel_attn {
                mlp_layernorm_out = Some(attention_layernorm_out.clone());
            } else if let Some(post_attention_layernorm) = &self.post_attention_layernorm {
                residual = dropout_add(&attention_output, &residual, self.attention_dropout)?;
                mlp_layernorm_out = Some(post_attention_layernorm.forward(&residual)?);
            }
        }
        if self.new_decoder_architecture
            && self.parallel_attn
            && self.num_ln_in_parallel_attn == Some(1)
        {
            mlp_layernorm_out = Some(attention_layernorm_out.clone());
        }
        let Some(mlp_layernorm_out) = mlp_layernorm_out else {
            candle_core::bail!("falcon decoder layer: no input for the MLP");
        };

        let mut mlp_output = self.mlp.forward(&mlp_layernorm_out)?;
        if self.new_decoder_architecture || self.parallel_attn {
            mlp_output = (mlp_output + attention_output)?;
        }
        dropout_add(&mlp_output, &residual, self.hidden_dropout)
    }
}

/// `FalconModel` (`transformer`): embeddings, layers and the final LayerNorm.
pub struct FalconModel {
    word_embeddings: Embedding,
    h: Vec<FalconDecoderLayer>,
    ln_f: LayerNorm,
    rotary_emb: rope::RotaryEmbedding,
    use_alibi: bool,
    num_heads: usize,
    head_dim: usize,
    scope: Scope,
}

#[hooked]
impl FalconModel {
    /// Hidden states after `ln_f` [B, T, hidden].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&KvCache>,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let inputs_embeds = self.word_embeddings.forward(input_ids)?;
        let cache_length = nn::past_len(cache);
        let (batch_size, seq_length, _) = inputs_embeds.dims3()?;
        let (dtype, device): (DType, Device) =
            (inputs_embeds.dtype(), inputs_embeds.device().clone());
        let alibi = if self.use_alibi {
            let mask = match attention_mask {
                Some(m) => m.clone(),
                None => Tensor::ones((batch_size, seq_length + cache_length), DType::I64, &device)?,
            };
            Some(build_alibi_tensor(&mask, self.num_heads, dtype)?)
        } else {
            None
        };
        let causal_mask = mask::causal_mask(
            attention_mask,
            batch_size,
            seq_length,
            cache_length,
            None,
            dtype,
            &device,
        )?;
        let causal_mask = match &alibi {
            Some(alibi) => {
                // The mask becomes alibi / sqrt(head size) where a key is visible, the minimum
                // elsewhere: [B, H, Q, K].
                let min_dtype = mask::min_value(dtype);
                let alibi = alibi.reshape((batch_size, (), 1, seq_length + cache_length))?;
                let shape = (
                    batch_size,
                    self.num_heads,
                    seq_length,
                    seq_length + cache_length,
                );
                let scaled = (alibi / (self.head_dim as f64).sqrt())?.broadcast_as(shape)?;
                let hidden = causal_mask.lt(-1.0)?.broadcast_as(shape)?;
                let fill = Tensor::full(min_dtype, shape, &device)?.to_dtype(dtype)?;
                hidden.where_cond(&fill, &scaled)?
            }
            None => causal_mask,
        };

        let mut hidden_states = inputs_embeds;
        let position_embeddings = self.rotary_emb.cos_sin(position_ids, dtype, &device)?;
        for block in self.h.iter() {
            hidden_states = block.forward(
                &hidden_states,
                alibi.as_ref(),
                &causal_mask,
                cache,
                &position_embeddings,
            )?;
        }
        self.ln_f.forward(&hidden_states)
    }
}

/// `FalconForCausalLM`: the model and its output head.
pub struct FalconForCausalLM {
    transformer: FalconModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl FalconForCausalLM {
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

impl CausalLM for FalconForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        FalconForCausalLM::forward(
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

    fn attention_probabilities(&self) -> Option<&'static str> {
        // The ALiBi branch passes its probabilities through the `attention_dropout` module.
        self.transformer
            .use_alibi
            .then_some("source.self_attention_dropout_0")
    }
}

/// Builds a Falcon model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = FalconConfig::read(config)?;
    let root = vb.clone();
    let vb_t = vb.pp("transformer");
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
    let word_embeddings = Embedding::new(cfg.vocab_size, h, vb_t.pp("word_embeddings"))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let vb_l = vb_t.pp("h").pp(i);
        let self_attention = FalconAttention::new(&cfg, i, vb_l.pp("self_attention"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = FalconMLP {
            dense_h_to_4h: Linear::new(
                h,
                cfg.ffn_hidden_size,
                cfg.bias,
                vb_mlp.pp("dense_h_to_4h"),
            )?,
            act: cfg.activation,
            dense_4h_to_h: Linear::new(
                cfg.ffn_hidden_size,
                h,
                cfg.bias,
                vb_mlp.pp("dense_4h_to_h"),
            )?,
            scope: vb_mlp.scope::<FalconMLP>(),
        };
        let ln = |name: &str| LayerNorm::new(h, eps, true, vb_l.pp(name));
        let (input_layernorm, post_attention_layernorm, ln_attn, ln_mlp) = if !cfg.parallel_attn {
            (
                Some(ln("input_layernorm")?),
                Some(ln("post_attention_layernorm")?),
                None,
                None,
            )
        } else if cfg.num_ln_in_parallel_attn == Some(2) {
            (None, None, Some(ln("ln_attn")?), Some(ln("ln_mlp")?))
        } else {
            (Some(ln("input_layernorm")?), None, None, None)
        };
        layers.push(FalconDecoderLayer {
            self_attention,
            mlp,
            input_layernorm,
            post_attention_layernorm,
            ln_attn,
            ln_mlp,
            new_decoder_architecture: cfg.new_decoder_architecture,
            parallel_attn: cfg.parallel_attn,
            num_ln_in_parallel_attn: cfg.num_ln_in_parallel_attn,
            attention_dropout: cfg.attention_dropout,
            hidden_dropout: cfg.hidden_dropout,
            scope: vb_l.scope::<FalconDecoderLayer>(),
        });
    }
    let rotary_emb = rope::RotaryEmbedding::new(cfg.rope.clone(), cfg.head_dim())?;
    let transformer = FalconModel {
        word_embeddings,
        h: layers,
        ln_f: LayerNorm::new(h, eps, true, vb_t.pp("ln_f"))?,
        rotary_emb,
        use_alibi: cfg.alibi,
        num_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim(),
        scope: vb_t.scope::<FalconModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_weights(
            transformer.word_embeddings.weight.clone(),
            None,
            &root.pp("lm_head"),
        )
    } else {
        Linear::new(h, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    // The key/value heads the attention uses (and the cache holds): the new decoder architecture
    // broadcasts its `num_kv_heads` to every query head inside `_split_heads`, as transformers does.
    let kv_heads = if cfg.new_decoder_architecture {
        cfg.num_attention_heads
    } else if cfg.multi_query {
        1
    } else {
        cfg.num_attention_heads
    };
    Ok(Box::new(FalconForCausalLM {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads,
            head_dim: cfg.head_dim(),
            hidden: h,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<FalconForCausalLM>(),
    }))
}
