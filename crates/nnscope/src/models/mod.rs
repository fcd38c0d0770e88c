//! One file per architecture, each mirroring the Hugging Face modeling file it ports, and the table
//! that registers them.
//!
//! Adding an architecture: write `models/<arch>.rs` with a `load` function, add its row to
//! [`ARCHITECTURES`] (with its attention-probability hookpoint), and add its fixture under
//! `tests/fixtures/<arch>/`.

use crate::config::Config;
use crate::nn::{Builder, KvCache};
use candle_core::Tensor;

pub mod bloom;
pub mod dbrx;
pub mod falcon;
pub mod gemma;
pub mod gemma2;
pub mod gemma3_text;
pub mod gpt2;
pub mod gpt_bigcode;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod gpt_oss;
pub mod gptj;
pub mod llama;
pub mod mixtral;
pub mod olmo;
pub mod olmo2;
pub mod opt;
pub mod phi;
pub mod phi3;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod stablelm;
pub mod starcoder2;

/// The sizes of a model, as its own config reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Decoder layers.
    pub layers: usize,
    /// Query heads per attention.
    pub heads: usize,
    /// Key/value heads per attention.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Hidden (residual stream) size.
    pub hidden: usize,
    /// Vocabulary size (the logits' last axis).
    pub vocab: usize,
    /// The longest sequence the model can take, where it has a hard limit (learned positions).
    pub max_positions: Option<usize>,
}

/// A causal language model's forward pass.
pub trait CausalLM: Send + Sync {
    /// Logits [B, T, vocab] for `input_ids` [B, T].
    ///
    /// - `attention_mask`: 0/1 [B, past + T] over the cached and the new tokens (`None`: all 1);
    /// - `position_ids`: [B, T] integer positions of the new tokens (transformers' `generate()`
    ///   passes `cumsum(attention_mask) - 1`, see [`crate::nn::positions_from_mask`]);
    /// - `past_key_values`: the cache, extended by this forward when given.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: &Tensor,
        past_key_values: Option<&KvCache>,
    ) -> candle_core::Result<Tensor>;

    /// The model's sizes.
    fn dims(&self) -> Dims;

    /// The attention-probability path from `attentions.L` when this model's config moves it away from
    /// the registry's (GPT-2 with `reorder_and_upcast_attn` computes them in
    /// `_upcast_and_reordered_attn`); `None` keeps [`Architecture::attention_probabilities`].
    fn attention_probabilities(&self) -> Option<&'static str> {
        None
    }

    /// Whether generation must drop the cache and run the whole sequence again before a forward
    /// that brings the sequence to `total` tokens with `past` of them cached (Phi-3 does this once,
    /// when the sequence first grows past `original_max_position_embeddings`, so that every cached
    /// key uses LongRoPE's long factors). `false` for every other model.
    fn restart_cache(&self, _past: usize, _total: usize) -> bool {
        false
    }
}

/// Builds a model from its config and weights.
pub type LoadFn = fn(&Config, Builder) -> crate::Result<Box<dyn CausalLM>>;

/// Shape of what the attention-probability hookpoint yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbShape {
    /// [B, H, Q, K], rows summing to 1.
    Standard,
    /// [B, H, Q, K + 1]: softmax over the scores plus one sink logit per head (the last column),
    /// rows summing to 1; the first K columns are what multiplies V.
    SinkColumn,
}

/// One row of the architecture registry.
#[derive(Debug)]
pub struct Architecture {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// The Hugging Face class (`LlamaForCausalLM`).
    pub class: &'static str,
    /// Builds the model.
    pub load: LoadFn,
    /// Path of the attention probabilities from `attentions.L` (the seed's table, written out).
    pub attention_probabilities: &'static str,
    /// Shape of that hookpoint's value.
    pub prob_shape: ProbShape,
}

/// Every supported architecture.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        model_type: "gpt2",
        class: "GPT2LMHeadModel",
        load: gpt2::load,
        attention_probabilities: "source.attention_interface_0.source.module_attn_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "llama",
        class: "LlamaForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "mistral",
        class: "MistralForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen2",
        class: "Qwen2ForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen3",
        class: "Qwen3ForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen2_moe",
        class: "Qwen2MoeForCausalLM",
        load: qwen2_moe::load,
        attention_probabilities: "source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "dbrx",
        class: "DbrxForCausalLM",
        load: dbrx::load,
        attention_probabilities: "attn.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gpt_oss",
        class: "GptOssForCausalLM",
        load: gpt_oss::load,
        attention_probabilities: "source.attention_interface_0.source.F_softmax_0",
        prob_shape: ProbShape::SinkColumn,
    },
    Architecture {
        model_type: "gptj",
        class: "GPTJForCausalLM",
        load: gptj::load,
        attention_probabilities: "source.self__attn_0.source.self_attn_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "bloom",
        class: "BloomForCausalLM",
        load: bloom::load,
        attention_probabilities: "source.self_attention_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "stablelm",
        class: "StableLmForCausalLM",
        load: stablelm::load,
        attention_probabilities: "source.self_attention_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gpt_neox",
        class: "GPTNeoXForCausalLM",
        load: gpt_neox::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gpt_neo",
        class: "GPTNeoForCausalLM",
        load: gpt_neo::load,
        attention_probabilities: "attention.source.self__attn_0.source.self_attn_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "opt",
        class: "OPTForCausalLM",
        load: opt::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gpt_bigcode",
        class: "GPTBigCodeForCausalLM",
        load: gpt_bigcode::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "starcoder2",
        class: "Starcoder2ForCausalLM",
        load: starcoder2::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gemma",
        class: "GemmaForCausalLM",
        load: gemma::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gemma2",
        class: "Gemma2ForCausalLM",
        load: gemma2::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gemma3_text",
        class: "Gemma3ForCausalLM",
        load: gemma3_text::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "olmo",
        class: "OlmoForCausalLM",
        load: olmo::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "olmo2",
        class: "Olmo2ForCausalLM",
        load: olmo2::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "phi",
        class: "PhiForCausalLM",
        load: phi::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "phi3",
        class: "Phi3ForCausalLM",
        load: phi3::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "mixtral",
        class: "MixtralForCausalLM",
        load: mixtral::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen3_moe",
        class: "Qwen3MoeForCausalLM",
        load: qwen3_moe::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "falcon",
        class: "FalconForCausalLM",
        load: falcon::load,
        attention_probabilities: "source.F_softmax_0",
        prob_shape: ProbShape::Standard,
    },
];

/// Where one architecture's per-head values are, as hookpoint paths relative to `attentions.L`
/// (what the standard names `heads.L`, `queries.L`, `keys.L`, `values.L` expand to). Each entry
/// lists alternatives, best first: the first whose call ran when the model's structure was recorded
/// is used (a config can move a value: StableLM's partial rotary, for example). A separate table
/// from [`ARCHITECTURES`], keyed by model type, so a registry row compiles without it; a model type
/// missing here gets "per-head names are not registered for model_type X".
#[derive(Debug)]
pub struct PerHead {
    /// The model types this row serves.
    pub model_types: &'static [&'static str],
    /// The input of the attention's output projection, [B, T, H * D] (viewed as [B, T, H, D]).
    pub heads: &'static [&'static str],
    /// Queries after rotary, [B, H, T, D].
    pub queries: &'static [&'static str],
    /// Keys after rotary, per key/value head, [B, KV, T, D] (this forward's tokens).
    pub keys: &'static [&'static str],
    /// Values per key/value head, [B, KV, T, D] (this forward's tokens).
    pub values: &'static [&'static str],
}

/// The per-head hookpoints of every architecture that has them (see [`PerHead`]).
pub const PER_HEAD: &[PerHead] = &[
    PerHead {
        // Rotary configurations rotate q and k; ALiBi ones use the reshaped heads as they are.
        // With `new_decoder_architecture` keys and values come broadcast to every query head.
        model_types: &["falcon"],
        heads: &["dense.input"],
        queries: &[
            "source.apply_rotary_pos_emb_0.output.0",
            "source.reshape_0.output",
        ],
        keys: &[
            "source.apply_rotary_pos_emb_0.output.1",
            "source.reshape_1.output",
        ],
        values: &["source.reshape_2.output"],
    },
    PerHead {
        model_types: &["llama", "mistral", "qwen2", "qwen3"],
        heads: &["o_proj.input"],
        queries: &["source.apply_rotary_pos_emb_0.output.0"],
        keys: &["source.apply_rotary_pos_emb_0.output.1"],
        values: &["source.transpose_0.output"],
    },
    PerHead {
        model_types: &[
            "qwen2_moe",
            "gpt_oss",
            "phi3",
            "mixtral",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
        ],
        heads: &["o_proj.input"],
        queries: &["source.apply_rotary_pos_emb_0.output.0"],
        keys: &["source.apply_rotary_pos_emb_0.output.1"],
        values: &["source.transpose_2.output"],
    },
    PerHead {
        model_types: &["dbrx"],
        heads: &["attn.out_proj.input"],
        queries: &["attn.source.apply_rotary_pos_emb_0.output.0"],
        keys: &["attn.source.apply_rotary_pos_emb_0.output.1"],
        values: &["attn.source.transpose_2.output"],
    },
    PerHead {
        model_types: &["gpt2"],
        heads: &["c_proj.input"],
        queries: &["source.contiguous_0.output"],
        keys: &["source.contiguous_1.output"],
        values: &["source.contiguous_2.output"],
    },
    PerHead {
        model_types: &["gptj"],
        heads: &["out_proj.input"],
        queries: &["source.contiguous_0.output"],
        keys: &["source.contiguous_1.output"],
        values: &["source.value_contiguous_0.output"],
    },
    PerHead {
        // `_merge_heads` feeds `dense` and also the column slices of `pretraining_tp > 1`.
        model_types: &["bloom"],
        heads: &["source.self__merge_heads_0.output"],
        queries: &["source.self__reshape_0.output.0"],
        keys: &["source.self__reshape_0.output.1"],
        values: &["source.self__reshape_0.output.2"],
    },
    PerHead {
        // Partial rotary: the concatenation when part of each head passes, the rotary output when
        // all of it rotates, the (normed) heads when none does.
        model_types: &["stablelm"],
        heads: &["o_proj.input"],
        queries: &[
            "source.Tensor_cat_0.output",
            "source.apply_rotary_pos_emb_0.output.0",
            "source.q_layernorm_0.output",
            "source.transpose_0.output",
        ],
        keys: &[
            "source.Tensor_cat_1.output",
            "source.apply_rotary_pos_emb_0.output.1",
            "source.k_layernorm_0.output",
            "source.transpose_1.output",
        ],
        values: &["source.transpose_2.output"],
    },
    PerHead {
        // Partial rotary, as StableLM.
        model_types: &["phi"],
        heads: &["dense.input"],
        queries: &[
            "source.contiguous_0.output",
            "source.apply_rotary_pos_emb_0.output.0",
            "source.q_layernorm_0.output",
            "source.transpose_0.output",
        ],
        keys: &[
            "source.contiguous_1.output",
            "source.apply_rotary_pos_emb_0.output.1",
            "source.k_layernorm_0.output",
            "source.transpose_1.output",
        ],
        values: &["source.transpose_2.output"],
    },
    PerHead {
        model_types: &["starcoder2"],
        heads: &["o_proj.input"],
        queries: &["source.apply_rotary_pos_emb_0.output.0"],
        keys: &["source.apply_rotary_pos_emb_0.output.1"],
        values: &["source.transpose_2.output"],
    },
    PerHead {
        model_types: &["gpt_neox"],
        heads: &["dense.input"],
        queries: &["source.apply_rotary_pos_emb_0.output.0"],
        keys: &["source.apply_rotary_pos_emb_0.output.1"],
        values: &["source.contiguous_2.output"],
    },
    PerHead {
        // The attention proper is the inner `attention` module.
        model_types: &["gpt_neo"],
        heads: &["attention.out_proj.input"],
        queries: &["attention.source.self__split_heads_0.output"],
        keys: &["attention.source.self__split_heads_1.output"],
        values: &["attention.source.self__split_heads_2.output"],
    },
    PerHead {
        // Queries are scaled before the product, as OPT does.
        model_types: &["opt"],
        heads: &["out_proj.input"],
        queries: &["source.contiguous_0.output"],
        keys: &["source.contiguous_1.output"],
        values: &["source.contiguous_2.output"],
    },
    PerHead {
        // Multi-query (one key/value head) first, then the per-head split.
        model_types: &["gpt_bigcode"],
        heads: &["c_proj.input"],
        queries: &["source.contiguous_2.output", "source.contiguous_3.output"],
        keys: &["source.contiguous_0.output", "source.contiguous_4.output"],
        values: &["source.contiguous_1.output", "source.contiguous_5.output"],
    },
];

/// The per-head row of a `model_type`, if registered.
pub fn per_head(model_type: &str) -> Option<&'static PerHead> {
    PER_HEAD
        .iter()
        .find(|p| p.model_types.contains(&model_type))
}

/// The registry row of a `model_type`.
pub fn architecture(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.model_type == model_type)
}
