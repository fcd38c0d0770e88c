//! BLOOM, porting transformers' `modeling_bloom.py`.
//!
//! ALiBi is built from the attention mask (`build_alibi_tensor`: positions are the cumulative sum of
//! the mask, so left padding shifts them), added to the scores through `baddbmm` (`beta = 1`,
//! `alpha = 1 / sqrt(head_dim)`). The fused `query_key_value` projection is laid out per head as
//! [B, T, H, 3, D]. The attention probabilities are the output of the module dropout
//! `self.attention_dropout`, the seed's `attentions.L.source.self_attention_dropout_0`.

use super::{CausalLM, Dims};
use crate::config::Config;
use crate::nn::{self, mask, Builder, Dropout, Embedding, KvCache, LayerNorm, Linear};
use crate::trace::{hooked, Scope};
use candle_core::{DType, Device, Result, Tensor, D};

/// `torch.nn.functional` as the Bloom file imports it (`from torch.nn import functional as F`), with
/// the one function it calls that `nn::functional` lacks, `F.linear` (the tensor-parallel slices).
#[allow(non_snake_case)]
mod F {
    pub use crate::nn::functional::*;
    use candle_core::{Result, Tensor};

    /// `F.linear(x, w, b)`: x w^T (+ b).
    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let w = weight.contiguous()?;
        let y = x.contiguous()?.broadcast_matmul(&w.t()?)?;
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The configuration of a BLOOM model, as transformers' `BloomConfig` reads it.
#[derive(Debug, Clone)]
pub struct BloomConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size (`n_embed` in old checkpoints).
    pub hidden_size: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// The residuals are the LayerNorm outputs instead of the LayerNorm inputs.
    pub apply_residual_connection_post_layernorm: bool,
    /// Dropout after attention and MLP (the identity at inference).
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities (the identity at inference).
    pub attention_dropout: f64,
    /// Tensor-parallel degree used in pretraining: with `slow_but_exact`, `dense` and
    /// `dense_4h_to_h` are computed as sums over this many column slices.
    pub pretraining_tp: usize,
    /// Compute the two output projections slice by slice (see `pretraining_tp`).
    pub slow_but_exact: bool,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl BloomConfig {
    /// Reads the keys `BloomConfig` reads, with its defaults.
    pub fn read(cfg: &Config) -> crate::Result<Self> {
        // `n_embed` (old checkpoints) overrides `hidden_size`, as in `BloomConfig.__post_init__`.
        let hidden_size = cfg.usize_alias_or(&["n_embed", "hidden_size"], 64)?;
        let n_head = cfg.usize_alias_or(&["n_head", "num_attention_heads"], 8)?;
        if n_head == 0 || hidden_size % n_head != 0 {
            return Err(crate::Error::Config {
                path: cfg.path.clone(),
                msg: format!("hidden_size ({hidden_size}) must be divisible by n_head ({n_head})"),
            });
        }
        let pretraining_tp = cfg.usize_or("pretraining_tp", 1)?;
        if pretraining_tp == 0 {
            return Err(crate::Error::Config {
                path: cfg.path.clone(),
                msg: "`pretraining_tp` must be at least 1".into(),
            });
        }
        Ok(BloomConfig {
            vocab_size: cfg.usize(&["vocab_size"])?,
            hidden_size,
            n_layer: cfg.usize_alias_or(&["n_layer", "num_hidden_layers"], 2)?,
            n_head,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
            apply_residual_connection_post_layernorm: cfg
                .bool_or("apply_residual_connection_post_layernorm", false)?,
            hidden_dropout: cfg.f64_or("hidden_dropout", 0.0)?,
            attention_dropout: cfg.f64_or("attention_dropout", 0.0)?,
            pretraining_tp,
            slow_but_exact: cfg.bool_or("slow_but_exact", false)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", true)?,
        })
    }
}

/// `_get_alibi_slopes`: one slope per head, in float32 (geometric in the closest power of two, then
/// interleaved extra slopes for the remaining heads).
pub fn _get_alibi_slopes(num_heads: usize) -> Vec<f32> {
    let closest_power_of_2 = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((closest_power_of_2 as f64).log2() - 3.0)))) as f32;
    let mut slopes: Vec<f32> = (1..=closest_power_of_2)
        .map(|p| base.powf(p as f32))
        .collect();
    if closest_power_of_2 != num_heads {
        let extra_base =
            2f64.powf(-(2f64.powf(-((2.0 * closest_power_of_2 as f64).log2() - 3.0)))) as f32;
        let num_remaining_heads = closest_power_of_2.min(num_heads - closest_power_of_2);
        slopes.extend(
            (1..1 + 2 * num_remaining_heads)
                .step_by(2)
                .map(|p| extra_base.powf(p as f32)),
        );
    }
    slopes
}

/// `build_alibi_tensor`: [B * H, 1, K] with `slope[h] * ((cumsum(mask) - 1) * mask)[b, k]` over the
/// K = past + T keys of the [B, past + T] mask; without a mask the positions are 0..K for every row
/// (transformers' no-padding path). ALiBi depends only on the key, so every query row (the new
/// tokens of a cached step included) shares it.
#[hooked]
pub fn build_alibi_tensor(
    attention_mask: Option<&Tensor>,
    batch_size: usize,
    seq_length: usize,
    num_heads: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let slopes = _get_alibi_slopes(num_heads);
    let rows: Vec<Vec<i64>> = match attention_mask {
        Some(m) => {
            let (b, k) = m.dims2()?;
            if b != batch_size || k != seq_length {
                candle_core::bail!(
                    "attention mask has shape [{b}, {k}], expected [{batch_size}, {seq_length}] (batch, past + new tokens)"
                );
            }
            m.to_dtype(DType::I64)?.to_vec2::<i64>()?
        }
        None => vec![vec![1; seq_length]; batch_size],
    };
    let data = alibi_values(&rows, &slopes);
    Tensor::from_vec(data, (batch_size * num_heads, 1, seq_length), device)?.to_dtype(dtype)
}

/// Row-major [B, H, T] values `slope[h] * ((cumsum(mask[b]) - 1) * mask[b])`, each product taken in
/// float32 as torch does.
fn alibi_values(rows: &[Vec<i64>], slopes: &[f32]) -> Vec<f32> {
    let mut data =
        Vec::with_capacity(rows.len() * slopes.len() * rows.first().map_or(0, |r| r.len()));
    for row in rows {
        // arange_tensor = (cumsum(mask) - 1) * mask
        let mut cum = 0i64;
        let positions: Vec<i64> = row
            .iter()
            .map(|m| {
                cum += m;
                (cum - 1) * m
            })
            .collect();
        for slope in slopes {
            data.extend(positions.iter().map(|p| slope * *p as f32));
        }
    }
    data
}

/// `dropout_add`: residual + dropout(x) (the dropout is the identity at inference).
#[hooked]
pub fn dropout_add(x: &Tensor, residual: &Tensor, prob: f64) -> Result<Tensor> {
    let out = F::dropout(x, prob)?;
    residual + out
}

/// `bloom_gelu_forward`: the tanh approximation of GELU with Megatron's constants.
#[hooked]
pub fn bloom_gelu_forward(x: &Tensor) -> Result<Tensor> {
    let inner = ((x * 0.044715)?.mul(x)? + 1.0)?;
    let t = (x * 0.79788456)?.mul(&inner)?.tanh()?;
    (x * 0.5)?.mul(&(t + 1.0)?)
}

/// `GeLUFunction` (an autograd function in transformers; only its forward matters here).
pub struct GeLUFunction;

#[hooked]
impl GeLUFunction {
    /// `bloom_gelu_forward(input)`.
    pub fn apply(input: &Tensor) -> Result<Tensor> {
        bloom_gelu_forward(input)
    }
}

/// `BloomGelu`: the MLP's activation module.
pub struct BloomGelu {
    scope: Scope,
}

#[hooked]
impl BloomGelu {
    /// GELU (tanh approximation).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        GeLUFunction::apply(x)
    }
}

/// `alibi.baddbmm(batch1, batch2, beta, alpha)`: beta * alibi + alpha * (batch1 @ batch2).
trait Baddbmm {
    fn baddbmm(&self, batch1: &Tensor, batch2: &Tensor, beta: f64, alpha: f64) -> Result<Tensor>;
}

impl Baddbmm for Tensor {
    fn baddbmm(&self, batch1: &Tensor, batch2: &Tensor, beta: f64, alpha: f64) -> Result<Tensor> {
        let prod = (batch1.matmul(batch2)? * alpha)?;
        // beta == 1 is Bloom's case: add the bias as is.
        let input = if beta == 1.0 {
            self.clone()
        } else {
            (self * beta)?
        };
        prod.broadcast_add(&input)
    }
}

/// `BloomAttention`.
pub struct BloomAttention {
    query_key_value: Linear,
    dense: Linear,
    /// Dropout on the probabilities (the identity at inference; its output is what multiplies V).
    pub attention_dropout: Dropout,
    pretraining_tp: usize,
    slow_but_exact: bool,
    hidden_size: usize,
    num_heads: usize,
    head_dim: usize,
    hidden_dropout: f64,
    inv_norm_factor: f64,
    beta: f64,
    layer_idx: usize,
    scope: Scope,
}

impl BloomAttention {
    fn new(cfg: &BloomConfig, layer_idx: usize, vb: Builder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.n_head;
        Ok(BloomAttention {
            query_key_value: Linear::new(h, 3 * h, true, vb.pp("query_key_value"))?,
            dense: Linear::new(h, h, true, vb.pp("dense"))?,
            attention_dropout: Dropout::new(cfg.attention_dropout, vb.pp("attention_dropout")),
            pretraining_tp: cfg.pretraining_tp,
            slow_but_exact: cfg.slow_but_exact,
            hidden_size: h,
            num_heads: cfg.n_head,
            head_dim,
            hidden_dropout: cfg.hidden_dropout,
            inv_norm_factor: 1.0 / (head_dim as f64).sqrt(),
            beta: 1.0,
            layer_idx,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl BloomAttention {
    /// [B, T, H * 3 * D] -> query, key, value, each [B, H, T, D].
    fn _reshape(&self, fused_qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch_size, seq_length, _) = fused_qkv.dims3()?;
        let fused_qkv =
            fused_qkv.reshape((batch_size, seq_length, self.num_heads, 3, self.head_dim))?;
        let query_layer = fused_qkv.narrow(3, 0, 1)?.squeeze(3)?.transpose(1, 2)?;
        let key_layer = fused_qkv.narrow(3, 1, 1)?.squeeze(3)?.transpose(1, 2)?;
        let value_layer = fused_qkv.narrow(3, 2, 1)?.squeeze(3)?.transpose(1, 2)?;
        Ok((query_layer, key_layer, value_layer))
    }

    /// [B * H, T, D] -> [B, T, H * D].
    fn _merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch_size_and_num_heads, seq_length, _) = x.dims3()?;
        let batch_size = batch_size_and_num_heads / self.num_heads;
        let x = x.reshape((batch_size, self.num_heads, seq_length, self.head_dim))?;
        let x = x.permute((0, 2, 1, 3))?;
        x.reshape((batch_size, seq_length, self.num_heads * self.head_dim))
    }

    /// Self-attention with ALiBi; returns `residual + dense(attention)`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        residual: &Tensor,
        alibi: &Tensor,
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let (batch_size, q_length, _) = hidden_states.dims3()?;
        let fused_qkv = self.query_key_value.forward(hidden_states)?;
        let (query_layer, key_layer, value_layer) = self._reshape(&fused_qkv)?;

        let (key_layer, value_layer) = match past_key_values {
            Some(past_key_values) => {
                past_key_values.update(&key_layer, &value_layer, self.layer_idx)?
            }
            None => (key_layer, value_layer),
        };

        let bh = batch_size * self.num_heads;
        let query_layer = query_layer.reshape((bh, (), self.head_dim))?;
        let key_layer = key_layer
            .reshape((bh, (), self.head_dim))?
            .transpose(D::Minus1, D::Minus2)?;
        let value_layer = value_layer.reshape((bh, (), self.head_dim))?;

        // [B * H, q_length, kv_length]
        let attention_scores =
            alibi.baddbmm(&query_layer, &key_layer, self.beta, self.inv_norm_factor)?;

        let attn_weights = attention_scores.reshape((batch_size, self.num_heads, q_length, ()))?;
        let attn_weights = match attention_mask {
            Some(mask) => nn::ops::add(&attn_weights, mask)?,
            None => attn_weights,
        };

        // Softmax in float32, back to the compute dtype.
        let attention_probs =
            F::softmax(&attn_weights, D::Minus1)?.to_dtype(query_layer.dtype())?;

        let attention_probs = self.attention_dropout.forward(&attention_probs)?;

        let attention_probs_reshaped = attention_probs.reshape((bh, q_length, ()))?;
        let context_layer = attention_probs_reshaped.matmul(&value_layer.contiguous()?)?;
        let context_layer = self._merge_heads(&context_layer)?;

        let output_tensor = if self.pretraining_tp > 1 && self.slow_but_exact {
            // As transformers does it: column slices of `dense` without its bias.
            let slices = self.hidden_size as f64 / self.pretraining_tp as f64;
            let mut output_tensor = context_layer.zeros_like()?;
            for i in 0..self.pretraining_tp {
                let start = (i as f64 * slices) as usize;
                let end = ((i + 1) as f64 * slices) as usize;
                output_tensor = (output_tensor
                    + F::linear(
                        &context_layer.narrow(2, start, end - start)?,
                        &self.dense.weight.narrow(1, start, end - start)?,
                        None,
                    )?)?;
            }
            output_tensor
        } else {
            self.dense.forward(&context_layer)?
        };

        dropout_add(&output_tensor, residual, self.hidden_dropout)
    }
}

/// `BloomMLP`.
pub struct BloomMLP {
    dense_h_to_4h: Linear,
    gelu_impl: BloomGelu,
    dense_4h_to_h: Linear,
    pretraining_tp: usize,
    slow_but_exact: bool,
    hidden_dropout: f64,
    scope: Scope,
}

#[hooked]
impl BloomMLP {
    /// `residual + dense_4h_to_h(gelu(dense_h_to_4h(x)))`.
    pub fn forward(&self, hidden_states: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let hidden_states = self
            .gelu_impl
            .forward(&self.dense_h_to_4h.forward(hidden_states)?)?;

        let intermediate_output = if self.pretraining_tp > 1 && self.slow_but_exact {
            let mut intermediate_output = residual.zeros_like()?;
            let slices =
                self.dense_4h_to_h.weight.dim(D::Minus1)? as f64 / self.pretraining_tp as f64;
            for i in 0..self.pretraining_tp {
                let start = (i as f64 * slices) as usize;
                let end = ((i + 1) as f64 * slices) as usize;
                intermediate_output = (intermediate_output
                    + F::linear(
                        &hidden_states.narrow(2, start, end - start)?,
                        &self.dense_4h_to_h.weight.narrow(1, start, end - start)?,
                        None,
                    )?)?;
            }
            intermediate_output
        } else {
            self.dense_4h_to_h.forward(&hidden_states)?
        };

        dropout_add(&intermediate_output, residual, self.hidden_dropout)
    }
}

/// `BloomBlock`.
pub struct BloomBlock {
    input_layernorm: LayerNorm,
    self_attention: BloomAttention,
    post_attention_layernorm: LayerNorm,
    mlp: BloomMLP,
    apply_residual_connection_post_layernorm: bool,
    scope: Scope,
}

#[hooked]
impl BloomBlock {
    /// LayerNorm, attention (with its residual), LayerNorm, MLP (with its residual).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        alibi: &Tensor,
        attention_mask: Option<&Tensor>,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        // Layer norm at the beginning of the transformer layer.
        let layernorm_output = self.input_layernorm.forward(hidden_states)?;

        let residual = if self.apply_residual_connection_post_layernorm {
            &layernorm_output
        } else {
            hidden_states
        };

        let attention_output = self.self_attention.forward(
            &layernorm_output,
            residual,
            alibi,
            attention_mask,
            past_key_values,
        )?;

        let layernorm_output = self.post_attention_layernorm.forward(&attention_output)?;

        let residual = if self.apply_residual_connection_post_layernorm {
            &layernorm_output
        } else {
            &attention_output
        };

        self.mlp.forward(&layernorm_output, residual)
    }
}

/// `BloomModel`.
pub struct BloomModel {
    word_embeddings: Embedding,
    word_embeddings_layernorm: LayerNorm,
    h: Vec<BloomBlock>,
    ln_f: LayerNorm,
    num_heads: usize,
    scope: Scope,
}

#[hooked]
impl BloomModel {
    /// Hidden states after `ln_f` [B, T, hidden]. Positions come from the mask (ALiBi), so
    /// `position_ids` is not read, as in transformers.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        _position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        let inputs_embeds = self.word_embeddings.forward(input_ids)?;
        let (batch_size, seq_length, _) = inputs_embeds.dims3()?;
        let past_length = nn::past_len(past_key_values);
        let seq_length_with_past = seq_length + past_length;

        let mut hidden_states = self.word_embeddings_layernorm.forward(&inputs_embeds)?;

        let alibi = build_alibi_tensor(
            attention_mask,
            batch_size,
            seq_length_with_past,
            self.num_heads,
            hidden_states.dtype(),
            hidden_states.device(),
        )?;

        let causal_mask = mask::causal_mask(
            attention_mask,
            batch_size,
            seq_length,
            past_length,
            None,
            inputs_embeds.dtype(),
            inputs_embeds.device(),
        )?;

        for block in self.h.iter() {
            hidden_states =
                block.forward(&hidden_states, &alibi, Some(&causal_mask), past_key_values)?;
        }

        self.ln_f.forward(&hidden_states)
    }
}

/// `BloomForCausalLM`.
pub struct BloomForCausalLM {
    transformer: BloomModel,
    lm_head: Linear,
    dims: Dims,
    scope: Scope,
}

#[hooked]
impl BloomForCausalLM {
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

impl CausalLM for BloomForCausalLM {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> Result<Tensor> {
        BloomForCausalLM::forward(
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

/// Builds a BLOOM model.
pub fn load(config: &Config, vb: Builder) -> crate::Result<Box<dyn CausalLM>> {
    let cfg = BloomConfig::read(config)?;
    let root = vb.clone();
    // BigScience's checkpoints were saved from `BloomModel`: their weights have no `transformer.`
    // prefix (transformers adds it on load); the module paths keep it.
    let vb_t = if !vb.contains("transformer.word_embeddings.weight")
        && vb.contains("word_embeddings.weight")
    {
        vb.pp_module("transformer")
    } else {
        vb.pp("transformer")
    };
    let h_size = cfg.hidden_size;
    let eps = cfg.layer_norm_epsilon;
    let word_embeddings = Embedding::new(cfg.vocab_size, h_size, vb_t.pp("word_embeddings"))?;
    let word_embeddings_layernorm =
        LayerNorm::new(h_size, eps, true, vb_t.pp("word_embeddings_layernorm"))?;
    let mut h = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let vb_l = vb_t.pp("h").pp(i);
        let input_layernorm = LayerNorm::new(h_size, eps, true, vb_l.pp("input_layernorm"))?;
        let self_attention = BloomAttention::new(&cfg, i, vb_l.pp("self_attention"))?;
        let post_attention_layernorm =
            LayerNorm::new(h_size, eps, true, vb_l.pp("post_attention_layernorm"))?;
        let vb_mlp = vb_l.pp("mlp");
        let mlp = BloomMLP {
            dense_h_to_4h: Linear::new(h_size, 4 * h_size, true, vb_mlp.pp("dense_h_to_4h"))?,
            gelu_impl: BloomGelu {
                scope: vb_mlp.pp("gelu_impl").scope::<BloomGelu>(),
            },
            dense_4h_to_h: Linear::new(4 * h_size, h_size, true, vb_mlp.pp("dense_4h_to_h"))?,
            pretraining_tp: cfg.pretraining_tp,
            slow_but_exact: cfg.slow_but_exact,
            hidden_dropout: cfg.hidden_dropout,
            scope: vb_mlp.scope::<BloomMLP>(),
        };
        h.push(BloomBlock {
            input_layernorm,
            self_attention,
            post_attention_layernorm,
            mlp,
            apply_residual_connection_post_layernorm: cfg.apply_residual_connection_post_layernorm,
            scope: vb_l.scope::<BloomBlock>(),
        });
    }
    let ln_f = LayerNorm::new(h_size, eps, true, vb_t.pp("ln_f"))?;
    let transformer = BloomModel {
        word_embeddings,
        word_embeddings_layernorm,
        h,
        ln_f,
        num_heads: cfg.n_head,
        scope: vb_t.scope::<BloomModel>(),
    };
    let lm_head = if cfg.tie_word_embeddings || !root.contains("lm_head.weight") {
        Linear::from_weights(
            transformer.word_embeddings.weight.clone(),
            None,
            &root.pp("lm_head"),
        )
    } else {
        Linear::new(h_size, cfg.vocab_size, false, root.pp("lm_head"))?
    };
    Ok(Box::new(BloomForCausalLM {
        transformer,
        lm_head,
        dims: Dims {
            layers: cfg.n_layer,
            heads: cfg.n_head,
            kv_heads: cfg.n_head,
            head_dim: cfg.hidden_size / cfg.n_head,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
            max_positions: None,
        },
        scope: root.scope::<BloomForCausalLM>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::_get_alibi_slopes;

    #[test]
    fn alibi_slopes_power_of_two_and_not() {
        // The values transformers' `_get_alibi_slopes(4)` and `(6)` return.
        // 4 heads: base 2^-2, slopes 2^-2 .. 2^-8.
        assert_eq!(
            _get_alibi_slopes(4),
            vec![0.25, 0.0625, 0.015625, 0.00390625]
        );
        // 6 heads: 4 from base 2^-2, then 2 odd powers of 2^-1.
        let s = _get_alibi_slopes(6);
        assert_eq!(s.len(), 6);
        assert_eq!(&s[4..], &[0.5, 0.125]);
    }
}
